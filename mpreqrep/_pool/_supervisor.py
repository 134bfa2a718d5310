"""The supervisor thread: a table of worker processes by pid, each tended on its own.

In the manner of gunicorn's arbiter, it keeps ``workers`` processes alive:
it spawns the missing ones (backing off while starts fail), greets the
connections they make, reaps each one that ends and replaces it, kills the
one whose request ran past its deadline (when the channels' host says so)
and the one that does not start in time. Nobody else notices: the other
workers keep serving meanwhile. What the requests on a worker become is the
pool's business (:class:`PoolSide`, the dispatcher); the supervisor only
tells it when a worker is ready or gone::

    supervisor thread: select(listener, wake-up, sentinels, lifelines, greetings,
                              channels until the I/O loop takes them,
                              channels with unsent bytes,
                              timeout = next timer / start deadline / back-off)
      ├─▶ listener: a worker connects ─▶ greet: Lifeline │ Hello │ InitFailed
      │     Hello ─▶ pool.worker_ready(worker)         (its channel joins the book)
      ├─▶ sentinel / lifeline EOF: a process ended ─▶ reap ─▶ pool.worker_gone(worker)
      │     (its running request fails, the rest go elsewhere) ─▶ spawn again
      ├─▶ kill_timed_out(pids), queued by the deadline timer on the channels' host
      │     ─▶ psutil kill of each worker's tree
      └─▶ fewer than wanted ─▶ spawn (all at once; one at a time while backing off)

Until the I/O loop attaches, and again once it has ended at shutdown, the
supervisor also hosts the channels and the timer of the request deadlines
(it implements the loop's ``call_soon`` / ``call_later`` / ``add_reader`` /
``remove_reader``).
The table and its counters are :class:`~._table.WorkerTable`'s (read from
any thread); rolling restarts, recycling and resizing are carried out by
:class:`~._operations.Operations`, stopping by :class:`~._shutdown.Shutdown`;
:class:`~._starts.Starts` follows the boot and the failed starts,
:class:`~._failures.PassFailures` the supervisor's own errors.

What can heal goes on: an unexpected error in a pass is logged and the next
pass runs; failed starts back off and retry; a listener whose socket file
was removed is replaced before the next spawn. What cannot heal ends the
pool with a :class:`PoolFailedError` (``pool.fail``: every request fails,
the server stops and reports it): an exception that escapes the pass
(``BaseException`` included, say a ``SystemExit`` raised in this thread),
after which nothing would spawn, reap or time out again; and passes that
fail every time for :data:`~._failures.FAILING_PASSES_LIMIT_S` (a broken
selector, a bug): supervision has then stopped in all but name.
"""

from __future__ import annotations

import atexit
import functools
import logging
import secrets
import threading
import time
import weakref
from typing import Any, Protocol

from .._channel import Channel
from .._dispatch import LoopHooks
from .._worker import Hello, Lifeline
from . import _process
from ._errors import PoolFailedError
from ._failures import PassFailures, as_failure
from ._greeter import Greeter, Introduction
from ._loop import Flushes, SelectLoop
from ._operations import Operations
from ._process import WorkerProcess
from ._shutdown import SHUTDOWN_GRACE_S, Shutdown
from ._starts import Starts
from ._table import REMOVED, WorkerTable

logger = logging.getLogger("mpreqrep")

WORKER_START_TIMEOUT_S = 60.0
"""How long a worker may take to load the handler before it is killed."""

FLUSH_RETRY_S = 0.005
"""How soon to try again to write a request that the worker's socket did not take whole."""

REAP_TIMEOUT_S = 1.0
"""How long to wait for the exit status of a process whose sentinel fired."""


_live: weakref.WeakSet[Supervisor] = weakref.WeakSet()


class PoolSide(Protocol):
    """What the supervisor tells the dispatcher, and asks it (supervisor thread)."""

    def worker_ready(self, worker: WorkerProcess) -> None:
        """A worker said hello: its channel joins the book."""

    def worker_gone(self, worker: WorkerProcess) -> None:
        """A ready worker's process ended: settle what it had."""

    def shed_waiting(self) -> None:
        """No worker is alive and a start failed: fail the waiting requests."""

    def retire_worker(self, worker: WorkerProcess) -> None:
        """Send a ready worker no more requests; it exits once it answered its own."""

    def abandon(self) -> None:
        """The graceful timeout passed: fail every request taken, refuse new ones."""

    def is_idle(self) -> bool:
        """Whether no request is waiting or on a worker."""

    def release(self) -> None:
        """Close every channel (shutting down, idle): the workers exit."""

    def rehost(self, host: LoopHooks) -> None:
        """Move the channels and the deadline timer to ``host`` (supervisor thread,
        the old host quiet)."""

    def take_back(self) -> None:
        """Host the channels here again if the I/O loop has ended (stopping)."""

    def fail(self, failure: PoolFailedError) -> None:
        """Supervision cannot continue: fail every request, refuse new ones, tell the server."""

    def flush(self, channel: Channel) -> bool:
        """Write a channel's unsent bytes; whether some still wait."""


class Supervisor(SelectLoop):
    """Keeps ``workers`` worker processes alive for a pool.

    Args:
        pool: the dispatcher side.
        workers: how many processes to keep.
        max_rss: the memory cap handed to each worker, or ``None``.

    Thread safety: :meth:`start` and :meth:`stop` from the server's thread,
    :meth:`call_soon`, :meth:`call_later`, :meth:`attach`, :meth:`flush_soon`,
    :meth:`kill_timed_out` and :meth:`stats` from any thread; everything else
    runs on the supervisor thread.
    """

    def __init__(self, pool: PoolSide, *, workers: int, max_rss: int | None) -> None:
        super().__init__()
        self._pool = pool
        self._table = WorkerTable()
        self._operations = Operations(pool, self._table, workers)
        self._shutdown = Shutdown(pool, self._table)
        self._max_rss = max_rss
        self._mechanisms = _process.mechanisms  # the platform's, or a test's
        self._token = secrets.token_hex(16)
        self._payload = b""
        self._greeter: Greeter | None = None
        self._flushes = Flushes()
        self._starts = Starts()
        self._failures = PassFailures()
        self._thread: threading.Thread | None = None

    # -- control (other threads) ------------------------------------------------------------

    def start(self, payload: bytes) -> None:
        """Start every worker and wait until each has loaded the handler.

        Raises:
            PoolStartError: a worker could not be spawned, could not load the
                handler, died or did not start in time.
        """
        self._payload = payload
        unix = self._mechanisms.unix_channels
        self._greeter = Greeter(self, self._token, self._introduced, unix=unix)
        _live.add(self)
        self._thread = threading.Thread(target=self._run, name="mpreqrep-pool-supervisor")
        self._thread.daemon = True
        self._thread.start()
        error = self._starts.wait_booted()
        if error is not None:
            self.stop()
            raise error

    def attach(self, loop: LoopHooks) -> None:
        """Hand the channels to the I/O loop (it reads replies from now on)."""
        self.call_soon(lambda: self._pool.rehost(loop))

    def stop(self) -> None:
        """Once the pool is idle, close the channels, end every worker and the thread."""
        self._shutdown.request()
        self.wake()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        else:  # never started
            self.close_loop()

    # -- operations (any thread; carried out on the supervisor thread) ------------------------

    def resize(self, workers: int) -> None:
        """Keep ``workers`` workers: start the missing ones, retire the surplus (drained).

        Raises:
            ValueError: ``workers`` is below 1.
        """
        self._operations.resize(workers)  # one int: stats() shows it at once
        self.wake()

    def restart_workers(self) -> None:
        """Replace every serving worker, one at a time, each once its successor serves."""
        self.call_soon(self._operations.restart)

    def recycle_soon(self, pid: int) -> None:
        """Retire worker ``pid`` (it reached ``max_requests`` or ``max_worker_memory``) as
        soon as another serves: the one path of every recycling, never all at once."""
        self.call_soon(functools.partial(self._operations.recycle, pid))

    def begin_stop(self, graceful_timeout_s: float) -> None:
        """The server is stopping: what still runs ``graceful_timeout_s`` from now is killed."""
        self.call_soon(functools.partial(self._shutdown.arm, time.monotonic() + graceful_timeout_s))

    def kill_timed_out(self, pids: list[int]) -> None:
        """Kill the workers ``pids``, whose request ran past its deadline (any thread;
        the kill itself runs on the supervisor thread)."""
        self.call_soon(functools.partial(self._table.kill, pids, "timed_out"))

    def flush_soon(self, channel: Channel) -> None:
        """Watch ``channel`` until its unsent bytes are out (any thread)."""
        self._flushes.add(channel)
        self.wake()

    def stats(self) -> dict[str, Any]:
        """Wanted, alive and starting workers, restarts by cause, failed starts."""
        return self._table.figures(self._operations.wanted)

    def ready_workers(self) -> list[WorkerProcess]:
        """The workers serving their channel (any thread)."""
        return self._table.ready()

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        """Tend the workers until stopping is asked and every worker has ended,
        or until supervision cannot continue."""
        self._bind_thread()
        try:
            while not self._shutdown.finished():
                self._guarded_pass()
        except BaseException as exc:  # SystemExit too: this thread is ending
            self._fail(exc)
        finally:
            self._close()

    def _guarded_pass(self) -> None:
        """One pass; an error is logged and the next pass runs, unless passes keep failing.

        Raises:
            PoolFailedError: every pass failed for too long.
        """
        try:
            callback_failed = self._pass()
        except Exception as exc:
            self._failures.failed(exc, time.monotonic())
        else:
            self._failures.succeeded(callback_failed=callback_failed, now=time.monotonic())

    def _fail(self, exc: BaseException) -> None:
        """Supervision cannot continue: during start(), fail it; later, fail the pool."""
        failure = as_failure(exc)
        self._shutdown.request()
        logger.critical("the process pool cannot continue: %s", failure, exc_info=exc)
        if self._starts.booting:
            self._starts.fail_boot(f"the process pool failed to start: {failure}")
            return
        try:
            self._pool.fail(failure)
        except Exception:
            logger.exception("failing the requests of a failed process pool failed")

    def _pass(self) -> bool:
        """One round: deadlines, spawning, then wait for news and act on each.

        Returns:
            Whether a callback failed (logged already).
        """
        now = time.monotonic()
        self._shutdown.give_up_if_due(now)
        self._table.kill_slow_starters(now, WORKER_START_TIMEOUT_S)
        if self._shutdown.closing:
            self._pool.take_back()  # once the I/O loop has ended
            if self._shutdown.wind_down(now, booting=self._starts.booting):
                self._spawn_missing(now)  # a worker may die while requests still wait
            if self._shutdown.finished():
                return False
        else:
            self._operations.turn_over()
            self._spawn_missing(now)
        flushing = self._flushes.flush(self._pool.flush)
        return self.run_once(self._timeout(now, flushing))

    def _timeout(self, now: float, flushing: bool) -> float | None:
        """Seconds until something is due: a timer, a start, a back-off, a kill."""
        planned = [
            self.timer_wait_s(now),
            FLUSH_RETRY_S if flushing else None,
            self._starts.backoff.wait_s(now)
            if len(self._table) < self._operations.wanted
            else None,
            *(w.started_at + WORKER_START_TIMEOUT_S - now for w in self._table.starting()),
            self._failures.pause_s(now),
            *self._shutdown.timeouts(now),
        ]
        due = [value for value in planned if value is not None]
        return max(0.0, min(due)) if due else None

    def _spawn_missing(self, now: float) -> None:
        """Start as many workers as are missing and the back-off allows."""
        missing = self._operations.missing()
        starting = len(self._table.starting())
        for _ in range(self._starts.backoff.allowed(missing, starting, now)):
            self._spawn(now)

    def _spawn(self, now: float) -> None:
        """Start one worker process and watch for its end."""
        greeter = self._greeter
        assert greeter is not None, "workers start only after start()"
        if self._table.closed or self._shutdown.given_up:  # the interpreter exits, or the pool
            return
        if greeter.listener_lost():
            logger.error("the workers' socket %s is gone; listening on a new one", greeter.address)
            greeter.replace_listener()
        try:
            worker = WorkerProcess(
                self._payload,
                greeter.address,
                self._token,
                self._max_rss,
                now,
                selectable_sentinel=self._mechanisms.selectable_sentinels,
            )
        except Exception as exc:  # e.g. EAGAIN: out of processes
            self._start_failed(f"cannot start a worker process: {type(exc).__name__}: {exc}", now)
            return
        if self._table.add(worker):
            self.watch(worker.ended, lambda mask: self._reap(worker))

    # -- events (supervisor thread) -------------------------------------------------------

    def _introduced(self, channel: Channel, message: Introduction) -> None:
        """A worker's connection said what it is: a lifeline, a hello, or why loading failed."""
        worker = self._table.get(message.pid)
        if worker is None or worker.ready:  # a stray, or a worker already gone
            channel.close()
        elif isinstance(message, Lifeline):
            worker.lifeline = channel  # its end of stream is the worker's end, too
            self.watch(channel, lambda mask: self._on_lifeline(worker))
        elif isinstance(message, Hello):
            self._ready(worker, channel)
        else:
            channel.close()
            self._starts.log_init_failure(message)
            worker.init_failure = message

    def _ready(self, worker: WorkerProcess, channel: Channel) -> None:
        """A worker loaded the handler: it joins the pool."""
        worker.channel = channel
        self._pool.worker_ready(worker)
        if not self._starts.booting:
            logger.info("worker %d is ready", worker.pid)
        self._starts.succeeded(len(self.ready_workers()), self._operations.wanted)

    def _on_lifeline(self, worker: WorkerProcess) -> None:
        """A worker's lifeline is readable: at its end of stream the worker has ended."""
        assert worker.lifeline is not None, "watched only once connected"
        if worker.lifeline.receive() is None:
            self._reap(worker)

    def _reap(self, worker: WorkerProcess) -> None:
        """A worker process ended: forget it, settle its requests, replace it.

        Called when its end shows (``worker.ended``) or its lifeline ends, whichever first.
        """
        if self._table.get(worker.pid) is not worker:  # reaped already
            return
        if not worker.ready and self._greeter is not None:
            self._greeter.catch_up()  # what it sent before it ended may still wait
        for watched in (worker.ended, worker.lifeline):
            if watched is not None:
                self.remove_reader(watched)
        status = worker.reap(timeout=REAP_TIMEOUT_S)
        self._table.remove(worker)
        self._operations.forget(worker.pid)
        if not worker.ready and (worker.cause == REMOVED or self._shutdown.ending):
            return  # dropped on purpose (resized, stopping): not a failed start
        if not worker.ready:
            failure = worker.init_failure
            reason = failure.summary if failure else worker.cause or f"exit status {status}"
            self._start_failed(f"worker {worker.pid} failed to start: {reason}", time.monotonic())
            return
        if not self._shutdown.ending:  # not ending as the pool stops
            self._table.count_end(worker, status)
        self._pool.worker_gone(worker)

    def _start_failed(self, reason: str, now: float) -> None:
        """Count a failed start: during start(), fail it; later, back off and retry."""
        self._table.count_start_failure()
        if self._starts.failed(reason, now):
            self._shutdown.request()
        elif not self.ready_workers():
            self._pool.shed_waiting()

    def _close(self) -> None:
        """Release the listener, the selector and the wake-up socket; run late calls."""
        for worker in self._table.workers():  # only after an error: kill, reap
            worker.kill("killed")
            worker.reap(timeout=SHUTDOWN_GRACE_S)
            self._table.remove(worker)
        if self._greeter is not None:
            self._greeter.close()
        self.close_loop()
        _live.discard(self)
        self._starts.end()

    def kill_all(self) -> None:
        """Kill every worker now and start no more (interpreter exit without a shutdown)."""
        self._table.kill_all()


@atexit.register
def kill_every_worker() -> None:
    """Kill the workers of every pool not shut down, and let none start another.

    Runs at interpreter exit (or multiprocessing's own exit hook would wait for
    them for ever), and before an ``os._exit`` that skips it: killing the workers
    some other way first would let their supervisors start replacements.
    """
    for supervisor in list(_live):
        supervisor.kill_all()
