"""The requests of one pool and the channels they travel on, behind one lock.

Wraps the sans-I/O :class:`~._book.Book` with what it leaves out: the
futures, the request texts, the channel of each worker and the frames
written to them. Frames are written while the lock is held, so the order
in which the book hands requests to a worker is the order the worker reads
them, whichever thread sends. Futures are resolved after the lock is
released. Knows nothing of processes or the supervisor: it is told which
worker joined or was lost, and which loop hosts the channels, where the
timer of the request deadlines runs (:class:`~._expiry.DeadlineTimer`):
when it comes due, the requests past their deadline fail there and their
workers' pids go to ``kill``.

Once the I/O loop serves (:meth:`Requests.send_once_per_pass`), what its
thread submits and settles is sent at the end of a pass, in one top-up: one
write per worker, made once no event waits (at the latest a few passes on,
see :mod:`mpreqrep._reactor`), just before the loop waits again; workers
still busy get their next requests before they run dry (so they read them
without sleeping). Everywhere else a request goes out at once. A request's future is marked
running as the request is handed to a worker; one cancelled before that is
never sent (as with an executor's call that had not started)::

    I/O thread: submit ─▶ book.queue ─┐         settle ─▶ book.settle
                                      ▼                     │
                end of pass: book.top_up ─▶ a frame per worker with room
                                              (and the deadline timer, if it moved)
    host thread, at the earliest deadline: book.expire ─▶ HandlerTimeoutError,
                                              kill(their workers' pids)
"""

from __future__ import annotations

import itertools
import logging
import pickle
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, InvalidStateError
from typing import Any, NamedTuple

from .._channel import Channel, encode_frame
from .._dispatch import LoopHooks
from .._worker import Outcome, Retiring
from ._book import Book, Send
from ._errors import HandlerTimeoutError, RemoteTraceback, WorkerCrashError, WorkerStartError
from ._expiry import DeadlineTimer

logger = logging.getLogger("mpreqrep")


class _Pending(NamedTuple):
    """A request from ``submit`` until its future is resolved."""

    text: str
    future: Future[str]


class Replies(NamedTuple):
    """What a batch of a worker's messages changed for that worker."""

    retiring: bool
    """It said it reached the memory cap (it serves on until the supervisor retires it)."""
    retired: bool
    """It is retiring and has nothing left to do: close its channel."""


class Requests:
    """Pending requests, the book and the workers' channels (thread-safe).

    Args:
        timeout_s: the request timeout, or ``None``.
        host: the loop that hosts the channels first (the deadline timer runs there).
        flush_soon: asks the supervisor to send what a channel could not take.
        kill: asks the supervisor to kill the workers (pids) whose request timed out.
    """

    def __init__(
        self,
        timeout_s: float | None,
        *,
        host: LoopHooks,
        flush_soon: Callable[[Channel], None],
        kill: Callable[[list[int]], None],
    ) -> None:
        self._timeout_s = timeout_s
        self._flush_soon = flush_soon
        self._kill = kill
        self._timer = DeadlineTimer(host, self._expire)
        self._lock = threading.Lock()
        self._book = Book(timeout_s, self._claim)
        self._pending: dict[int, _Pending] = {}
        self._channels: dict[int, Channel] = {}
        self._ids = itertools.count()
        self._counts = dict.fromkeys(("crashed", "timed_out", "shed"), 0)
        self._refusal: str | None = None
        self._pass_thread: int | None = None
        self._at_end_of_pass: Callable[[Callable[[], None]], bool] | None = None
        self._top_up_due = False

    def send_once_per_pass(self, call_soon: Callable[[Callable[[], None]], bool]) -> None:
        """Gather what this thread (a loop's) submits and settles into one top-up
        per pass; ``call_soon`` queues it for the end of the pass, and returns
        ``False`` once the loop has ended (then requests go out at once again)."""
        self._pass_thread = threading.get_ident()
        self._at_end_of_pass = call_soon

    # -- from the I/O thread ----------------------------------------------------------------

    def submit(self, text: str) -> Future[str]:
        """A future of the reply to ``text``, sent to a worker with room or queued."""
        future: Future[str] = Future()
        with self._lock:
            refusal = self._refusal
            if refusal is None:
                request_id = next(self._ids)
                self._pending[request_id] = _Pending(text, future)
                if self._gathering():
                    self._book.queue(request_id)
                else:
                    self._send(self._book.submit(request_id, self._now()))
                    self._watch_deadline()
        if refusal is not None:
            future.set_exception(RuntimeError(refusal))
        return future

    # -- from a channel's host --------------------------------------------------------------

    def settle(self, pid: int, payloads: list[bytes]) -> Replies:
        """Resolve the futures of a worker's replies and top the workers up."""
        resolved: list[tuple[Future[str], str | Outcome]] = []
        retiring = retired = False
        with self._lock:
            now = self._now()
            book, pending = self._book, self._pending
            outcome: str | Outcome
            for payload in payloads:
                message = _decode(payload) or _undecodable(book.running(pid))
                if isinstance(message, Outcome):
                    request_id, outcome, elapsed_s = message.request_id, message, message.elapsed_s
                elif isinstance(message, Retiring):
                    retiring = True
                    continue
                else:  # a reply, the common case, settled as it came (no Outcome made)
                    request_id, outcome, elapsed_s = message
                settled = book.settle(pid, request_id, elapsed_s, now)
                entry = pending.pop(request_id, None) if settled.deliver else None
                if entry is not None:
                    resolved.append((entry.future, outcome))
                retired |= settled.retired
            if not (book.waiting() and self._gathering()):
                self._send(book.top_up(now))
            self._watch_deadline()
        for future, result in resolved:
            _resolve(future, result)
        return Replies(retiring, retired)

    def lose(self, pid: int) -> None:
        """A worker is gone: close its channel, fail its running request, resend the rest."""
        with self._lock:
            channel = self._channels.pop(pid, None)
            if channel is None:  # lost already
                return
            channel.close()
            loss = self._book.lose(pid, self._now())
            self._send(loss.sends)
            victim = None if loss.running is None else self._pending.pop(loss.running, None)
            self._counts["crashed"] += victim is not None
            self._watch_deadline()
        if victim is not None:
            logger.error("worker %d died running a request", pid)
            _fail(victim.future, WorkerCrashError("the worker process died running this request"))
        if loss.resent:
            logger.info("%d requests queued on worker %d go to others", len(loss.resent), pid)

    def retire(self, pid: int) -> bool:
        """Send worker ``pid`` nothing more; whether it is idle (or gone) already."""
        with self._lock:
            return pid not in self._channels or self._book.retire(pid)

    def close(self, channel: Channel) -> None:
        """Close a channel (its worker exits); the worker stays in the book until lost."""
        with self._lock:
            channel.close()

    # -- from the supervisor ----------------------------------------------------------------

    def join(self, pid: int, channel: Channel) -> None:
        """A worker is ready: its channel carries requests from now on."""
        with self._lock:
            self._channels[pid] = channel
            self._send(self._book.add_worker(pid, self._now()))
            self._watch_deadline()

    def rehost(self, host: LoopHooks) -> None:
        """The channels moved to ``host``: the deadline timer runs there from now on."""
        with self._lock:
            self._timer.rehost(host, self._book.next_deadline())

    def shed(self) -> None:
        """Fail the waiting requests: no worker is alive and none could start."""
        with self._lock:
            taken = [self._pending.pop(rid) for rid in self._book.shed_waiting()]
            shed = [entry for entry in taken if not entry.future.cancelled()]
            self._counts["shed"] += len(shed)
        if shed:
            logger.error("no worker could start: %d waiting requests fail", len(shed))
        for entry in shed:
            _fail(entry.future, WorkerStartError("no worker process could be started"))

    def flush(self, channel: Channel) -> bool:
        """Write a channel's unsent bytes; whether some still wait."""
        with self._lock:
            channel.flush()
            return channel.has_outbox

    def is_idle(self) -> bool:
        """Whether no request is waiting or on a worker."""
        with self._lock:
            return self._book.is_idle()

    # -- from the server's thread -----------------------------------------------------------

    def refuse(self, reason: str) -> None:
        """Fail every new request with ``RuntimeError(reason)`` from now on."""
        with self._lock:
            self._refusal = self._refusal or reason

    def abandon(self, reason: str) -> None:
        """Fail every request, refuse new ones and send nothing more to any worker (the
        graceful timeout passed: the workers are about to be killed)."""
        with self._lock:
            self._refusal = self._refusal or reason
            for pid in self._channels:
                self._book.retire(pid)  # what their loss hands back stays in the book
            self._book.shed_waiting()
        self.fail_all(reason)

    def fail_all(self, reason: str) -> None:
        """Fail whatever is still pending (the workers are gone for good)."""
        with self._lock:
            left = list(self._pending.values())
            self._pending.clear()
        for entry in left:
            _fail(entry.future, RuntimeError(reason))

    def served(self, pid: int) -> int:
        """The replies worker ``pid`` gave."""
        with self._lock:
            return self._book.served(pid)

    def figures(self, pids: Iterable[int]) -> tuple[dict[str, Any], dict[int, int]]:
        """The counters, and the replies each of ``pids`` gave (any thread)."""
        with self._lock:
            book = self._book
            figures: dict[str, Any] = {
                **self._counts,
                "resent": book.resent,
                "cancelled": book.dropped,
                "batches": book.batches,
                "in_flight": book.in_flight(),
                "waiting": book.waiting(),
            }
            return figures, {pid: book.served(pid) for pid in pids}

    # -- at the end of the I/O loop's pass -------------------------------------------

    def _top_up_pass(self) -> None:
        """Send the requests gathered during the pass, a frame per worker with room."""
        with self._lock:
            self._top_up_due = False
            self._send(self._book.top_up(self._now()))
            self._watch_deadline()

    # -- on the channels' host, when the deadline timer comes due -------------------

    def _expire(self, timer: int) -> None:
        """Fail the requests that ran past the timeout and have their workers killed
        (a worker's too whose request was failed already: abandoned, say)."""
        with self._lock:
            if not self._timer.fired(timer):  # cancelled as it came due: not ours any more
                return
            expired = self._book.expire(self._now())
            failed = [entry for _, rid in expired if (entry := self._pending.pop(rid, None))]
            self._counts["timed_out"] += len(failed)
            self._watch_deadline()
        for pid, _ in expired:
            logger.warning("a request ran past %s s in worker %d; killing it", self._timeout_s, pid)
        for entry in failed:
            _fail(entry.future, HandlerTimeoutError(f"handle_request ran past {self._timeout_s} s"))
        if expired:
            self._kill([pid for pid, _ in expired])

    # -- helpers (the lock held) --------------------------------------------------------

    def _claim(self, request_id: int) -> bool:
        """Mark a request's future running as the book hands it to a worker (it may be
        resent, running already); ``False``, and forget it, if it was cancelled."""
        future = self._pending[request_id].future
        # Asked of a resent one, set_running_or_notify_cancel logs CRITICAL and raises.
        if future.running() or future.set_running_or_notify_cancel():
            return True
        del self._pending[request_id]
        return False

    def _gathering(self) -> bool:
        """Whether this thread's requests wait for the end of its loop's pass (the
        top-up is then queued there, once per pass)."""
        if threading.get_ident() != self._pass_thread:
            return False
        if not self._top_up_due:
            assert self._at_end_of_pass is not None, "set with the thread"
            if not self._at_end_of_pass(self._top_up_pass):  # the loop has ended
                self._pass_thread = None
                return False
            self._top_up_due = True
        return True

    def _send(self, sends: Iterable[Send]) -> None:
        """Write each frame of requests to its worker."""
        for send in sends:
            channel = self._channels[send.worker]
            pending = self._pending
            channel.send(encode_frame([(rid, pending[rid].text) for rid in send.request_ids]))
            if channel.has_outbox:
                self._flush_soon(channel)

    def _now(self) -> float:
        """The clock the book's deadlines and stall checks count on."""
        return time.monotonic()

    def _watch_deadline(self) -> None:
        """Set the deadline timer again if the earliest deadline moved earlier."""
        if self._timeout_s is not None:
            self._timer.moved(self._book.next_deadline())


Reply = tuple[int, str, float]
"""A worker's reply as it travels: ``(request_id, reply, elapsed_s)``, a plain tuple."""


def _decode(payload: bytes) -> Reply | Outcome | Retiring | None:
    """A worker's message, ``None`` if it does not unpickle."""
    try:
        message = pickle.loads(payload)
    except Exception:
        logger.exception("cannot read a worker's reply")
        return None
    assert type(message) is tuple or isinstance(message, (Outcome, Retiring)), "nothing else"
    return message


def _undecodable(running: int | None) -> Outcome:
    """The outcome of the request a reply that did not unpickle answers."""
    error = RuntimeError("cannot read the worker's reply")
    return Outcome(-1 if running is None else running, error=error)


def _resolve(future: Future[str], outcome: str | Outcome) -> None:
    """Set a future from a worker's reply, or from its outcome (chaining the remote
    traceback of an error)."""
    if isinstance(outcome, str):
        _set_result(future, outcome)
        return
    error = outcome.error
    if error is None:
        _set_result(future, outcome.reply)
        return
    if not isinstance(error, Exception):  # never hand the I/O loop a SystemExit
        error = RuntimeError(f"handle_request raised {type(error).__name__}: {error}")
    if outcome.traceback:
        error.__cause__ = RemoteTraceback(outcome.traceback)
    _fail(future, error)


def _set_result(future: Future[str], reply: str) -> None:
    """Set a future's reply unless its owner already finished it (a plain Future lets
    anyone)."""
    try:  # noqa: SIM105 - no context manager per reply on the I/O thread
        future.set_result(reply)
    except InvalidStateError:
        pass


def _fail(future: Future[str], error: Exception) -> None:
    """Fail a future unless its owner already gave up on it."""
    try:  # noqa: SIM105 - as in _resolve
        future.set_exception(error)
    except InvalidStateError:
        pass
