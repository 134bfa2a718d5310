"""The supervisor thread: a table of worker processes by pid, each tended on its own.

In the manner of gunicorn's arbiter, it keeps ``workers`` processes alive:
it spawns the missing ones (backing off while starts fail), greets the
connections they make, reaps each one that ends and replaces it, kills the
one whose request ran past its deadline and the one that does not start in
time. Nobody else notices: the other workers keep serving meanwhile. What
the requests on a worker become is the pool's business (:class:`PoolSide`,
the dispatcher); the supervisor only tells it when a worker is ready or gone::

    supervisor thread: select(listener, wake-up, sentinels, lifelines, greetings,
                              channels until the I/O loop takes them,
                              channels with unsent bytes,
                              timeout = next deadline / start deadline / back-off)
      ├─▶ listener: a worker connects ─▶ greet: Lifeline │ Hello │ InitFailed
      │     Hello ─▶ pool.worker_ready(worker)         (its channel joins the book)
      ├─▶ sentinel / lifeline EOF: a process ended ─▶ reap ─▶ pool.worker_gone(worker)
      │     (its running request fails, the rest go elsewhere) ─▶ spawn again
      ├─▶ deadline passed ─▶ pool.expire() ─▶ psutil kill of that worker's tree
      └─▶ fewer than wanted ─▶ spawn (all at once; one at a time while backing off)

Until the I/O loop attaches, the supervisor also hosts the channels (it
implements the loop's ``call_soon`` / ``add_reader`` / ``remove_reader``).

What can heal goes on: an unexpected error in a pass is logged and the next
pass runs; failed starts back off and retry; a listener whose socket file
was removed is replaced before the next spawn. What cannot heal ends the
pool with a :class:`PoolFailedError` (``pool.fail``: every request fails,
the server stops and reports it): an exception that escapes the pass
(``BaseException`` included, say a ``SystemExit`` raised in this thread),
after which nothing would spawn, reap or time out again; and passes that
fail every time for :data:`FAILING_PASSES_LIMIT_S` (a broken selector, a
bug): supervision has then stopped in all but name.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import threading
import time
import weakref
from typing import Any, Protocol

from .._channel import Channel, Listener
from .._dispatch import LoopHooks
from .._worker import Hello, InitFailed, Lifeline
from ._backoff import StartBackoff
from ._errors import PoolFailedError, PoolStartError
from ._greeter import Greeter, Introduction
from ._loop import SelectLoop
from ._process import WorkerProcess
from ._turnover import Turnover

logger = logging.getLogger("mpreqrep")

WORKER_START_TIMEOUT_S = 60.0
"""How long a worker may take to load the handler before it is killed."""

SHUTDOWN_GRACE_S = 5.0
"""How long workers may take to exit once their channels are closed; then they are killed."""

FLUSH_RETRY_S = 0.005
"""How soon to try again to write a request that the worker's socket did not take whole."""

SENTINELS_SELECTABLE = os.name == "posix"
"""Process sentinels are file descriptors a selector can watch on POSIX; elsewhere
(Windows handles) a worker's end shows as the end of its lifeline socket only."""

REAP_TIMEOUT_S = 1.0
"""How long to wait for the exit status of a process whose sentinel fired."""

ERROR_PAUSE_S = 0.1
"""Least wait after an unexpected error in a pass, so a recurring one cannot spin."""

FAILING_PASSES_LIMIT_S = 10.0
"""How long every pass may fail, none succeeding, before supervision counts as broken."""

RESTART_CAUSES = ("crashed", "timed_out", "recycled", "reloaded", "killed")

REMOVED = "removed"
"""The cause of a worker retired by resizing down: not a restart."""

_live: weakref.WeakSet[Supervisor] = weakref.WeakSet()


class PoolSide(Protocol):
    """What the supervisor tells the dispatcher, and asks it (supervisor thread)."""

    def worker_ready(self, worker: WorkerProcess) -> None:
        """A worker said hello: its channel joins the book."""

    def worker_gone(self, worker: WorkerProcess) -> None:
        """A ready worker's process ended: settle what it had."""

    def expire(self, now: float) -> list[int]:
        """Fail the requests past their deadline; the pids of their workers."""

    def next_deadline(self, planned: float | None) -> float | None:
        """The earliest request deadline; remember that the supervisor wakes at ``planned``."""

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
        """Move the channels to ``host`` (supervisor thread, the old host quiet)."""

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

    Attributes:
        failure: why supervision ended for good (:class:`PoolFailedError`),
            ``None`` while it goes on.

    Thread safety: :meth:`start` and :meth:`stop` from the server's thread,
    :meth:`call_soon`, :meth:`attach`, :meth:`flush_soon` and :meth:`stats`
    from any thread; everything else runs on the supervisor thread.
    """

    def __init__(self, pool: PoolSide, *, workers: int, max_rss: int | None) -> None:
        super().__init__()
        self._pool = pool
        self._turnover = Turnover(workers)
        self._max_rss = max_rss
        self._token = secrets.token_hex(16)
        self._payload = b""
        self._greeter: Greeter | None = None
        self._lock = threading.Lock()  # the table, the counters and the flushes
        self._flushes: set[Channel] = set()
        self._table: dict[int, WorkerProcess] = {}
        self._backoff = StartBackoff()
        self._restarts = dict.fromkeys(RESTART_CAUSES, 0)
        self._start_failures = 0
        self._thread: threading.Thread | None = None
        self._loop: LoopHooks | None = None
        self._booting = True
        self._boot_done = threading.Event()
        self._boot_error: PoolStartError | None = None
        self._closing = False
        self._released_at: float | None = None
        self._error_at = 0.0
        self._traceback_logged = False
        self._exiting = False
        self._give_up_at: float | None = None
        self._given_up = False
        self._failing_since: float | None = None
        self.failure: PoolFailedError | None = None

    # -- control (other threads) ------------------------------------------------------------

    def start(self, payload: bytes) -> None:
        """Start every worker and wait until each has loaded the handler.

        Raises:
            PoolStartError: a worker could not be spawned, could not load the
                handler, died or did not start in time.
        """
        self._payload = payload
        self._greeter = Greeter(self, Listener(), self._token, self._introduced)
        _live.add(self)
        self._thread = threading.Thread(target=self._run, name="mpreqrep-pool-supervisor")
        self._thread.daemon = True
        self._thread.start()
        self._boot_done.wait()
        if self._boot_error is not None:
            self.stop()
            raise self._boot_error

    def attach(self, loop: LoopHooks) -> None:
        """Hand the channels to the I/O loop (it reads replies from now on)."""
        self.call_soon(lambda: self._attach(loop))

    def stop(self) -> None:
        """Once the pool is idle, close the channels, end every worker and the thread."""
        self._closing = True
        self.wake()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        else:  # never started
            self.close_loop()

    # -- operations (any thread; carried out on the supervisor thread) ------------------------

    @property
    def wanted(self) -> int:
        """How many workers the pool keeps."""
        return self._turnover.wanted

    def resize(self, workers: int) -> None:
        """Keep ``workers`` workers: start the missing ones, retire the surplus (drained).

        Raises:
            ValueError: ``workers`` is below 1.
        """
        self._turnover.resize(workers)  # one int: stats() shows it at once
        self.wake()

    def restart_workers(self) -> None:
        """Replace every serving worker, one at a time, each once its successor serves."""

        def restart() -> None:
            for worker in self._table.values():
                if worker.ready and not worker.retired:
                    worker.cause = worker.cause or "reloaded"
                    self._turnover.replace(worker.pid, recycling=False)

        self.call_soon(restart)

    def recycle_soon(self, pid: int) -> None:
        """Retire worker ``pid`` (it reached ``max_requests`` or ``max_worker_memory``) as
        soon as another serves: the one path of every recycling, never all at once."""

        def recycle() -> None:
            worker = self._table.get(pid)
            if worker is not None:
                worker.cause = worker.cause or "recycled"
                self._turnover.replace(pid, recycling=True)

        self.call_soon(recycle)

    def begin_stop(self, graceful_timeout_s: float) -> None:
        """The server is stopping: what still runs ``graceful_timeout_s`` from now is killed."""
        give_up_at = time.monotonic() + graceful_timeout_s

        def arm() -> None:
            if self._give_up_at is None:
                self._give_up_at = give_up_at

        self.call_soon(arm)

    def flush_soon(self, channel: Channel) -> None:
        """Watch ``channel`` until its unsent bytes are out (any thread)."""
        with self._lock:
            self._flushes.add(channel)
        self.wake()

    def stats(self) -> dict[str, Any]:
        """Wanted, alive and starting workers, restarts by cause, failed starts."""
        with self._lock:
            workers = list(self._table.values())
            figures: dict[str, Any] = {
                "workers_wanted": self._turnover.wanted,
                "workers_alive": sum(worker.ready for worker in workers),
                "workers_starting": sum(not worker.ready for worker in workers),
                **{f"restarts_{cause}": count for cause, count in self._restarts.items()},
                "start_failures": self._start_failures,
            }
        return figures

    def ready_workers(self) -> list[WorkerProcess]:
        """The workers serving their channel (any thread)."""
        with self._lock:
            return [worker for worker in self._table.values() if worker.ready]

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        """Tend the workers until stopping is asked and every worker has ended,
        or until supervision cannot continue."""
        try:
            while not self._finished():
                self._guarded_pass()
        except BaseException as exc:  # SystemExit too: this thread is ending
            self._fail(exc)
        finally:
            self._close()

    def _guarded_pass(self) -> None:
        """One pass; an error is logged and the next pass runs, unless every pass
        failed for :data:`FAILING_PASSES_LIMIT_S`.

        Raises:
            PoolFailedError: passes kept failing.
        """
        try:
            self._pass()
        except Exception as exc:
            now = time.monotonic()
            if self._failing_since is None:
                self._failing_since = now
            since = self._failing_since
            if now - since >= FAILING_PASSES_LIMIT_S:
                raise PoolFailedError(
                    f"process pool supervision failed in every pass for {now - since:.1f} s"
                ) from exc
            logger.exception("process pool supervision failed; it goes on")
            self._error_at = now
        else:
            self._failing_since = None

    def _fail(self, exc: BaseException) -> None:
        """Supervision cannot continue: during start(), fail it; later, fail the pool."""
        failure = exc if isinstance(exc, PoolFailedError) else PoolFailedError(_one_line(exc))
        if failure is not exc:
            failure.__cause__ = exc
        self.failure = failure
        self._closing = True
        logger.critical("the process pool cannot continue: %s", failure, exc_info=exc)
        if self._booting:
            self._boot_error = PoolStartError(f"the process pool failed to start: {failure}")
            return
        try:
            self._pool.fail(failure)
        except Exception:
            logger.exception("failing the requests of a failed process pool failed")

    def _finished(self) -> bool:
        """Whether stopping was asked, the channels are closed and every worker ended."""
        return self._closing and self._released_at is not None and not self._table

    def _pass(self) -> None:
        """One round: deadlines, spawning, then wait for news and act on each."""
        now = time.monotonic()
        if self._give_up_at is not None and now >= self._give_up_at and not self._given_up:
            self._give_up()
        for pid in self._pool.expire(now):
            worker = self._table.get(pid)
            if worker is not None:
                worker.kill("timed_out")
        self._kill_slow_starters(now)
        if self._closing:
            self._wind_down(now)
            if self._finished():
                return
        else:
            self._turn_over()
            self._spawn_missing(now)
        flushing = self._flush()
        if self.run_once(self._timeout(now, flushing)):
            self._error_at = time.monotonic()

    def _timeout(self, now: float, flushing: bool) -> float | None:
        """Seconds until something is due: a deadline, a start, a back-off, a kill."""
        planned = [
            FLUSH_RETRY_S if flushing else None,
            self._backoff.wait_s(now) if len(self._table) < self._turnover.wanted else None,
            *(
                w.started_at + WORKER_START_TIMEOUT_S - now
                for w in self._table.values()
                if not w.ready
            ),
            None
            if self._released_at is None or not self._table
            else self._released_at + SHUTDOWN_GRACE_S - now,
            ERROR_PAUSE_S if now - self._error_at < ERROR_PAUSE_S else None,
            None if self._give_up_at is None or self._given_up else self._give_up_at - now,
        ]
        due = [value for value in planned if value is not None]
        soonest = min(due, default=None)
        deadline = self._pool.next_deadline(None if soonest is None else now + soonest)
        if deadline is not None:
            due.append(deadline - now)
        return max(0.0, min(due)) if due else None

    def _spawn_missing(self, now: float) -> None:
        """Start as many workers as are missing and the back-off allows."""
        missing = self._turnover.missing(self._table.values())
        starting = sum(not worker.ready for worker in self._table.values())
        for _ in range(self._backoff.allowed(missing, starting, now)):
            self._spawn(now)

    def _spawn(self, now: float) -> None:
        """Start one worker process and watch for its end."""
        greeter = self._greeter
        assert greeter is not None, "workers start only after start()"
        if self._exiting or self._given_up:  # the interpreter is exiting, or the pool
            return
        if greeter.listener_lost():
            logger.error("the workers' socket %s is gone; listening on a new one", greeter.address)
            greeter.replace_listener(Listener())
        try:
            worker = WorkerProcess(self._payload, greeter.address, self._token, self._max_rss, now)
        except Exception as exc:  # e.g. EAGAIN: out of processes
            self._start_failed(f"cannot start a worker process: {type(exc).__name__}: {exc}", now)
            return
        with self._lock:
            self._table[worker.pid] = worker
        if SENTINELS_SELECTABLE:
            self.watch(worker.sentinel, lambda mask: self._reap(worker))

    def _kill_slow_starters(self, now: float) -> None:
        """Kill the workers that did not load the handler within the start timeout."""
        for worker in list(self._table.values()):
            if not worker.ready and now - worker.started_at >= WORKER_START_TIMEOUT_S:
                worker.kill(f"did not start within {WORKER_START_TIMEOUT_S} s")

    def _wind_down(self, now: float) -> None:
        """Stopping: serve what is left, then close the channels; after a grace period, kill."""
        loop = self._loop
        if loop is not None and not loop.call_soon(lambda: None):  # the loop has ended
            self._loop = None
            self._pool.rehost(self)
        if self._released_at is None and not (
            self._booting or self._given_up or self._pool.is_idle()
        ):
            self._spawn_missing(now)  # a worker may die while requests still wait
            return
        if self._released_at is None:
            self._released_at = now
            self._pool.release()  # ready workers exit once their channel closes
            for worker in list(self._table.values()):
                if not worker.ready:  # no request on it: no need to wait
                    worker.kill("killed")
        elif now - self._released_at >= SHUTDOWN_GRACE_S:
            for worker in list(self._table.values()):
                worker.kill("killed")

    # -- events (supervisor thread) -------------------------------------------------------

    def _attach(self, loop: LoopHooks) -> None:
        self._loop = loop
        self._pool.rehost(loop)

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
            self._log_init_failure(message)
            worker.init_failure = message

    def _ready(self, worker: WorkerProcess, channel: Channel) -> None:
        """A worker loaded the handler: it joins the pool."""
        worker.channel = channel
        self._backoff.succeeded()
        self._traceback_logged = False
        self._pool.worker_ready(worker)
        if self._booting and len(self.ready_workers()) == self._turnover.wanted:
            self._booting = False
            self._boot_done.set()
        elif not self._booting:
            logger.info("worker %d is ready", worker.pid)

    def _on_lifeline(self, worker: WorkerProcess) -> None:
        """A worker's lifeline is readable: at its end of stream the worker has ended."""
        assert worker.lifeline is not None, "watched only once connected"
        if worker.lifeline.receive() is None:
            self._reap(worker)

    def _reap(self, worker: WorkerProcess) -> None:
        """A worker process ended: forget it, settle its requests, replace it.

        Called when its sentinel fires or its lifeline ends, whichever comes first.
        """
        if self._table.get(worker.pid) is not worker:  # reaped already
            return
        if not worker.ready and self._greeter is not None:
            self._greeter.catch_up()  # what it sent before it ended may still wait
        for watched in (worker.sentinel, worker.lifeline):
            if watched is not None:
                self.remove_reader(watched)
        status = worker.reap(timeout=REAP_TIMEOUT_S)
        with self._lock:
            del self._table[worker.pid]
        self._turnover.forget(worker.pid)
        if not worker.ready and (
            worker.cause == REMOVED or self._given_up or self._released_at is not None
        ):
            return  # dropped on purpose (resized, stopping): not a failed start
        if not worker.ready:
            failure = worker.init_failure
            reason = failure.summary if failure else worker.cause or f"exit status {status}"
            self._start_failed(f"worker {worker.pid} failed to start: {reason}", time.monotonic())
            return
        cause = worker.cause or "crashed"
        if self._released_at is None and not self._given_up:  # not ending as the pool stops
            if cause != REMOVED:
                with self._lock:
                    self._restarts[cause if cause in self._restarts else "killed"] += 1
            level = logging.INFO if cause in ("recycled", "reloaded", REMOVED) else logging.WARNING
            logger.log(level, "worker %d ended (%s, exit status %s)", worker.pid, cause, status)
        self._pool.worker_gone(worker)

    def _turn_over(self) -> None:
        """Retire the workers the turnover plan says may go, drop unwanted starting ones."""
        plan = self._turnover.plan(list(self._table.values()))
        for pid in plan.drop:
            self._table[pid].kill(REMOVED)
        for pid in plan.retire:
            worker = self._table[pid]
            worker.cause = worker.cause or REMOVED
            worker.retired = True
            logger.info("worker %d retires (%s): it finishes its requests first", pid, worker.cause)
            self._pool.retire_worker(worker)

    def _give_up(self) -> None:
        """The graceful timeout passed while stopping: fail what is left, kill every worker."""
        self._given_up = True
        busy = not self._pool.is_idle()
        self._pool.abandon()
        if busy:
            logger.warning("graceful timeout: killing the workers with requests still running")
        for worker in list(self._table.values()):
            worker.kill("killed")

    def _start_failed(self, reason: str, now: float) -> None:
        """Count a failed start: during start(), fail it; later, back off and retry."""
        with self._lock:
            self._start_failures += 1
        if self._booting:
            if self._boot_error is None:
                self._boot_error = PoolStartError(reason)
            self._closing = True
            self._boot_done.set()
            return
        delay = self._backoff.failed(now)
        logger.error("%s; trying again in %.1f s", reason, delay)
        if not self.ready_workers():
            self._pool.shed_waiting()

    def _log_init_failure(self, message: InitFailed) -> None:
        """The handler's traceback, once per streak of failed starts."""
        if not self._traceback_logged:
            self._traceback_logged = True
            logger.error(
                "worker %d could not load the handler:\n%s", message.pid, message.traceback
            )

    def _flush(self) -> bool:
        """Write what waits in the channels' outboxes; whether some still wait."""
        with self._lock:
            channels = list(self._flushes)
        waiting = {channel for channel in channels if self._pool.flush(channel)}
        with self._lock:
            self._flushes -= set(channels) - waiting
            return bool(self._flushes)

    def _close(self) -> None:
        """Release the listener, the selector and the wake-up socket; run late calls."""
        for worker in list(self._table.values()):  # only after an error: kill, reap
            worker.kill("killed")
            worker.reap(timeout=SHUTDOWN_GRACE_S)
        self._table.clear()
        if self._greeter is not None:
            self._greeter.close()
        self.close_loop()
        _live.discard(self)
        self._boot_done.set()

    def kill_all(self) -> None:
        """Kill every worker now and start no more (interpreter exit without a shutdown)."""
        with self._lock:
            self._exiting = True
            workers = list(self._table.values())
        for worker in workers:
            worker.kill("killed")


def _one_line(exc: BaseException) -> str:
    """``Type: message`` on one line."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


@atexit.register
def _kill_leftover_workers() -> None:
    """At interpreter exit, kill the workers of pools never shut down (or
    multiprocessing's own exit hook would wait for them for ever)."""
    for supervisor in list(_live):
        supervisor.kill_all()
