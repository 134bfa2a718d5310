"""The process-mode dispatcher: a thin shell around the book, the channels and the supervisor.

It turns ``submit(text)`` into a frame on a worker's channel and each reply
frame into a resolved future, asking :class:`~._book.Book` what goes where;
:class:`~._supervisor.Supervisor` keeps the processes alive. Each channel is
read by its host: the supervisor until the I/O loop attaches, the I/O loop
from then on, so a reply never changes thread::

    I/O thread (host)                                   worker process (x N)
    -----------------                                   --------------------
    submit(text) ─▶ book.submit ─▶ Send ─▶ frame [(id, text), ...] ─▶ in order
    future ◀── book.settle ◀── reply frame ◀── channel readable ◀─────┘
                                 └─▶ top-up Sends (batching)
    supervisor thread: worker_ready ─▶ book.add_worker, host the channel
                       worker_gone  ─▶ on the host: drain, book.lose:
                                       running request fails, the rest resent
                       expire       ─▶ book.expire: those requests fail,
                                       their workers are killed

The book, the futures and the links are guarded by one lock; no call into
the supervisor is made while holding it, except :meth:`Supervisor.wake` and
:meth:`Supervisor.flush_soon`, which take only the supervisor's own lock.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import pickle
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, NamedTuple

from loky.backend.reduction import dumps as loky_dumps

from .._channel import Channel, encode_frame
from .._dispatch import Dispatcher, Handler, LoopHooks
from .._worker import Outcome, Retiring
from ._book import Book, Send
from ._errors import (
    HandlerTimeoutError,
    PoolStartError,
    RemoteTraceback,
    WorkerCrashError,
    WorkerStartError,
)
from ._options import check_options
from ._process import WorkerProcess
from ._supervisor import Supervisor

logger = logging.getLogger("mpreqrep")


class _Pending(NamedTuple):
    """A request from ``submit`` until its future is resolved."""

    text: str
    future: Future[str]


@dataclass(eq=False)
class _Link:
    """A ready worker's channel and the thread that reads it (``host``)."""

    worker: WorkerProcess
    channel: Channel
    host: LoopHooks
    lost: bool = False


class ProcessPoolDispatcher(Dispatcher):
    """Runs ``handle_request`` on copies of the server in worker processes.

    Each worker unpickles the server once, when it starts, then serves a
    channel of its own: a request ships only its text and gets back only its
    reply; when many wait, several go to a worker in one frame. A worker
    that dies costs only the request it was running
    (:class:`WorkerCrashError`); one that runs past ``request_timeout_s``
    is killed with its child processes (:class:`HandlerTimeoutError`); one
    whose RSS reaches ``max_worker_memory`` is replaced after its current
    requests. Requests queued behind a lost worker's running one never
    started there: they go to the other workers, so none runs twice. Only
    the lost worker is replaced, in the background.

    Thread safety: :meth:`start` and :meth:`shutdown` are called by the
    server's thread, :meth:`submit` by the I/O thread (it never blocks), and
    :meth:`stats` by any thread. Futures are resolved on the I/O thread once
    :meth:`attach` was called, else on the supervisor thread.

    Args:
        handler: the server object; it must pickle (with cloudpickle, so a
            class defined in ``__main__`` works).
        workers: number of worker processes, at least 1.
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
        check_options(workers, request_timeout_s, max_worker_memory)
        self._handler = handler
        self._timeout_s = request_timeout_s
        self._max_rss = max_worker_memory
        self._lock = threading.Lock()  # the book, the pending requests, the links, the counts
        self._book = Book(request_timeout_s)
        self._pending: dict[int, _Pending] = {}
        self._links: dict[int, _Link] = {}
        self._ids = itertools.count()
        self._counts = dict.fromkeys(("crashed", "timed_out", "shed"), 0)
        self._refusal: str | None = None
        self._wakes_at: float | None = None
        self._supervisor = Supervisor(self, workers=workers, max_rss=max_worker_memory)
        self._host: LoopHooks = self._supervisor
        self._started = False

    # -- the Dispatcher interface -----------------------------------------------------------

    def start(self) -> None:
        """Pickle the handler, start every worker and wait until each has loaded it.

        Raises:
            PoolStartError: the handler does not pickle, a worker could not
                load it, or the workers did not start in time.
            RuntimeError: called twice.
        """
        if self._started:
            raise RuntimeError("start() was already called")
        self._started = True
        self._supervisor.start(_pickle_handler(self._handler))
        self._warn_if_memory_cap_is_too_low()

    def attach(self, loop: LoopHooks) -> None:
        """Read the workers' replies on the I/O thread from now on."""
        self._supervisor.attach(loop)

    def submit(self, request: str) -> Future[str]:
        """Send one request to a worker with room, or queue it; never blocks.

        Returns:
            A future of the reply. It fails with the handler's error, with
            :class:`WorkerCrashError`, :class:`HandlerTimeoutError` or
            :class:`WorkerStartError`, or with ``RuntimeError`` once the
            dispatcher is shut down.
        """
        future: Future[str] = Future()
        future.set_running_or_notify_cancel()  # it runs (or waits) from now on
        with self._lock:
            refusal = self._refusal
            if refusal is None:
                request_id = next(self._ids)
                self._pending[request_id] = _Pending(request, future)
                self._send(self._book.submit(request_id, self._now()))
                wake = self._deadline_moved()
        if refusal is not None:
            future.set_exception(RuntimeError(refusal))
        elif wake:
            self._supervisor.wake()
        return future

    def shutdown(self) -> None:
        """Answer every request taken, then stop the workers; idempotent.

        Waits for running handlers (the timeout, if any, still applies). No
        worker process is left afterwards.
        """
        with self._lock:
            self._refusal = self._refusal or "the process pool dispatcher is shut down"
        self._supervisor.stop()
        with self._lock:
            left = list(self._pending.values())
            self._pending.clear()
        for entry in left:  # only if the workers could not be started again
            _fail(entry.future, RuntimeError("the process pool dispatcher is shut down"))

    def stats(self) -> dict[str, Any]:
        """Pool health and one entry per live worker (any thread).

        Returns:
            ``crashed`` (requests lost with their worker), ``timed_out``,
            ``shed`` (requests failed because no worker could start),
            ``resent`` (requests moved off a lost worker, never run twice),
            ``batches`` (frames of requests sent), ``in_flight``,
            ``waiting``, ``recycled``, the supervisor's ``workers_wanted``,
            ``workers_alive``, ``workers_starting``, ``restarts_<cause>``
            and ``start_failures``, and ``workers``: a list of
            ``{pid, rss, cpu_percent, served}``.
        """
        supervised = self._supervisor.stats()
        ready = self._supervisor.ready_workers()
        with self._lock:
            figures: dict[str, Any] = {
                **self._counts,
                "resent": self._book.resent,
                "batches": self._book.batches,
                "in_flight": self._book.in_flight(),
                "waiting": self._book.waiting(),
            }
            served = {worker.pid: self._book.served(worker.pid) for worker in ready}
        described = [worker.describe(served[worker.pid]) for worker in ready]
        return {
            **figures,
            "recycled": supervised["restarts_recycled"],
            **supervised,
            "workers": [entry for entry in described if entry is not None],
        }

    # -- the supervisor's side (supervisor thread) -------------------------------------------

    def worker_ready(self, worker: WorkerProcess) -> None:
        """A worker said hello: host its channel and give it requests."""
        assert worker.channel is not None, "a ready worker has a channel"
        link = _Link(worker, worker.channel, self._host)
        with self._lock:
            self._links[worker.pid] = link
            self._send(self._book.add_worker(worker.pid, self._now()))
        self._add_reader(link)

    def worker_gone(self, worker: WorkerProcess) -> None:
        """A ready worker's process ended: on its channel's host, settle what it had."""
        link = self._links.get(worker.pid)
        if link is not None:
            self._on_host(link, functools.partial(self._end_link, link, drain=True))

    def expire(self, now: float) -> list[int]:
        """Fail the requests that ran past the timeout; returns their workers' pids."""
        if self._timeout_s is None:
            return []
        with self._lock:
            expired = [(pid, self._pending.pop(rid)) for pid, rid in self._book.expire(now)]
            self._counts["timed_out"] += len(expired)
        for pid, entry in expired:
            logger.warning("a request ran past %s s in worker %d; killing it", self._timeout_s, pid)
            _fail(entry.future, HandlerTimeoutError(f"handle_request ran past {self._timeout_s} s"))
        return [pid for pid, _ in expired]

    def next_deadline(self, planned: float | None) -> float | None:
        """The earliest request deadline; the supervisor wakes at the earlier of both."""
        with self._lock:
            deadline = self._book.next_deadline()
            times = [when for when in (planned, deadline) if when is not None]
            self._wakes_at = min(times, default=None)
        return deadline

    def shed_waiting(self) -> None:
        """Fail the waiting requests: no worker is alive and none could start."""
        with self._lock:
            shed = [self._pending.pop(rid) for rid in self._book.shed_waiting()]
            self._counts["shed"] += len(shed)
        if shed:
            logger.error("no worker could start: %d waiting requests fail", len(shed))
        for entry in shed:
            _fail(entry.future, WorkerStartError("no worker process could be started"))

    def is_idle(self) -> bool:
        """Whether no request is waiting or on a worker."""
        with self._lock:
            return self._book.is_idle()

    def release(self) -> None:
        """Close every channel on its host: the workers exit."""
        with self._lock:
            links = list(self._links.values())
        for link in links:
            self._on_host(link, functools.partial(self._close_channel, link))

    def rehost(self, host: LoopHooks) -> None:
        """Move every channel to ``host``; the old host no longer reads them."""
        old, self._host = self._host, host
        with self._lock:
            links = [link for link in self._links.values() if not link.lost]
        for link in links:
            if old is self._supervisor:
                self._supervisor.remove_reader(link.channel)
            link.host = host
            self._add_reader(link)

    def flush(self, channel: Channel) -> bool:
        """Write a channel's unsent bytes; whether some still wait."""
        with self._lock:
            channel.flush()
            return channel.has_outbox

    # -- the host's side (the thread that reads a channel) ------------------------------------

    def _on_readable(self, link: _Link) -> None:
        """A worker sent replies, or its channel ended."""
        if link.lost:
            return
        try:
            payloads = link.channel.receive()
            if payloads is None:  # the worker is gone; its process is reaped soon
                self._end_link(link, drain=False)
            else:
                self._settle(link, payloads)
        except Exception:
            logger.exception("reading worker %d's replies failed; replacing it", link.worker.pid)
            self._end_link(link, drain=False)
            self._supervisor.call_soon(lambda: link.worker.kill("killed"))

    def _settle(self, link: _Link, payloads: list[bytes]) -> None:
        """Resolve the futures of the replies in ``payloads`` and top the workers up."""
        pid = link.worker.pid
        resolved: list[tuple[Future[str], Outcome]] = []
        retired = False
        with self._lock:
            now = self._now()
            for payload in payloads:
                message = _decode(payload, self._book.running(pid))
                if isinstance(message, Retiring):
                    logger.info("worker %d reached max_worker_memory; recycling it", pid)
                    link.worker.cause = "recycled"
                    retired |= self._book.retire(pid)
                    continue
                settled = self._book.settle(pid, message.request_id, message.elapsed_s, now)
                entry = self._pending.pop(message.request_id, None) if settled.deliver else None
                if entry is not None:
                    resolved.append((entry.future, message))
                retired |= settled.retired
            self._send(self._book.top_up(now))
            wake = self._deadline_moved()
        for future, outcome in resolved:
            _resolve(future, outcome)
        if retired:
            self._close_channel(link)
        if wake:
            self._supervisor.wake()

    def _end_link(self, link: _Link, *, drain: bool) -> None:
        """The worker is gone: read what it sent, fail its running request, resend the rest."""
        while drain and not link.lost and (payloads := link.channel.receive()):
            self._settle(link, payloads)
        link.host.remove_reader(link.channel)
        with self._lock:
            if link.lost:
                return
            link.lost = True
            link.channel.close()
            del self._links[link.worker.pid]
            loss = self._book.lose(link.worker.pid, self._now())
            self._send(loss.sends)
            victim = None if loss.running is None else self._pending.pop(loss.running, None)
            self._counts["crashed"] += victim is not None
            wake = self._deadline_moved()
        if victim is not None:
            logger.error("worker %d died running a request", link.worker.pid)
            _fail(victim.future, WorkerCrashError("the worker process died running this request"))
        if loss.resent:
            logger.info(
                "%d requests queued on worker %d go to others", len(loss.resent), link.worker.pid
            )
        if not drain:  # the end of stream came first: make sure the process ends too
            self._supervisor.call_soon(lambda: link.worker.kill("crashed"))
        if wake:
            self._supervisor.wake()

    def _close_channel(self, link: _Link) -> None:
        """Stop reading a channel and close it: its worker exits (host thread)."""
        link.host.remove_reader(link.channel)
        with self._lock:
            link.channel.close()

    # -- helpers ---------------------------------------------------------------------------

    def _send(self, sends: list[Send] | tuple[Send, ...]) -> None:
        """Write each frame of requests to its worker (the lock held)."""
        for send in sends:
            channel = self._links[send.worker].channel
            pending = self._pending
            channel.send(encode_frame([(rid, pending[rid].text) for rid in send.request_ids]))
            if channel.has_outbox:
                self._supervisor.flush_soon(channel)

    def _now(self) -> float:
        """The clock, read only when deadlines are kept."""
        return 0.0 if self._timeout_s is None else time.monotonic()

    def _deadline_moved(self) -> bool:
        """Whether a deadline is due before the supervisor means to wake (the lock held)."""
        if self._timeout_s is None:
            return False
        deadline = self._book.next_deadline()
        return deadline is not None and (self._wakes_at is None or deadline < self._wakes_at)

    def _add_reader(self, link: _Link) -> None:
        """Have the link's host read its channel (supervisor thread)."""
        reader = functools.partial(self._on_readable, link)
        host = link.host
        if host is self._supervisor:
            host.add_reader(link.channel, reader)
            return

        def watch() -> None:
            if not (link.lost or link.channel.closed):
                host.add_reader(link.channel, reader)

        host.call_soon(watch)  # a loop that has ended hands the links back (rehost)

    def _on_host(self, link: _Link, step: Callable[[], None]) -> None:
        """Run ``step`` on the thread that reads the link (now, if that is this one)."""
        if link.host is self._supervisor or not link.host.call_soon(step):
            step()

    def _warn_if_memory_cap_is_too_low(self) -> None:
        """Warn when a fresh worker already uses ``max_worker_memory``."""
        sizes = [entry["rss"] for entry in self.stats()["workers"]]
        if self._max_rss is not None and max(sizes, default=0) >= self._max_rss:
            logger.warning(
                "max_worker_memory (%d bytes) is below a fresh worker's RSS (%d bytes): "
                "every worker will be replaced after each request",
                self._max_rss,
                max(sizes),
            )


def _pickle_handler(handler: Handler) -> bytes:
    """Pickle the handler once, with cloudpickle (via loky), for every worker."""
    try:
        return bytes(loky_dumps(handler))
    except Exception as exc:
        raise PoolStartError(
            f"cannot copy {type(handler).__qualname__} to the worker processes: {exc}"
        ) from exc


def _decode(payload: bytes, running: int | None) -> Outcome | Retiring:
    """A worker's message; one that does not unpickle fails the request it answers."""
    try:
        message: Outcome | Retiring = pickle.loads(payload)
    except Exception as exc:
        error = RuntimeError(f"cannot read the worker's reply: {exc!r}")
        return Outcome(-1 if running is None else running, error=error)
    return message


def _resolve(future: Future[str], outcome: Outcome) -> None:
    """Set a future from a worker's outcome, chaining the remote traceback."""
    error = outcome.error
    if error is None:
        with contextlib.suppress(InvalidStateError):
            future.set_result(outcome.reply)
        return
    if not isinstance(error, Exception):  # never hand the I/O loop a SystemExit
        error = RuntimeError(f"handle_request raised {type(error).__name__}: {error}")
    if outcome.traceback:
        error.__cause__ = RemoteTraceback(outcome.traceback)
    _fail(future, error)


def _fail(future: Future[str], error: Exception) -> None:
    """Fail a future unless its owner already gave up on it."""
    with contextlib.suppress(InvalidStateError):
        future.set_exception(error)
