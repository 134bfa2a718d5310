"""Process mode: ``handle_request`` on copies of the server in a supervised loky pool.

Owns everything about worker processes in the parent: the copy of the server
each worker loads once, a channel to each worker, knowing which worker runs
which request, rebuilding the pool when a worker dies, killing a handler that
runs past its deadline, recycling a worker that outgrew its memory cap, and
``workers="auto"``. The worker side is :mod:`._worker`, the framing
:mod:`._channel`. It knows nothing of client sockets: the I/O loop hands it
request text and gets back a future of the reply text.

loky starts the processes, loads the handler in each (its initializer) and
runs one long task per worker, :func:`~._worker.serve_channel`, which
connects back to the parent. Requests then travel on those channels, not as
loky tasks: a request costs one write each way, no trip through loky's
manager and feeder threads. Once attached to the I/O loop
(:meth:`ProcessPoolDispatcher.attach`), the I/O thread reads the replies
too, so a request never changes thread. Data crossing threads and processes::

    I/O thread                                                worker process (x N)
    ----------                                                --------------------
    submit(text) ── a worker has room: frame [(id, text)] ──▶ serve_channel:
      │ none has room                                          handle_request, in order
      ▼                                                              │
    waiting ──▶ top-up on each reply: [(id, text), ...] ──────────▶ │
    deque       (one frame, sized by _TaskSizing)                    │
    future ◀── reply text or exception ◀── channel readable ◀────────┘

    supervisor thread: select(listener, wake-up, channels' writes,
                              timeout=next deadline)
      ├─▶ a worker connects: its channel goes to the I/O loop
      ├─▶ deadline passed: psutil kill of that worker's process tree
      ├─▶ a worker retiring (memory cap): close its channel once it is idle
      └─▶ pool broken: take the channels back, read what the workers sent,
          new pool, culprit fails, bystanders go again

A worker answers its channel in order, so the oldest request without a reply
on a channel is the one its worker runs. When a worker dies, loky fails the
channel tasks with ``BrokenProcessPool``; the supervisor reads what the dead
workers sent, fails the request that ran in the one that died on its own
(:class:`WorkerCrashError`) and resubmits every other one to a new pool.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import itertools
import logging
import pickle
import secrets
import selectors
import threading
import time
from collections import deque
from collections.abc import Collection
from concurrent.futures import Future, InvalidStateError
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import psutil
from loky import ProcessPoolExecutor
from loky.backend import get_context
from loky.backend.reduction import dumps as loky_dumps

from ._channel import Channel, Listener, encode_frame
from ._dispatch import Dispatcher, Handler, LoopHooks
from ._errors import RequestTimeoutError
from ._worker import Hello, InitFailed, Outcome, Retiring, init_worker, serve_channel

logger = logging.getLogger("mpreqrep")

MAX_BATCH_SIZE = 16
"""Most requests of a light handler in flight on one worker (sent in one frame when waiting)."""

HEAVY_DEPTH = 2
"""Requests of a heavy handler in flight on one worker: one running, one ready next."""

LIGHT_HANDLER_S = 0.001
"""Handlers faster than this on average are batched; slower ones are pipelined."""

HANDLER_TIME_SMOOTHING = 0.2
"""Weight of the newest reply in the moving average of the handler time."""

MAX_UNEXPLAINED_BREAKS = 2
"""A request running when the pool broke this often, with no culprit found, fails."""

WORKER_START_TIMEOUT_S = 60.0
"""How long :meth:`ProcessPoolDispatcher.start` waits for every worker to load."""

MAX_FUTILE_REBUILDS = 3
"""Pools in a row that broke before any worker loaded the handler: then give up."""

_STATS_COUNTERS = (
    "crashed",
    "timed_out",
    "abandoned",
    "resubmitted",
    "pool_rebuilds",
    "recycled",
    "batches",
)


class PoolStartError(RuntimeError):
    """The worker processes could not be started with a copy of the handler."""


class WorkerCrashError(RuntimeError):
    """The worker process running the request died, or it broke the pool twice."""


class HandlerTimeoutError(RequestTimeoutError):
    """The handler ran past ``request_timeout_s``; its worker was killed."""


class _RemoteTraceback(Exception):
    """The traceback, as text, of an error raised in a worker process."""


@dataclass(eq=False)
class _Request:
    """One request from ``submit`` until its future is resolved."""

    request_id: int
    text: str
    future: Future[str]
    dispatched: bool = False
    deadline: float | None = None
    unexplained_breaks: int = 0


@dataclass(eq=False)
class _Link:
    """One worker's channel as the parent sees it, with the requests sent on it.

    The worker answers in order, so ``in_flight[0]`` is the request it runs.
    ``ended``: its stream ended (the worker died). ``on_loop``: the I/O loop
    reads its replies. ``events``: what the supervisor's selector watches.
    """

    channel: Channel
    pid: int
    process: Any
    in_flight: deque[_Request] = field(default_factory=deque)
    served: int = 0
    retiring: bool = False
    ended: bool = False
    on_loop: bool = False
    events: int = 0


class _Verdict(NamedTuple):
    """Who pays for a broken pool."""

    culprits: list[tuple[_Request, int]]
    abandoned: list[_Request]
    retry: list[_Request]


class _Wakeup:
    """Wakes the supervisor from other threads, like loky's ``_ThreadWakeup``.

    At most one wake-up message is ever unread, so :meth:`set` never blocks
    on a full pipe.
    """

    def __init__(self) -> None:
        self.reader, self._writer = get_context("loky").Pipe(duplex=False)
        self._lock = threading.Lock()
        self._pending = False
        self._closed = False

    def set(self) -> None:
        """Make the supervisor's next (or current) wait return; no-op once closed."""
        with self._lock:
            if not self._pending and not self._closed:
                self._pending = True
                self._writer.send_bytes(b"")

    def clear(self) -> None:
        """Consume the wake-up; call before looking at the state that caused it."""
        with self._lock:
            if self._pending:
                self.reader.recv_bytes()
                self._pending = False

    def close(self) -> None:
        """Close both ends of the pipe."""
        with self._lock:
            self._closed = True
            self.reader.close()
            self._writer.close()


class _Pool:
    """One loky executor and the links of its workers, replaced whole when it breaks.

    loky's manager thread marks it broken and counts finished channel tasks
    through the dispatcher's done callbacks, hence the lock; the links are
    guarded by the dispatcher's lock.
    """

    def __init__(self, executor: Any, generation: int) -> None:
        self.executor = executor
        self.generation = generation
        self.links: dict[int, _Link] = {}
        self.ready_count = 0
        self.broken: BaseException | None = None
        self.alive_at_break: frozenset[int] | None = None
        self.killed: set[int] = set()
        self._lock = threading.Lock()
        self._running_tasks = 0
        self._closed = False

    @classmethod
    def open(cls, initargs: tuple[Any, ...], workers: int, generation: int) -> _Pool:
        """A pool of ``workers`` processes that run ``init_worker(*initargs)`` (spawned lazily)."""
        executor = ProcessPoolExecutor(
            max_workers=workers,
            context=get_context("loky"),
            initializer=init_worker,
            initargs=initargs,
        )
        return cls(executor, generation)

    def start_channel_task(self) -> Future[tuple[int, bool]]:
        """Submit one ``serve_channel`` task; raises ``BrokenProcessPool`` if broken."""
        task: Future[tuple[int, bool]] = self.executor.submit(serve_channel)
        with self._lock:
            self._running_tasks += 1
        return task

    def channel_task_done(self) -> None:
        """Count a channel task that ended."""
        with self._lock:
            self._running_tasks -= 1

    def running_tasks(self) -> int:
        """Channel tasks submitted and not ended."""
        with self._lock:
            return self._running_tasks

    def mark_broken(self, error: BaseException, alive: frozenset[int] | None) -> None:
        """Record the first error that broke the pool and who was alive then."""
        with self._lock:
            self.broken = self.broken or error
            if self.alive_at_break is None:
                self.alive_at_break = alive

    def kill_worker(self, link: _Link) -> None:
        """Kill a worker and its descendants (the pool breaks; no one is blamed)."""
        self.killed.add(link.pid)
        if link.process is not None:
            _kill_process_tree(link.process)

    def died_on_its_own(self, pid: int) -> bool:
        """Whether the worker ``pid`` was already dead when loky noticed the break."""
        return (
            self.alive_at_break is not None
            and pid not in self.alive_at_break
            and pid not in self.killed
        )

    def close(self) -> None:
        """Shut the executor down, waiting for its tasks; idempotent.

        Close the channels first, or the channel tasks never end.
        """
        if not self._closed:
            self._closed = True
            self.executor.shutdown(wait=True)


class ProcessPoolDispatcher(Dispatcher):
    """Runs ``handle_request`` on copies of the server in a supervised loky pool.

    Each worker unpickles the server once, when loky starts it, then serves
    a channel of its own: a request ships only its text and gets back only
    its reply. When many requests wait, several go to a worker in one frame.
    A worker that dies costs only the request it was running
    (:class:`WorkerCrashError`); one that runs past ``request_timeout_s`` is
    killed with its child processes (:class:`HandlerTimeoutError`); one whose
    RSS reaches ``max_worker_memory`` is replaced after its current requests.
    In each case the pool is rebuilt or refilled and every other request is
    answered, some after running again.

    Requests whose worker died are not retried; the others are, so a
    handler may run twice for one request when a neighbour crashes.

    Thread safety: :meth:`start` and :meth:`shutdown` are called by the
    server's thread, :meth:`submit` by the I/O thread (it never blocks), and
    :meth:`stats` by any thread. Futures are resolved on the I/O thread once
    :meth:`attach` was called, else on the supervisor thread.

    Args:
        handler: the server object; it must pickle (with cloudpickle, so a
            class defined in ``__main__`` works).
        workers: number of worker processes, at least 1 (see
            :func:`resolve_worker_count`).
        request_timeout_s: seconds a handler may run, ``None`` for no limit.
        max_worker_memory: RSS in bytes past which a worker is recycled,
            ``None`` for no limit.

    Raises:
        ValueError: an argument is out of range.
    """

    times_requests_out = True

    def __init__(
        self,
        handler: Handler,
        workers: int,
        *,
        request_timeout_s: float | None,
        max_worker_memory: int | None,
    ) -> None:
        _check_options(workers, request_timeout_s, max_worker_memory)
        self._handler = handler
        self._workers = workers
        self._timeout_s = request_timeout_s
        self._max_rss = max_worker_memory
        self._sizing = _TaskSizing()
        self._lock = threading.Lock()  # the requests, the links and the counters
        self._ids = itertools.count()
        self._waiting: deque[_Request] = deque()
        self._counts = dict.fromkeys(_STATS_COUNTERS, 0)
        self._refusal: str | None = None
        self._wakeup = _Wakeup()
        self._selector = selectors.DefaultSelector()
        self._listener: Listener | None = None
        self._token = secrets.token_hex(16)
        self._generations = itertools.count(1)
        self._payload = b""
        self._pool: _Pool | None = None
        self._supervisor: threading.Thread | None = None
        self._loop: LoopHooks | None = None
        self._wake_for_writes = False
        self._closing = False
        self._closed = False
        self._futile_rebuilds = 0

    # -- the Dispatcher interface ----------------------------------------------------------

    def start(self) -> None:
        """Pickle the handler, start every worker and wait until each has loaded it.

        Raises:
            PoolStartError: the handler does not pickle, a worker could not
                unpickle it, or the workers did not start in time.
        """
        if self._listener is not None:
            raise RuntimeError("start() was already called")
        self._payload = _pickle_handler(self._handler)
        self._listener = Listener()
        self._selector.register(self._listener.sock, selectors.EVENT_READ, self._accept)
        self._selector.register(self._wakeup.reader, selectors.EVENT_READ, self._on_wakeup)
        try:
            pool = self._pool = self._open_pool()
            self._wait_until_ready(pool)
        except BaseException:
            self._close_everything()
            raise
        self._warn_if_memory_cap_is_too_low(pool)
        self._supervisor = threading.Thread(
            target=self._supervise, name="mpreqrep-pool-supervisor", daemon=True
        )
        self._supervisor.start()

    def attach(self, loop: LoopHooks) -> None:
        """Read the workers' replies on the I/O thread from now on.

        Saves the hop through the supervisor thread on every reply. The
        supervisor hands each channel over and takes it back to close it.
        """
        self._loop = loop
        self._wakeup.set()

    def submit(self, request: str) -> Future[str]:
        """Send one request to a worker with room, or queue it; never blocks.

        Returns:
            A future of the reply. It fails with the handler's error, with
            :class:`WorkerCrashError` or :class:`HandlerTimeoutError`, or
            with ``RuntimeError`` once the dispatcher is shut down.
        """
        future: Future[str] = Future()
        with self._lock:
            refusal = self._refusal
            if refusal is None:
                wake = self._dispatch_or_queue(_Request(next(self._ids), request, future))
        if refusal is not None:
            future.set_exception(RuntimeError(refusal))
        elif wake:
            self._wakeup.set()
        return future

    def shutdown(self) -> None:
        """Answer every request taken, then stop the workers; idempotent.

        Waits for running handlers (the timeout, if any, still applies). No
        worker process is left afterwards.
        """
        with self._lock:
            self._refusal = self._refusal or "the process pool dispatcher is shut down"
        self._closing = True
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            self._wakeup.set()
            supervisor.join()
        self._close_everything()

    def stats(self) -> dict[str, Any]:
        """Pool health and one entry per live worker (any thread).

        Returns:
            ``crashed``, ``timed_out``, ``abandoned`` (requests failed after
            breaking the pool twice), ``resubmitted``, ``pool_rebuilds``,
            ``recycled`` (workers replaced for memory), ``batches`` (frames
            of requests sent to workers), ``in_flight``, ``waiting`` and
            ``workers``: a list of ``{pid, rss, cpu_percent, served}``.
        """
        with self._lock:
            links = list(self._pool.links.values()) if self._pool is not None else []
            figures: dict[str, Any] = {
                **self._counts,
                "in_flight": sum(len(link.in_flight) for link in links),
                "waiting": len(self._waiting),
            }
            infos = [(link.pid, link.process, link.served) for link in links]
        figures["workers"] = [entry for entry in map(_describe_worker, infos) if entry]
        return figures

    # -- dispatching (the lock held) -------------------------------------------------------

    def _dispatch_or_queue(self, request: _Request) -> bool:
        """Send a new request to the least busy worker with room, else queue it.

        Returns:
            Whether the supervisor must be woken: it watches a new deadline
            or unsent bytes, or no reply is due that would make it dispatch.
        """
        link = None if self._waiting else self._least_busy_link()
        if link is None:
            self._waiting.append(request)
            return not any(link.in_flight for link in self._links())
        if not _claim(request):
            return False
        self._send(link, [request])
        return self._timeout_s is not None or link.channel.has_outbox

    def _top_up(self) -> None:
        """Share the waiting requests among the workers with room, a frame each."""
        links = self._links()
        while self._waiting:
            link = self._least_busy_link()
            if link is None:
                return
            room = self._sizing.depth() - len(link.in_flight)
            share = min(room, -(-len(self._waiting) // len(links)))  # ceil
            batch = self._take_waiting(share)
            if batch:
                self._send(link, batch)

    def _take_waiting(self, count: int) -> list[_Request]:
        """Up to ``count`` waiting requests, oldest first, cancelled ones dropped."""
        batch: list[_Request] = []
        while self._waiting and len(batch) < count:
            request = self._waiting.popleft()
            if _claim(request):
                batch.append(request)
        return batch

    def _send(self, link: _Link, batch: list[_Request]) -> None:
        """Write one frame of requests to a worker; the first may start at once."""
        if not link.in_flight:
            self._start_clock(batch[0])
        link.in_flight.extend(batch)
        link.channel.send(encode_frame([(request.request_id, request.text) for request in batch]))
        self._counts["batches"] += 1
        if link.channel.has_outbox:
            self._wake_for_writes = True

    def _start_clock(self, request: _Request) -> None:
        """The request is now its worker's oldest: its handler runs, its deadline counts."""
        if self._timeout_s is not None:
            request.deadline = time.monotonic() + self._timeout_s

    def _least_busy_link(self) -> _Link | None:
        """The worker with the fewest requests in flight, if one has room."""
        depth = self._sizing.depth()
        best: _Link | None = None
        for link in self._links():
            load = len(link.in_flight)
            usable = not (link.retiring or link.ended)
            if load < depth and usable and (best is None or load < len(best.in_flight)):
                best = link
        return best

    def _links(self) -> Collection[_Link]:
        """The links of the current pool, none while it is broken."""
        pool = self._pool
        if pool is None or pool.broken is not None:
            return ()
        return pool.links.values()

    # -- start-up ------------------------------------------------------------------------

    def _open_pool(self) -> _Pool:
        """A new pool whose workers are spawning, each to serve one channel."""
        assert self._listener is not None, "pools open only after start()"
        generation = next(self._generations)
        initargs = (self._payload, self._listener.address, self._token, generation, self._max_rss)
        pool = _Pool.open(initargs, self._workers, generation)
        try:
            for _ in range(self._workers):
                self._start_channel_task(pool)
        except BaseException:  # e.g. no process could be spawned: leave none behind
            pool.close()
            raise
        return pool

    def _wait_until_ready(self, pool: _Pool) -> None:
        """Wait until every worker connected its channel."""
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while pool.ready_count < self._workers:
            if pool.broken is not None:
                raise PoolStartError("a worker process died while starting") from pool.broken
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PoolStartError(
                    f"the worker processes did not start within {WORKER_START_TIMEOUT_S} s"
                )
            self._handle_events(remaining)

    def _warn_if_memory_cap_is_too_low(self, pool: _Pool) -> None:
        """Warn when a fresh worker already uses ``max_worker_memory``."""
        with self._lock:
            infos = [(link.pid, link.process, link.served) for link in pool.links.values()]
        sizes = [entry["rss"] for entry in map(_describe_worker, infos) if entry]
        if self._max_rss is not None and max(sizes, default=0) >= self._max_rss:
            logger.warning(
                "max_worker_memory (%d bytes) is below a fresh worker's RSS (%d bytes): "
                "every worker will be replaced after each request",
                self._max_rss,
                max(sizes),
            )

    # -- the supervisor thread -----------------------------------------------------------

    def _supervise(self) -> None:
        """Run the supervisor until shut down and idle; on a bug, fail every request."""
        try:
            while True:
                broken = self._tend()
                if self._closing and self._idle():
                    return
                self._handle_events(0.0 if broken else self._seconds_to_next_deadline())
        except Exception as exc:
            logger.exception("the process pool supervisor failed; failing every request")
            self._fail_all(exc)

    def _tend(self) -> bool:
        """One pass: a broken pool, deadlines, retired workers, channel tasks, top-ups.

        Returns:
            Whether the pool broke meanwhile (then the next pass must not wait).
        """
        pool = self._pool
        assert pool is not None, "the supervisor runs only once a pool is open"
        if pool.broken is not None:
            pool = self._recover(pool)
        self._expire_deadlines(pool)
        with self._lock:
            self._wake_for_writes = False
            retired = [link for link in pool.links.values() if link.retiring and not link.in_flight]
            for link in retired:
                del pool.links[link.pid]
            self._top_up()
        for link in retired:  # closing its channel ends its worker's task
            self._close_link(link)
        for link in list(pool.links.values()):
            if link.ended:
                self._close_link(link)
            else:
                self._update_watch(link)
        if not self._closing:
            while pool.broken is None and pool.running_tasks() < self._workers:
                self._start_channel_task(pool)
        return pool.broken is not None

    def _update_watch(self, link: _Link) -> None:
        """Watch an open channel where it belongs: its replies on the I/O loop once
        attached, else here; room to write here while bytes wait to be sent."""
        if link.channel.closed or link.ended:
            return
        loop = self._loop
        if loop is not None and not link.on_loop:
            link.on_loop = True  # before the loop can look at it
            link.on_loop = loop.call_soon(functools.partial(self._watch_on_loop, link))
        events = 0 if link.on_loop else selectors.EVENT_READ
        if link.channel.has_outbox:
            events |= selectors.EVENT_WRITE
        self._set_events(link, events)

    def _set_events(self, link: _Link, events: int) -> None:
        """Make the supervisor's selector watch ``events`` of a channel (0: nothing)."""
        if events == link.events:
            return
        callback = functools.partial(self._on_link, link)
        if not link.events:
            self._selector.register(link.channel, events, callback)
        elif not events:
            self._selector.unregister(link.channel)
        else:
            self._selector.modify(link.channel, events, callback)
        link.events = events

    def _watch_on_loop(self, link: _Link) -> None:
        """Have the I/O loop read a channel's replies (I/O thread)."""
        loop = self._loop
        assert loop is not None, "channels go to the loop only once attached"
        if link.on_loop and not link.channel.closed:
            loop.add_reader(link.channel, functools.partial(self._read_on_loop, link))

    def _read_on_loop(self, link: _Link) -> None:
        """Read replies on the I/O thread; wake the supervisor when it has work."""
        try:
            self._read_link(link)
        except Exception as exc:  # a bug: the supervisor rebuilds the pool
            logger.exception("reading worker %d's replies failed", link.pid)
            pool = self._pool
            if pool is not None:
                pool.mark_broken(exc, None)
            self._wakeup.set()
            return
        if self._timeout_s is not None or self._wake_for_writes or link.retiring or link.ended:
            self._wakeup.set()

    def _take_back(self, links: list[_Link]) -> None:
        """Stop the I/O loop reading these channels; returns once it has."""
        moved = [link for link in links if link.on_loop]
        loop = self._loop
        if not moved or loop is None:
            return
        released = threading.Event()

        def release() -> None:
            for link in moved:
                loop.remove_reader(link.channel)
            released.set()

        if not loop.call_soon(release):  # the loop has stopped: nobody else reads
            release()
        released.wait()
        for link in moved:
            link.on_loop = False

    def _handle_events(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds for news and act on each."""
        for key, mask in self._selector.select(timeout):
            key.data(mask)

    def _on_wakeup(self, mask: int) -> None:
        """Another thread woke the supervisor: the next pass looks at the state."""
        self._wakeup.clear()

    def _accept(self, mask: int) -> None:
        """Take every connected channel; each is known once it says hello."""
        assert self._listener is not None, "accepting only while the listener is open"
        while (channel := self._listener.accept()) is not None:
            self._selector.register(
                channel, selectors.EVENT_READ, functools.partial(self._greet, channel)
            )

    def _greet(self, channel: Channel, mask: int) -> None:
        """Read a new channel's first frame: a worker's hello, or why it could not load.

        Raises:
            PoolStartError: a worker of the current pool could not load the handler.
        """
        payloads = channel.receive()
        if payloads == []:
            return
        self._selector.unregister(channel)
        token = self._token.encode()
        payload = payloads[0] if payloads else b""
        message = None
        if hmac.compare_digest(payload[: len(token)], token):  # only then unpickle
            message = pickle.loads(payload[len(token) :])
        pool = self._pool
        current = pool is not None and getattr(message, "generation", None) == pool.generation
        if isinstance(message, InitFailed) and current:
            channel.close()
            raise PoolStartError(
                f"worker {message.pid} could not load the handler:\n{message.traceback}"
            )
        if not (isinstance(message, Hello) and current and pool is not None):
            channel.close()  # a stray, or a worker of a pool given up
            return
        self._add_link(pool, channel, message.pid)

    def _add_link(self, pool: _Pool, channel: Channel, pid: int) -> None:
        """Register a worker that loaded its handler and serves its channel."""
        try:
            process = psutil.Process(pid)
        except psutil.NoSuchProcess:  # died already: the pool breaks next
            process = None
        link = _Link(channel, pid, process)
        with self._lock:
            pool.links[pid] = link
            pool.ready_count += 1
            if pool.ready_count > self._workers:
                self._counts["recycled"] += 1
                logger.info("worker %d started in place of a recycled worker", pid)
            self._top_up()
        self._update_watch(link)

    def _on_link(self, link: _Link, mask: int) -> None:
        """A worker's channel is readable (replies, end of stream) or writable."""
        if mask & selectors.EVENT_WRITE:
            with self._lock:
                link.channel.flush()
        if mask & selectors.EVENT_READ:
            self._read_link(link)

    def _read_link(self, link: _Link) -> None:
        """Settle the replies a worker sent; at end of stream, stop watching it."""
        payloads = link.channel.receive()
        if payloads is None:  # the worker died: the pool breaks and is rebuilt
            link.ended = True
            if link.on_loop:  # on the I/O thread
                assert self._loop is not None, "channels go to the loop only once attached"
                self._loop.remove_reader(link.channel)
            else:
                self._set_events(link, 0)
            return
        settled: list[tuple[_Request, Outcome]] = []
        with self._lock:
            for payload in payloads:
                head = link.in_flight[0] if link.in_flight else None
                message = _decode_reply(payload, head)
                if isinstance(message, Retiring):
                    link.retiring = True
                    logger.info("worker %d reached max_worker_memory; recycling it", link.pid)
                    continue
                if head is None or head.request_id != message.request_id:
                    continue  # the reply of a request timed out meanwhile
                link.in_flight.popleft()
                link.served += 1
                settled.append((head, message))
                if link.in_flight:
                    self._start_clock(link.in_flight[0])
            self._top_up()
        for request, outcome in settled:
            _resolve(request.future, outcome)
        self._sizing.observe([outcome for _, outcome in settled])

    def _start_channel_task(self, pool: _Pool) -> None:
        """Give the pool one more ``serve_channel`` task; a refusal marks it broken."""
        try:
            task = pool.start_channel_task()
        except BrokenProcessPool as exc:
            pool.mark_broken(exc, None)
            return
        task.add_done_callback(functools.partial(self._on_channel_task_done, pool))

    def _expire_deadlines(self, pool: _Pool) -> None:
        """Fail the requests that ran past the timeout and kill their workers."""
        now = time.monotonic()
        expired: list[tuple[_Link, _Request]] = []
        with self._lock:
            for link in pool.links.values():
                head = link.in_flight[0] if link.in_flight else None
                expires = head is not None and head.deadline is not None and head.deadline <= now
                if expires and link.pid not in pool.killed:
                    expired.append((link, link.in_flight.popleft()))
            self._counts["timed_out"] += len(expired)
        for link, request in expired:
            logger.warning(
                "request %d ran past %s s in worker %d; killing the worker",
                request.request_id,
                self._timeout_s,
                link.pid,
            )
            pool.kill_worker(link)
            request.future.set_exception(
                HandlerTimeoutError(f"handle_request ran past {self._timeout_s} s")
            )

    def _seconds_to_next_deadline(self) -> float | None:
        """Seconds until the earliest deadline of a running request, ``None`` if none."""
        with self._lock:
            pool = self._pool
            links = pool.links.values() if pool is not None else ()
            deadlines = [
                deadline
                for link in links
                if link.in_flight and (deadline := link.in_flight[0].deadline) is not None
            ]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _idle(self) -> bool:
        """Whether no request is waiting or in flight."""
        with self._lock:
            pool = self._pool
            links = pool.links.values() if pool is not None else ()
            return not self._waiting and not any(link.in_flight for link in links)

    # -- recovery ------------------------------------------------------------------------

    def _recover(self, broken: _Pool) -> _Pool:
        """Replace a broken pool; fail its culprits and resubmit everyone else.

        Raises:
            PoolStartError: workers keep dying before they load the handler.
        """
        links = list(broken.links.values())
        self._take_back(links)
        for link in links:  # what the workers sent before the end
            if not (link.channel.closed or link.ended):
                self._read_link(link)
        self._check_progress(broken)
        for link in links:
            self._close_link(link)
        broken.close()
        fresh = self._open_pool()
        with self._lock:
            self._pool = fresh
            verdict = _judge(broken, links)
            self._requeue(verdict.retry)
            self._counts["pool_rebuilds"] += 1
        self._fail_culprits(broken, verdict)
        logger.warning(
            "the process pool broke (%s); started a new one and resubmitted %d requests",
            type(broken.broken).__name__,
            len(verdict.retry),
        )
        return fresh

    def _close_link(self, link: _Link) -> None:
        """Stop watching a channel and close it (not on the I/O thread)."""
        if link.channel.closed:
            return
        self._take_back([link])
        self._set_events(link, 0)
        with self._lock:  # submit() may be sending on it
            link.channel.close()

    def _requeue(self, requests: list[_Request]) -> None:
        """Put requests lost with a broken pool back at the front of the queue."""
        for request in sorted(requests, key=lambda request: request.request_id, reverse=True):
            request.deadline = None
            self._waiting.appendleft(request)
        self._counts["resubmitted"] += len(requests)

    def _check_progress(self, broken: _Pool) -> None:
        """Give up after :data:`MAX_FUTILE_REBUILDS` pools in a row with no ready worker."""
        self._futile_rebuilds = 0 if broken.ready_count else self._futile_rebuilds + 1
        if self._futile_rebuilds >= MAX_FUTILE_REBUILDS:
            raise PoolStartError(
                f"{self._futile_rebuilds} pools in a row broke before a worker loaded the handler"
            ) from broken.broken

    def _fail_culprits(self, broken: _Pool, verdict: _Verdict) -> None:
        """Fail the requests whose worker died, and those that broke the pool twice."""
        for request, pid in verdict.culprits:
            logger.error("worker %d died running request %d", pid, request.request_id)
            _fail_with(request, WorkerCrashError("the worker process died"), broken.broken)
        for request in verdict.abandoned:
            logger.error("request %d broke the pool twice; giving up", request.request_id)
            _fail_with(request, WorkerCrashError("the request broke the pool twice"), broken.broken)
        with self._lock:
            self._counts["crashed"] += len(verdict.culprits)
            self._counts["abandoned"] += len(verdict.abandoned)

    def _fail_all(self, error: Exception) -> None:
        """Fail every outstanding request and refuse new ones (the supervisor died)."""
        with self._lock:
            self._refusal = self._refusal or "the process pool supervisor failed"
            pool = self._pool
            links = pool.links.values() if pool is not None else ()
            requests = [*(r for link in links for r in link.in_flight), *self._waiting]
            for link in links:
                link.in_flight.clear()
            self._waiting.clear()
        for request in requests:
            failure = RuntimeError("the process pool supervisor failed")
            failure.__cause__ = error
            with contextlib.suppress(InvalidStateError):  # its owner cancelled it
                request.future.set_exception(failure)

    def _close_everything(self) -> None:
        """Close the channels, the pool, the listener and the wake-up pipe; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:  # a worker connecting from now on fails and ends
            self._listener.close()
        for link in list(self._pool.links.values()) if self._pool is not None else []:
            self._close_link(link)
        with self._lock:
            for key in list(self._selector.get_map().values()):
                if isinstance(key.fileobj, Channel):  # a link, or one not greeted yet
                    key.fileobj.close()  # its worker's task ends
        if self._pool is not None:
            self._pool.close()
        self._selector.close()
        self._wakeup.close()

    # -- loky's manager thread -----------------------------------------------------------

    def _on_channel_task_done(self, pool: _Pool, task: Future[tuple[int, bool]]) -> None:
        """A channel task ended: its worker retired, or the pool broke."""
        pool.channel_task_done()
        error = task.exception()
        if error is not None:
            if not isinstance(error, BrokenProcessPool) and not self._closing:
                logger.error("a worker's channel failed; rebuilding the pool", exc_info=error)
            alive = None if pool.alive_at_break is not None else _live_child_pids()
            pool.mark_broken(error, alive)
        self._wakeup.set()


class _TaskSizing:
    """How many requests to keep in flight on each worker.

    Light handlers (under :data:`LIGHT_HANDLER_S`) get up to
    :data:`MAX_BATCH_SIZE`, so the requests that arrive while a worker is busy
    travel to it together: the hop is paid per frame, not per request. Heavy
    handlers get :data:`HEAVY_DEPTH`, so a worker never idles waiting for its
    next request and the work stays spread over all workers. Until the first
    reply is measured, handlers count as heavy.
    """

    def __init__(self) -> None:
        self._handler_s: float | None = None

    def observe(self, outcomes: list[Outcome]) -> None:
        """Fold the handler times of new replies into the moving average."""
        if not outcomes:
            return
        mean_s = sum(outcome.elapsed_s for outcome in outcomes) / len(outcomes)
        previous = self._handler_s
        self._handler_s = (
            mean_s if previous is None else previous + HANDLER_TIME_SMOOTHING * (mean_s - previous)
        )

    def is_light(self) -> bool:
        """Whether the handler is fast enough to batch."""
        return self._handler_s is not None and self._handler_s < LIGHT_HANDLER_S

    def depth(self) -> int:
        """Requests to keep in flight on one worker."""
        return MAX_BATCH_SIZE if self.is_light() else HEAVY_DEPTH


def resolve_worker_count(workers: int | str | None) -> int:
    """The number of worker processes that ``workers`` asks for.

    Args:
        workers: an int >= 1, a string of one, or ``"auto"`` (or ``None``)
            for the number of physical cores (logical ones if psutil cannot
            tell, at least 1).

    Returns:
        The worker count, at least 1.

    Raises:
        ValueError: ``workers`` is below 1, not a whole number, or a string
            other than ``"auto"`` or digits.
    """
    if workers is None or workers == "auto":
        return int(psutil.cpu_count(logical=False) or psutil.cpu_count() or 1)
    if isinstance(workers, str):
        try:
            count = int(workers)
        except ValueError as exc:
            raise ValueError(f'workers must be an int >= 1 or "auto", not {workers!r}') from exc
    elif isinstance(workers, int) and not isinstance(workers, bool):
        count = workers
    else:
        raise ValueError(f'workers must be an int >= 1 or "auto", not {workers!r}')
    if count < 1:
        raise ValueError(f"workers must be at least 1, not {count}")
    return count


def _check_options(
    workers: int, request_timeout_s: float | None, max_worker_memory: int | None
) -> None:
    """Reject a worker count, timeout or memory cap that is out of range."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    if request_timeout_s is not None and request_timeout_s <= 0:
        raise ValueError(f"request_timeout_s must be positive, not {request_timeout_s}")
    if max_worker_memory is not None and max_worker_memory <= 0:
        raise ValueError(f"max_worker_memory must be positive, not {max_worker_memory}")


def _pickle_handler(handler: Handler) -> bytes:
    """Pickle the handler once, with cloudpickle (via loky), for every worker."""
    try:
        return bytes(loky_dumps(handler))
    except Exception as exc:
        raise PoolStartError(
            f"cannot copy {type(handler).__qualname__} to the worker processes: {exc}"
        ) from exc


def _judge(pool: _Pool, links: list[_Link]) -> _Verdict:
    """Split the requests on the channels of a broken pool into culprits, given-up
    ones and retries, emptying the channels' books.

    The oldest request on a channel was running when the pool broke. One
    running in a worker that died on its own is a culprit. When no worker
    explains the break, each running request counts an unexplained break,
    and fails at :data:`MAX_UNEXPLAINED_BREAKS`; every other request is retried.
    """
    culprits: list[tuple[_Request, int]] = []
    abandoned: list[_Request] = []
    retry: list[_Request] = []
    explained = bool(pool.killed) or any(
        link.in_flight and pool.died_on_its_own(link.pid) for link in links
    )
    for link in links:
        for index, request in enumerate(link.in_flight):
            running = index == 0
            if running and pool.died_on_its_own(link.pid):
                culprits.append((request, link.pid))
                continue
            if running and not explained:
                request.unexplained_breaks += 1
            given_up = request.unexplained_breaks >= MAX_UNEXPLAINED_BREAKS
            (abandoned if given_up else retry).append(request)
        link.in_flight.clear()
    return _Verdict(culprits, abandoned, retry)


def _claim(request: _Request) -> bool:
    """Mark a request as handed to a worker; ``False`` if it was cancelled while waiting."""
    if not request.dispatched:
        request.dispatched = request.future.set_running_or_notify_cancel()
    return request.dispatched


def _decode_reply(payload: bytes, head: _Request | None) -> Outcome | Retiring:
    """A worker's message; one that does not unpickle fails the request it answers."""
    try:
        message: Outcome | Retiring = pickle.loads(payload)
    except Exception as exc:
        request_id = head.request_id if head is not None else -1
        return Outcome(request_id, error=RuntimeError(f"cannot read the worker's reply: {exc!r}"))
    return message


def _resolve(future: Future[str], outcome: Outcome) -> None:
    """Set a future from a worker's outcome, chaining the remote traceback."""
    if outcome.error is None:
        future.set_result(outcome.reply)
        return
    if outcome.traceback:
        outcome.error.__cause__ = _RemoteTraceback(outcome.traceback)
    future.set_exception(outcome.error)


def _fail_with(request: _Request, error: BaseException, cause: BaseException | None) -> None:
    """Fail a request's future with ``error``, caused by ``cause``."""
    error.__cause__ = cause
    request.future.set_exception(error)


def _live_child_pids() -> frozenset[int]:
    """Pids of this process's children that are still running (zombies excluded)."""
    live: set[int] = set()
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.NoSuchProcess):  # it exited meanwhile: not live
            if child.status() != psutil.STATUS_ZOMBIE:
                live.add(child.pid)
    return frozenset(live)


def _kill_process_tree(process: Any) -> None:
    """SIGKILL a process and its descendants, deepest first (as loky's kill_process_tree)."""
    try:
        family = [*reversed(process.children(recursive=True)), process]
    except psutil.NoSuchProcess:  # already gone
        return
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()


def _describe_worker(info: tuple[int, Any, int]) -> dict[str, Any] | None:
    """``{pid, rss, cpu_percent, served}`` of a worker, ``None`` if it is gone."""
    pid, process, served = info
    if process is None:
        return None
    try:
        with process.oneshot():
            rss = int(process.memory_info().rss)
            cpu_percent = float(process.cpu_percent(interval=None))
    except psutil.NoSuchProcess:
        return None
    return {"pid": pid, "rss": rss, "cpu_percent": cpu_percent, "served": served}
