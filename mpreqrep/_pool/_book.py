"""The process pool's bookkeeping, sans I/O: which request is on which worker.

Rule 1: nothing here touches a socket, a thread, a process, a clock or a
future. Callers pass the time in and get back what to send to which worker;
requests and workers are plain ids (a request id, a worker's pid).

Rule 2: a worker answers the requests sent to it one at a time, in order.
So the oldest unanswered request on a worker is the one it runs (or is about
to run), and every request behind it provably never started. When a worker
is lost, its oldest request fails with it and the others are sent again:
nothing runs twice, and no bystander is lost.

The book also decides batching (:class:`Sizing`), when a running request's
deadline passes, and which workers take no more requests (retiring past the
memory cap, or doomed to be killed after a timeout)::

    submit ──▶ a usable worker has room? ── yes ──▶ Send(worker, (id,))
                     │ no
                     ▼
    queue ──────▶ waiting ──▶ top-up on every settle / new worker / loss
                              (or once per pass of the caller's loop):
                                Send(worker, (id, id, ...)), one frame each
    settle(worker, id) ──▶ deliver it? the next one on that worker now runs
    top_up ──▶ Sends for the waiting requests, once per batch of replies
    lose(worker) ──▶ Loss(running=oldest id, resent=the rest, sends)

A request is handed to a worker only once the caller's ``claim`` says it is
still wanted (its owner may have given up on it while it waited): one that
is not leaves the book there and then, and never reaches a worker.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import NamedTuple

MAX_BATCH_SIZE = 16
"""Most requests of a light handler in flight on one worker (sent in one frame when waiting)."""

HEAVY_DEPTH = 2
"""Requests of a heavy handler in flight on one worker: one running, one ready next."""

LIGHT_HANDLER_S = 0.001
"""Handlers faster than this on average are batched; slower ones are pipelined."""

HANDLER_TIME_SMOOTHING = 0.2
"""Weight of the newest reply in the moving average of the handler time."""

STALLED_S = 2 * LIGHT_HANDLER_S
"""A light handler's worker whose running request has taken longer than this (twice
what counts as light) gets no more requests packed behind it: they would wait for it
while another worker idles."""


class Send(NamedTuple):
    """Requests to write to one worker, in this order, as one frame."""

    worker: int
    request_ids: tuple[int, ...]


class Loss(NamedTuple):
    """What became of the requests on a worker that is gone."""

    running: int | None
    """The request it was running: it fails (``None``: idle, or already timed out)."""
    resent: tuple[int, ...]
    """Requests queued behind it, which never started: they go to other workers."""
    sends: tuple[Send, ...]


class Settled(NamedTuple):
    """What a worker's reply changes."""

    deliver: bool
    """Whether the reply is the request's outcome (not a stale or timed-out one)."""
    retired: bool
    """The worker is retiring and has nothing left to do: close its channel."""


_DELIVERED = Settled(True, False)
_IGNORED = Settled(False, False)


class Sizing:
    """How many requests to keep in flight on each worker.

    Light handlers (under :data:`LIGHT_HANDLER_S`) get up to
    :data:`MAX_BATCH_SIZE`, so the requests that arrive while a worker is busy
    travel to it together: the hop is paid per frame, not per request (and
    :meth:`Book.top_up` packs them on as few workers as fit). Heavy
    handlers get :data:`HEAVY_DEPTH`, so a worker never idles waiting for its
    next request while the work stays spread over all workers. Until the
    first reply is measured, handlers count as heavy.
    """

    def __init__(self) -> None:
        self._handler_s: float | None = None

    def observe(self, elapsed_s: float) -> None:
        """Fold one handler time into the moving average."""
        previous = self._handler_s
        self._handler_s = (
            elapsed_s
            if previous is None
            else previous + HANDLER_TIME_SMOOTHING * (elapsed_s - previous)
        )

    def is_light(self) -> bool:
        """Whether the handler is fast enough to batch."""
        return self._handler_s is not None and self._handler_s < LIGHT_HANDLER_S

    def depth(self) -> int:
        """Requests to keep in flight on one worker."""
        return MAX_BATCH_SIZE if self.is_light() else HEAVY_DEPTH

    def submit_depth(self) -> int:
        """Requests in flight on a worker below which a new request is sent at once.

        A light handler's request goes at once only to an idle worker; one
        that arrives while the worker is busy waits for its reply and travels
        with the others that arrived meanwhile, in one frame: one write (and
        one wake-up of the worker) per batch instead of per request.
        """
        return 1 if self.is_light() else HEAVY_DEPTH


class _Slot:
    """One worker's queue: ``queue[0]`` runs, the rest wait in its socket."""

    __slots__ = ("deadline", "doomed", "queue", "retiring", "running_since", "served")

    def __init__(self) -> None:
        self.queue: deque[int] = deque()
        self.running_since = 0.0
        self.deadline: float | None = None
        self.retiring = False
        self.doomed = False
        self.served = 0

    @property
    def usable(self) -> bool:
        """Whether the worker takes new requests."""
        return not (self.retiring or self.doomed)

    def stalled(self, now: float) -> bool:
        """Whether its running request has taken longer than :data:`STALLED_S`."""
        return bool(self.queue) and now - self.running_since > STALLED_S


class Book:
    """Which request is waiting, which runs on which worker, and what to send next.

    Not thread-safe: the dispatcher holds its lock around every call.

    Args:
        timeout_s: seconds a request may run once it is its worker's oldest;
            ``None`` for no limit.
        claim: asked whether a request is still wanted each time it is
            handed to a worker (a resent one again); ``False`` drops it.
    """

    def __init__(
        self, timeout_s: float | None = None, claim: Callable[[int], bool] = lambda _: True
    ) -> None:
        self._timeout_s = timeout_s
        self._claim = claim
        self._slots: dict[int, _Slot] = {}
        self._waiting: deque[int] = deque()
        self._timed_out: set[int] = set()
        self.sizing = Sizing()
        self.resent = 0
        self.batches = 0
        self.dropped = 0

    # -- workers ----------------------------------------------------------------------------

    def add_worker(self, worker: int, now: float) -> list[Send]:
        """A worker is ready for requests; returns what to send it and the others."""
        if worker in self._slots:
            raise ValueError(f"worker {worker} is already in the book")
        self._slots[worker] = _Slot()
        return self.top_up(now)

    def retire(self, worker: int) -> bool:
        """Send a worker nothing more; returns whether it is idle already."""
        slot = self._slots[worker]
        slot.retiring = True
        return not slot.queue

    def lose(self, worker: int, now: float) -> Loss:
        """A worker is gone: its running request fails, the others go elsewhere."""
        slot = self._slots.pop(worker)
        running: int | None = None
        if slot.queue:
            head = slot.queue.popleft()
            if head in self._timed_out:
                self._timed_out.discard(head)
            else:
                running = head
        resent = tuple(slot.queue)
        self._waiting.extendleft(reversed(resent))
        self.resent += len(resent)
        return Loss(running, resent, tuple(self.top_up(now)))

    # -- requests ---------------------------------------------------------------------------

    def submit(self, request: int, now: float) -> list[Send]:
        """A new request: send it to the least busy worker with room, else queue it."""
        slot_id = None if self._waiting else self._least_busy(self.sizing.submit_depth())
        if slot_id is None:
            self._waiting.append(request)
            return []
        if not self._wanted(request):
            return []
        self._put(slot_id, (request,), now)
        return [Send(slot_id, (request,))]

    def queue(self, request: int) -> None:
        """A new request waits for the next :meth:`top_up`, with the others that
        arrive meanwhile (a caller that sends once per pass of its loop)."""
        self._waiting.append(request)

    def settle(self, worker: int, request: int, elapsed_s: float, now: float) -> Settled:
        """A worker answered ``request``, which took ``elapsed_s`` to handle.

        Call :meth:`top_up` once the replies that came together are settled,
        so the requests that waited meanwhile travel together too.
        """
        slot = self._slots.get(worker)
        if slot is None or not (queue := slot.queue) or queue[0] != request:
            return _IGNORED  # not what this worker runs
        queue.popleft()
        slot.served += 1
        deliver = not self._timed_out or request not in self._timed_out
        if not deliver:
            self._timed_out.discard(request)
        if self._timeout_s is not None:
            slot.deadline = now + self._timeout_s if queue and not slot.doomed else None
        slot.running_since = now
        self.sizing.observe(elapsed_s)
        if slot.retiring and not queue:
            return Settled(deliver, True)
        return _DELIVERED if deliver else _IGNORED

    def expire(self, now: float) -> list[tuple[int, int]]:
        """The ``(worker, request)`` pairs whose request ran past its deadline.

        Each such worker is doomed (it gets nothing more, it is to be
        killed); its request stays its oldest until the worker is lost, or
        until its late reply arrives and the next one starts.
        """
        expired: list[tuple[int, int]] = []
        for worker, slot in self._slots.items():
            if slot.deadline is not None and slot.deadline <= now and not slot.doomed:
                slot.doomed = True
                slot.deadline = None
                self._timed_out.add(slot.queue[0])
                expired.append((worker, slot.queue[0]))
        return expired

    def shed_waiting(self) -> list[int]:
        """Take every waiting request out of the book (no worker can take them)."""
        shed = list(self._waiting)
        self._waiting.clear()
        return shed

    # -- views ------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest deadline of a running request, ``None`` if none."""
        deadlines = [slot.deadline for slot in self._slots.values() if slot.deadline is not None]
        return min(deadlines, default=None)

    def running(self, worker: int) -> int | None:
        """The request a worker runs (or is about to), ``None`` if idle or unknown."""
        slot = self._slots.get(worker)
        return slot.queue[0] if slot is not None and slot.queue else None

    def served(self, worker: int) -> int:
        """Replies a worker gave (0 for one not in the book)."""
        slot = self._slots.get(worker)
        return slot.served if slot is not None else 0

    def workers(self) -> Iterator[int]:
        """The workers in the book."""
        return iter(self._slots)

    def in_flight(self) -> int:
        """Requests sent to workers and not answered."""
        return sum(len(slot.queue) for slot in self._slots.values())

    def waiting(self) -> int:
        """Requests no worker took yet."""
        return len(self._waiting)

    def is_idle(self) -> bool:
        """Whether no request is waiting or on a worker."""
        return not self._waiting and not any(slot.queue for slot in self._slots.values())

    # -- internals --------------------------------------------------------------------------

    def _deadline(self, now: float) -> float | None:
        return None if self._timeout_s is None else now + self._timeout_s

    def _put(self, worker: int, requests: tuple[int, ...], now: float) -> None:
        """Append requests to a worker's queue; the first may start at once."""
        slot = self._slots[worker]
        if not slot.queue:
            slot.deadline = self._deadline(now)
            slot.running_since = now
        slot.queue.extend(requests)
        self.batches += 1

    def _least_busy(self, depth: int) -> int | None:
        """The usable worker with the fewest requests, if it has fewer than ``depth``."""
        best: int | None = None
        best_load = depth
        for worker, slot in self._slots.items():
            if slot.usable and len(slot.queue) < best_load:
                best, best_load = worker, len(slot.queue)
        return best

    def _busiest(self, depth: int, now: float) -> int | None:
        """The usable worker with the most requests, if it has fewer than ``depth``,
        leaving out those whose running request stalls."""
        best: int | None = None
        best_load = -1
        for worker, slot in self._slots.items():
            if slot.usable and best_load < len(slot.queue) < depth and not slot.stalled(now):
                best, best_load = worker, len(slot.queue)
        return best

    def top_up(self, now: float) -> list[Send]:
        """Give the waiting requests to the workers with room, a frame each.

        A heavy handler's requests are shared out evenly, the least busy
        worker first. A light handler's are packed: the busiest worker with
        room takes as many as fit, so a light load keeps one worker reading
        without sleeping instead of waking several (the hop, not the handler,
        is the cost); the others take what does not fit. A worker whose
        running request has taken longer than :data:`STALLED_S` takes none:
        what is packed behind a request that turned out slow waits for it, so
        they wait here instead, for the next worker that answers.

        Returns:
            What to send to which worker.
        """
        sends: list[Send] = []
        light = self.sizing.is_light()
        depth = self.sizing.depth()
        spread = 1 if light else sum(slot.usable for slot in self._slots.values())
        while self._waiting:
            worker = self._busiest(depth, now) if light else self._least_busy(depth)
            if worker is None:
                break
            room = depth - len(self._slots[worker].queue)
            batch = self._take(min(room, -(-len(self._waiting) // spread)))  # ceil
            if batch:
                self._put(worker, batch, now)
                sends.append(Send(worker, batch))
        return sends

    def _take(self, count: int) -> tuple[int, ...]:
        """Up to ``count`` waiting requests that are still wanted, oldest first."""
        batch: list[int] = []
        while self._waiting and len(batch) < count:
            request = self._waiting.popleft()
            if self._wanted(request):
                batch.append(request)
        return tuple(batch)

    def _wanted(self, request: int) -> bool:
        """Whether the caller still wants ``request`` sent; one it does not leaves the book."""
        if self._claim(request):
            return True
        self.dropped += 1
        return False
