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
    deadline timer (on the host) ─▶ book.expire: those requests fail ─▶
                       kill_timed_out(pids) ─▶ supervisor thread: psutil kill
    supervisor thread: worker_ready ─▶ book.add_worker, host the channel
                       worker_gone  ─▶ on the host: drain, book.lose:
                                       running request fails, the rest resent

Which thread reads each channel, and what its events do, is the business
of :class:`~._links.Links`. The book, the futures and the channels' writes
are behind one lock (:class:`~._requests.Requests`); no call into another
thread is made while holding it, except :meth:`Supervisor.flush_soon` and
setting the deadline timer on another thread's loop, which take only that
loop's own lock.
"""

from __future__ import annotations

import logging
import random
from concurrent.futures import Future
from typing import Any

from loky.backend.reduction import dumps as loky_dumps

from .._channel import Channel
from .._dispatch import Dispatcher, FailureCallback, Handler, LoopHooks
from ._errors import PoolFailedError, PoolStartError
from ._links import Links
from ._options import check_options, check_recycling
from ._process import WorkerProcess
from ._requests import Replies, Requests
from ._supervisor import Supervisor

logger = logging.getLogger("mpreqrep")


class ProcessPoolDispatcher(Dispatcher):
    """Runs ``handle_request`` on copies of the server in worker processes.

    Each worker unpickles the server once, when it starts, then serves a
    channel of its own: a request ships only its text and gets back only its
    reply; when many wait, several go to a worker in one frame. A worker
    that dies costs only the request it was running
    (:class:`WorkerCrashError`); one that runs past ``request_timeout_s``
    is killed with its child processes (:class:`HandlerTimeoutError`); one
    whose RSS reaches ``max_worker_memory`` is recycled as one that served
    ``max_requests`` is: it retires once another worker serves, then
    finishes its requests. Requests queued behind a lost worker's running one never
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
        max_requests: requests after which a worker is recycled, ``None``
            for no limit; each worker draws its own limit in
            ``[max_requests, max_requests + max_requests_jitter]``.
        max_requests_jitter: the spread of those limits (0 or more).
        graceful_timeout_s: after :meth:`begin_stop`, seconds the running
            requests get before their workers are killed; ``None``: no limit.

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
        max_requests: int | None = None,
        max_requests_jitter: int = 0,
        graceful_timeout_s: float | None = None,
    ) -> None:
        check_options(workers, request_timeout_s, max_worker_memory)
        check_recycling(max_requests, max_requests_jitter)
        self._max_requests = max_requests
        self._jitter = max_requests_jitter
        self._graceful_s = graceful_timeout_s
        self._limits: dict[int, int] = {}  # pid -> the requests it serves before recycling
        self._handler = handler
        self._max_rss = max_worker_memory
        self._supervisor = Supervisor(self, workers=workers, max_rss=max_worker_memory)
        self._requests = Requests(
            request_timeout_s,
            host=self._supervisor,
            flush_soon=self._supervisor.flush_soon,
            kill=self._supervisor.kill_timed_out,
        )
        self._links = Links(self._requests, self._supervisor, self._on_settled)
        self._started = False
        self._on_failure: FailureCallback | None = None

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
        """Read the workers' replies on the I/O thread from now on (called on it), and
        send its requests once per pass of the loop."""
        self._requests.send_once_per_pass(loop.call_soon)
        self._supervisor.attach(loop)

    def on_failure(self, callback: FailureCallback) -> None:
        """Call ``callback`` (on the supervisor thread) with a :class:`PoolFailedError`
        if supervision cannot continue; every request has failed by then."""
        self._on_failure = callback

    def submit(self, request: str) -> Future[str]:
        """Send one request to a worker with room, or queue it; never blocks.

        Returns:
            A future of the reply. It fails with the handler's error, with
            :class:`WorkerCrashError`, :class:`HandlerTimeoutError` or
            :class:`WorkerStartError`, or with ``RuntimeError`` once the
            dispatcher is shut down.
        """
        return self._requests.submit(request)

    def shutdown(self) -> None:
        """Answer every request taken, then stop the workers; idempotent.

        Waits for running handlers (the timeout, if any, still applies). No
        worker process is left afterwards.
        """
        reason = "the process pool dispatcher is shut down"
        self._requests.refuse(reason)
        self._supervisor.stop()
        self._requests.fail_all(reason)  # only if no worker could be started again

    # -- operations (any thread) --------------------------------------------------------------

    def resize(self, workers: int) -> None:
        """Keep ``workers`` worker processes; removed ones drain first.

        Raises:
            ValueError: ``workers`` is below 1.
        """
        self._supervisor.resize(workers)

    def restart_workers(self) -> None:
        """Replace every worker, one at a time: each new one serves before its old one
        retires, and the old one answers its requests first. New workers load the
        handler afresh (its module is imported again)."""
        self._supervisor.restart_workers()

    def begin_stop(self) -> None:
        """The server is stopping: start the graceful timeout, if any."""
        if self._graceful_s is not None:
            self._supervisor.begin_stop(self._graceful_s)

    def stats(self) -> dict[str, Any]:
        """Pool health and one entry per live worker (any thread).

        Returns:
            ``crashed`` (requests lost with their worker), ``timed_out``,
            ``shed`` (requests failed because no worker could start),
            ``resent`` (requests moved off a lost worker, never run twice),
            ``cancelled`` (requests whose future was cancelled before they were sent),
            ``batches`` (frames of requests sent), ``in_flight``,
            ``waiting``, ``recycled``, the supervisor's ``workers_wanted``,
            ``workers_alive``, ``workers_starting``, ``restarts_<cause>``
            and ``start_failures``, and ``workers``: a list of
            ``{pid, rss, cpu_percent, served}``.
        """
        supervised = self._supervisor.stats()
        ready = self._supervisor.ready_workers()
        figures, served = self._requests.figures(worker.pid for worker in ready)
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
        if self._max_requests is not None:
            self._limits[worker.pid] = self._max_requests + random.randint(0, self._jitter)
        self._links.add(worker)

    def worker_gone(self, worker: WorkerProcess) -> None:
        """A ready worker's process ended: on its channel's host, settle what it had."""
        self._links.gone(worker)

    def shed_waiting(self) -> None:
        """Fail the waiting requests: no worker is alive and none could start."""
        self._requests.shed()

    def is_idle(self) -> bool:
        """Whether no request is waiting or on a worker."""
        return self._requests.is_idle()

    def retire_worker(self, worker: WorkerProcess) -> None:
        """Send a worker no more requests; close its channel once it is idle."""
        self._links.retire(worker)

    def abandon(self) -> None:
        """Fail every request taken and refuse new ones: the graceful timeout passed."""
        self._requests.abandon("the server stopped: graceful_timeout passed")

    def release(self) -> None:
        """Close every channel on its host: the workers exit."""
        self._links.release()

    def rehost(self, host: LoopHooks) -> None:
        """Move every channel, and the deadline timer, to ``host``; the old host no
        longer reads them."""
        self._links.rehost(host)

    def take_back(self) -> None:
        """Host the channels on the supervisor again if the I/O loop has ended."""
        self._links.take_back()

    def flush(self, channel: Channel) -> bool:
        """Write a channel's unsent bytes; whether some still wait."""
        return self._requests.flush(channel)

    def fail(self, failure: PoolFailedError) -> None:
        """Supervision cannot continue: fail every request, refuse new ones, tell the server."""
        self._requests.abandon(f"the process pool cannot continue: {failure}")
        if self._on_failure is not None:
            self._on_failure(failure)

    # -- the host's side (the thread that reads a channel) ------------------------------------

    def _on_settled(self, worker: WorkerProcess, replies: Replies) -> None:
        """A worker's replies were settled: recycle it if it reached a limit (once)."""
        if replies.retiring:
            logger.info("worker %d reached max_worker_memory; recycling it", worker.pid)
            self._supervisor.recycle_soon(worker.pid)
        limit = self._limits.get(worker.pid)
        if limit is not None and self._requests.served(worker.pid) >= limit:
            del self._limits[worker.pid]
            logger.info("worker %d served %d requests; recycling it", worker.pid, limit)
            self._supervisor.recycle_soon(worker.pid)

    # -- helpers ---------------------------------------------------------------------------

    def _warn_if_memory_cap_is_too_low(self) -> None:
        """Warn when a fresh worker already uses ``max_worker_memory``."""
        sizes = [entry["rss"] for entry in self.stats()["workers"]]
        if self._max_rss is not None and max(sizes, default=0) >= self._max_rss:
            logger.warning(
                "max_worker_memory (%d bytes) is below a fresh worker's RSS (%d bytes): "
                "every worker will be recycled after its first request",
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
