"""Process mode: ``handle_request`` on copies of the server in a supervised loky pool.

Owns everything about worker processes: the copy of the server each worker
loads once, knowing which worker runs which request, rebuilding the pool when
a worker dies, killing a handler that runs past its deadline, recycling a
worker that outgrew its memory cap, and ``workers="auto"``. It is the only
module that imports loky and psutil. It knows nothing of sockets: the I/O
loop hands it request text and gets back a future of the reply text.

Data crossing threads and processes::

    I/O thread          supervisor thread                     worker process (x N)
    ----------          -----------------                     --------------------
                                                              _init_worker, once per process:
    submit(text)                                                unpickle the server copy,
      │ append, wake                                            report READY ──────────────┐
      ▼                                                                                    │
    waiting ──────▶ take a batch [(id, text), ...] ──loky──▶ _serve_batch, per request:    │
    deque           (sized by _TaskSizing)                     report STARTED(id) ─────────┤
                                                               handle_request(text)        │
                      ▲                                              │                     │
                      │ wait(wake-up pipe, report pipe, ◀──── report pipe ◀────────────────┘
                      │      timeout=next deadline)                  │
                      ├─▶ deadline passed: psutil kill of that worker's process tree
                      └─▶ pool broken: new pool, culprit fails, bystanders go again
                                                                     │
    future ◀── reply text or exception ◀── loky manager thread ◀─loky─┘
               (set by the done callback)                     (pid, outcomes)

Each worker reports the request it starts on a pipe of its own pool. When one
worker dies, loky fails every pending task of that pool with
``BrokenProcessPool``; the supervisor then knows which request ran in the dead
worker (it fails alone, with :class:`WorkerCrashError`) and resubmits every
other one to a new pool. Memory recycling reuses loky's between-task exit
handshake, so no request is lost (see :class:`_RssCap`).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import struct
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future, InvalidStateError
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, NamedTuple

import psutil
from loky import ProcessPoolExecutor
from loky import process_executor as loky_executor
from loky.backend import get_context
from loky.backend.reduction import dumps as loky_dumps

from ._dispatch import Dispatcher, Handler, run_handler
from ._errors import RequestTimeoutError

logger = logging.getLogger("mpreqrep")

REPORTS_PER_DRAIN = 256
"""Requests dispatched outside the supervisor before it is woken to read their
start reports: far fewer than the ~1,900 reports a 64 KiB pipe holds."""

MAX_BATCH_SIZE = 16
"""Most requests sent to a worker in one loky task when many are waiting."""

LIGHT_HANDLER_S = 0.001
"""Handlers faster than this on average are batched; slower ones are pipelined."""

HANDLER_TIME_SMOOTHING = 0.2
"""Weight of the newest task in the moving average of the handler time."""

MAX_UNEXPLAINED_BREAKS = 2
"""A request running when the pool broke this often, with no culprit found, fails."""

WORKER_START_TIMEOUT_S = 60.0
"""How long :meth:`ProcessPoolDispatcher.start` waits for every worker to load."""

MAX_FUTILE_REBUILDS = 3
"""Pools in a row that broke before any worker loaded the handler: then give up."""

_CHECK_EVERY_TASK_S = -1.0
"""Makes loky's memory check, throttled to once per this many seconds, run every task."""

_READY, _STARTED, _INIT_FAILED = "ready", "started", "init-failed"
_MAX_REPORT_TEXT = 3000
"""Characters of a traceback sent on the report pipe: a whole message stays below
Linux's PIPE_BUF, so its write is atomic and a killed worker never leaves half of one."""
_Report = tuple[str, int, Any]
"""A worker's message on its report pipe: (kind, worker pid, request id or traceback)."""
_FRAME_HEADER = struct.Struct("!i")
"""The length prefix of a report: multiprocessing.Connection's own framing."""
_READ_CHUNK_SIZE = 65536

_STATS_COUNTERS = (
    "crashed",
    "timed_out",
    "abandoned",
    "resubmitted",
    "pool_rebuilds",
    "recycled",
    "tasks",
)


class PoolStartError(RuntimeError):
    """The worker processes could not be started with a copy of the handler."""


class WorkerCrashError(RuntimeError):
    """The worker process running the request died, or it broke the pool twice."""


class HandlerTimeoutError(RequestTimeoutError):
    """The handler ran past ``request_timeout_s``; its worker was killed."""


class _RemoteTraceback(Exception):
    """The traceback, as text, of an error raised in a worker process."""


# -- workers: run in the loky worker processes ------------------------------------------


class _Outcome(NamedTuple):
    """What became of one request in a worker: its reply, or an error and its traceback."""

    request_id: int
    reply: str = ""
    error: BaseException | None = None
    traceback: str = ""
    elapsed_s: float = 0.0


def _write_report(reports: Connection, report: _Report) -> None:
    """Send one report in a single write of less than PIPE_BUF bytes.

    Such a write is atomic: reports of several workers never interleave, so
    no lock is needed, and the parent can read them in bulk
    (:meth:`_Pool.read_reports_nowait`).
    """
    data = pickle.dumps(report)
    os.write(reports.fileno(), _FRAME_HEADER.pack(len(data)) + data)


@dataclass
class _WorkerState:
    """The handler copy of one worker process and the pipe it reports on."""

    handler: Handler
    reports: Connection
    pid: int

    def report(self, kind: str, payload: object = None) -> None:
        """Send one message to the supervisor."""
        _write_report(self.reports, (kind, self.pid, payload))

    def serve(self, request_id: int, request: str) -> _Outcome:
        """Report the start, run the handler, and capture its reply or error."""
        self.report(_STARTED, request_id)
        started = time.perf_counter()
        try:
            reply = run_handler(self.handler, request)
        except BaseException as exc:  # the parent logs it when it fails the future
            return _failed_outcome(request_id, exc)
        # An exact str: a subclass might not unpickle in the parent and break the pool.
        return _Outcome(request_id, str.__str__(reply), elapsed_s=time.perf_counter() - started)


_worker: _WorkerState | None = None


def _init_worker(payload: bytes, reports: Connection, max_rss: int | None) -> None:
    """Load this worker's handler copy; loky runs this once per (re)spawned worker.

    Args:
        payload: the pickled handler, made once by the parent.
        reports: write end of the pool's report pipe.
        max_rss: RSS in bytes past which the worker is recycled, or ``None``.

    Raises:
        Exception: whatever unpickling raised, after reporting it (loky then
            marks the pool broken).
    """
    global _worker
    # Ctrl-C in a terminal signals the whole process group; the parent drains
    # in-flight requests, so a worker must not die of it mid-request.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pid = os.getpid()
    try:
        handler = pickle.loads(payload)
    except BaseException:
        _write_report(reports, (_INIT_FAILED, pid, traceback.format_exc()[-_MAX_REPORT_TEXT:]))
        raise
    if max_rss is not None:
        _cap_rss(max_rss)
    _worker = _WorkerState(handler, reports, pid)
    _worker.report(_READY)


def _serve_batch(batch: list[tuple[int, str]]) -> tuple[int, list[_Outcome]]:
    """The worker entry: handle each ``(request id, text)`` in turn.

    Args:
        batch: the requests of one loky task; empty for a warm-up task.

    Returns:
        This worker's pid and one outcome per request, in order.
    """
    worker = _worker
    assert worker is not None, "_serve_batch runs only in workers set up by _init_worker"
    return worker.pid, [worker.serve(request_id, text) for request_id, text in batch]


def _failed_outcome(request_id: int, exc: BaseException) -> _Outcome:
    """The outcome of a handler that raised: a picklable error and its traceback."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return _Outcome(request_id, error=_portable(exc), traceback=text)


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives a pickle round trip, else a RuntimeError naming it.

    An error that cannot be unpickled in the parent would break the whole pool.
    """
    try:
        pickle.loads(loky_dumps(exc))
    except Exception:  # the error is still reported, as text
        summary = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return RuntimeError(f"unpicklable handler error: {summary}")
    return exc


class _RssCap:
    """Stands in for loky's worker memory probe so that its leak check caps RSS.

    After every task, loky's worker loop compares the probe's reading with the
    reading taken after the first task (the reference) and, past
    ``_MAX_MEMORY_LEAK_SIZE`` bytes of growth, leaves through loky's clean exit
    handshake; loky then spawns a replacement that runs ``_init_worker``
    again. That is exactly "recycle between requests without failing one", but
    loky measures growth, at most once a second, with one process-wide limit.
    Setting that limit to ``max_rss - reference`` when the reference is taken,
    and the throttle below zero, turns it into "RSS >= max_rss, checked after
    every task". The first task a worker runs only takes the reference.
    """

    def __init__(self, max_rss: int) -> None:
        self._max_rss = max_rss
        self._process = psutil.Process()
        self._calibrated = False

    def __call__(self, pid: int, force_gc: bool = False) -> int:
        """Return this worker's RSS in bytes, as loky's ``_get_memory_usage`` does."""
        if force_gc:
            gc.collect()
        rss = int(self._process.memory_info().rss)
        if not self._calibrated:
            loky_executor._MAX_MEMORY_LEAK_SIZE = self._max_rss - rss
            self._calibrated = True
        return rss


def _cap_rss(max_rss: int) -> None:
    """Make loky's worker loop recycle this worker once its RSS reaches ``max_rss``."""
    loky_executor._get_memory_usage = _RssCap(max_rss)
    loky_executor._MEMORY_LEAK_CHECK_DELAY = _CHECK_EVERY_TASK_S


# -- parent: the pool, the request book and the supervisor ------------------------------


@dataclass(eq=False)
class _Request:
    """One request from ``submit`` until its future is resolved."""

    request_id: int
    text: str
    future: Future[str]
    dispatched: bool = False
    pid: int | None = None
    started: int = -1
    deadline: float | None = None
    unexplained_breaks: int = 0


@dataclass(eq=False)
class _WorkerInfo:
    """A live worker as the parent sees it."""

    pid: int
    process: Any
    served: int = 0


class _Verdict(NamedTuple):
    """Who pays for a broken pool."""

    culprits: list[_Request]
    abandoned: list[_Request]
    retry: list[_Request]


class _Wakeup:
    """Wakes the supervisor from other threads, like loky's ``_ThreadWakeup``.

    At most one wake-up message is ever unread, so :meth:`set` never blocks
    on a full pipe.
    """

    def __init__(self) -> None:
        self.reader, self._writer = multiprocessing.Pipe(duplex=False)
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


class _Ledger:
    """The dispatcher's requests and counters, behind one lock.

    Waiting requests sit in arrival order; those handed to loky are in flight,
    by id, until settled. The lock is held for book-keeping only, never while
    calling loky or psutil or resolving a future (whose callbacks could
    call back in), so ``submit`` never waits for long.
    """

    def __init__(self, timeout_s: float | None) -> None:
        self._lock = threading.Lock()
        self._timeout_s = timeout_s
        self._ids = itertools.count()
        self._starts = itertools.count()
        self._waiting: deque[_Request] = deque()
        self._in_flight: dict[int, _Request] = {}
        self._deadlines: deque[tuple[float, _Request]] = deque()
        self._latest_by_pid: dict[int, _Request] = {}
        self._counts = dict.fromkeys(_STATS_COUNTERS, 0)
        self._refusal: str | None = None

    def add(self, text: str, future: Future[str]) -> Exception | None:
        """Queue a request; return the error to fail it with if none are taken."""
        with self._lock:
            if self._refusal is not None:
                return RuntimeError(self._refusal)
            self._waiting.append(_Request(next(self._ids), text, future))
            return None

    def refuse(self, reason: str) -> None:
        """Refuse new requests from now on, for ``reason``."""
        with self._lock:
            self._refusal = self._refusal or reason

    def take_batch(self, capacity: int, limit: int) -> list[_Request]:
        """Move the next waiting requests in flight, sharing them over ``capacity``
        tasks, at most ``limit`` in this one."""
        with self._lock:
            size = min(limit, -(-len(self._waiting) // capacity))  # ceil
            batch: list[_Request] = []
            while self._waiting and len(batch) < size:
                request = self._waiting.popleft()
                if request.dispatched or request.future.set_running_or_notify_cancel():
                    request.dispatched = True
                    self._in_flight[request.request_id] = request
                    batch.append(request)
            return batch

    def put_back(self, batch: list[_Request]) -> None:
        """Return requests that loky refused to the front of the queue."""
        with self._lock:
            for request in reversed(batch):
                del self._in_flight[request.request_id]
                self._waiting.appendleft(request)

    def settle(self, outcomes: list[_Outcome]) -> list[tuple[_Request, _Outcome]]:
        """Take the requests of these outcomes out of flight (skipping timed-out ones)."""
        with self._lock:
            return [
                (self._in_flight.pop(outcome.request_id), outcome)
                for outcome in outcomes
                if outcome.request_id in self._in_flight
            ]

    def note_started(self, starts: list[tuple[int, int]], now: float) -> None:
        """Record the worker pid and deadline of each ``(request id, pid)`` that started.

        A worker runs its batch in order, so a start also means the request it
        started before has finished: that one's deadline no longer applies,
        although its reply travels with the rest of the batch.
        """
        with self._lock:
            for request_id, pid in starts:
                finished = self._latest_by_pid.pop(pid, None)
                if finished is not None:
                    finished.deadline = None
                request = self._in_flight.get(request_id)
                if request is None:  # its outcome came first
                    continue
                self._latest_by_pid[pid] = request
                request.pid = pid
                request.started = next(self._starts)
                if self._timeout_s is not None:
                    request.deadline = now + self._timeout_s
                    self._deadlines.append((request.deadline, request))

    def pop_expired(self, now: float) -> list[_Request]:
        """Take out of flight the requests whose handler ran past its deadline."""
        with self._lock:
            expired: list[_Request] = []
            while self._deadlines and self._deadlines[0][0] <= now:
                deadline, request = self._deadlines.popleft()
                if self._is_current(deadline, request):
                    del self._in_flight[request.request_id]
                    expired.append(request)
            self._counts["timed_out"] += len(expired)
            return expired

    def seconds_to_next_deadline(self, now: float) -> float | None:
        """Seconds until the earliest live deadline, ``None`` if there is none."""
        with self._lock:
            while self._deadlines and not self._is_current(*self._deadlines[0]):
                self._deadlines.popleft()
            if not self._deadlines:
                return None
            return max(0.0, self._deadlines[0][0] - now)

    def take_in_flight(self) -> list[_Request]:
        """Take every request out of flight, oldest first (the pool broke)."""
        with self._lock:
            requests = sorted(self._in_flight.values(), key=lambda request: request.request_id)
            self._in_flight.clear()
            self._deadlines.clear()
            return requests

    def requeue(self, requests: list[_Request]) -> None:
        """Put requests lost with a broken pool back at the front of the queue."""
        with self._lock:
            for request in reversed(requests):
                request.pid = request.deadline = None
                request.started = -1
                self._waiting.appendleft(request)
            self._counts["resubmitted"] += len(requests)

    def close(self, reason: str) -> list[_Request]:
        """Refuse new requests and take every outstanding one."""
        with self._lock:
            self._refusal = self._refusal or reason
            requests = [*self._in_flight.values(), *self._waiting]
            self._in_flight.clear()
            self._waiting.clear()
            self._deadlines.clear()
            return requests

    def idle(self) -> bool:
        """Whether no request is waiting or in flight."""
        with self._lock:
            return not self._waiting and not self._in_flight

    def has_waiting(self) -> bool:
        """Whether some request waits for a free task slot."""
        with self._lock:
            return bool(self._waiting)

    def count(self, counter: str, amount: int = 1) -> None:
        """Add ``amount`` to one of the counters reported by ``stats``."""
        with self._lock:
            self._counts[counter] += amount

    def figures(self) -> dict[str, Any]:
        """The counters plus the requests in flight and waiting."""
        with self._lock:
            return {
                **self._counts,
                "in_flight": len(self._in_flight),
                "waiting": len(self._waiting),
            }

    def _is_current(self, deadline: float, request: _Request) -> bool:
        """Whether a deadline entry still belongs to a request in flight."""
        return request.deadline == deadline and (self._in_flight.get(request.request_id) is request)


class _Pool:
    """One loky executor and its report pipe, replaced whole when it breaks.

    Only the supervisor thread submits to it and reads its reports; loky's
    manager thread marks it broken and counts finished tasks through the
    dispatcher's done callbacks, hence the lock.

    Args:
        executor: a dedicated ``loky.ProcessPoolExecutor``.
        reports: read end of the pipe its workers report on.
        report_writer: write end, kept open for the workers loky respawns.
    """

    def __init__(self, executor: Any, reports: Connection, report_writer: Connection) -> None:
        self.executor = executor
        self.reports = reports
        os.set_blocking(reports.fileno(), False)
        self._report_buffer = bytearray()
        self._report_writer = report_writer
        self._lock = threading.Lock()
        self._workers: dict[int, _WorkerInfo] = {}
        self._tasks = 0
        self.ready_count = 0
        self.broken: BaseException | None = None
        self.alive_at_break: frozenset[int] | None = None
        self.killed: set[int] = set()
        self._closed = False

    @classmethod
    def open(cls, payload: bytes, workers: int, max_rss: int | None) -> _Pool:
        """A pool whose ``workers`` processes load ``payload`` once each (spawned lazily)."""
        context = get_context("loky")
        reports, writer = context.Pipe(duplex=False)
        executor = ProcessPoolExecutor(
            max_workers=workers,
            context=context,
            initializer=_init_worker,
            initargs=(payload, writer, max_rss),
        )
        return cls(executor, reports, writer)

    def submit(self, batch: list[tuple[int, str]]) -> Future[tuple[int, list[_Outcome]]]:
        """Submit one task; raises ``BrokenProcessPool`` if the pool is broken."""
        task: Future[tuple[int, list[_Outcome]]] = self.executor.submit(_serve_batch, batch)
        with self._lock:
            self._tasks += 1
        return task

    def has_room(self, capacity: int) -> bool:
        """Whether the pool is whole (none killed) and runs fewer than ``capacity`` tasks."""
        with self._lock:
            return self.broken is None and not self.killed and self._tasks < capacity

    def task_done(self, pid: int | None, served: int) -> None:
        """Count a finished task and the requests its worker served."""
        with self._lock:
            self._tasks -= 1
            info = self._workers.get(pid) if pid is not None else None
            if info is not None:
                info.served += served

    def mark_broken(self, error: BaseException, alive: frozenset[int] | None) -> None:
        """Record the first error that broke the pool and who was alive then."""
        with self._lock:
            self.broken = self.broken or error
            if self.alive_at_break is None:
                self.alive_at_break = alive

    def register_worker(self, pid: int) -> int:
        """Add a worker that loaded its handler; forget dead ones; return the count so far."""
        self.ready_count += 1
        try:
            info = _WorkerInfo(pid, psutil.Process(pid))
        except psutil.NoSuchProcess:  # died already: the pool breaks next
            return self.ready_count
        with self._lock:
            live = {p: w for p, w in self._workers.items() if w.process.is_running()}
            self._workers = {**live, pid: info}
        return self.ready_count

    def worker_infos(self) -> list[tuple[int, Any, int]]:
        """``(pid, psutil.Process, served)`` of each registered worker."""
        with self._lock:
            return [(info.pid, info.process, info.served) for info in self._workers.values()]

    def kill_worker(self, pid: int) -> None:
        """Kill a worker and its descendants (the pool breaks; no one is blamed)."""
        self.killed.add(pid)
        with self._lock:
            info = self._workers.get(pid)
        if info is not None:
            _kill_process_tree(info.process)

    def died_on_its_own(self, pid: int | None) -> bool:
        """Whether the worker ``pid`` was already dead when loky noticed the break."""
        return (
            pid is not None
            and self.alive_at_break is not None
            and pid not in self.alive_at_break
            and pid not in self.killed
        )

    def read_reports_nowait(self) -> list[_Report]:
        """Every complete report the workers wrote so far, read in bulk."""
        buffer = self._report_buffer
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.reports.fileno(), _READ_CHUNK_SIZE):
                buffer += chunk
        reports: list[_Report] = []
        start = 0
        while len(buffer) - start >= _FRAME_HEADER.size:
            (size,) = _FRAME_HEADER.unpack_from(buffer, start)
            end = start + _FRAME_HEADER.size + size
            if end > len(buffer):
                break
            reports.append(pickle.loads(buffer[start + _FRAME_HEADER.size : end]))
            start = end
        del buffer[:start]
        return reports

    def close(self) -> list[_Report]:
        """Shut the executor down (waiting for its tasks); return the unread reports.

        Idempotent: a second call returns no reports.
        """
        if self._closed:
            return []
        self._closed = True
        self.executor.shutdown(wait=True)
        self._report_writer.close()  # the workers are gone: the pipe now ends (EOF)
        reports = self.read_reports_nowait()
        self.reports.close()
        return reports


class ProcessPoolDispatcher(Dispatcher):
    """Runs ``handle_request`` on copies of the server in a supervised loky pool.

    Each worker unpickles the server once, when loky starts it; a request then
    ships only its text and gets back only its reply. When many requests wait,
    several go to a worker in one loky task. A worker that dies costs only
    the request it was running (:class:`WorkerCrashError`); one that runs past
    ``request_timeout_s`` is killed with its child processes
    (:class:`HandlerTimeoutError`); one whose RSS reaches ``max_worker_memory``
    is replaced between two tasks. In each case the pool is rebuilt or
    refilled and every other request is answered, some after running again.

    Requests whose worker died are not retried; the others are, so a
    handler may run twice for one request when a neighbour crashes.

    Thread safety: :meth:`start` and :meth:`shutdown` are called by the
    server's thread, :meth:`submit` by the I/O thread (it never blocks), and
    :meth:`stats` by any thread. Futures are resolved on loky's manager
    thread or on this dispatcher's supervisor thread.

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
        self._sizing = _TaskSizing(workers)
        self._dispatch_lock = threading.Lock()
        self._undrained_starts = 0
        self._ledger = _Ledger(request_timeout_s)
        self._wakeup = _Wakeup()
        self._payload = b""
        self._pool: _Pool | None = None
        self._supervisor: threading.Thread | None = None
        self._closing = False
        self._futile_rebuilds = 0

    # -- the Dispatcher interface ----------------------------------------------------------

    def start(self) -> None:
        """Pickle the handler, start every worker and wait until each has loaded it.

        Raises:
            PoolStartError: the handler does not pickle, a worker could not
                unpickle it, or the workers did not start in time.
        """
        if self._pool is not None:
            raise RuntimeError("start() was already called")
        self._payload = _pickle_handler(self._handler)
        pool = self._open_pool()
        try:
            self._wait_until_ready(pool)
        except BaseException:
            pool.close()
            raise
        self._pool = pool
        self._warn_if_memory_cap_is_too_low(pool)
        self._supervisor = threading.Thread(
            target=self._supervise, args=(pool,), name="mpreqrep-pool-supervisor", daemon=True
        )
        self._supervisor.start()

    def submit(self, request: str) -> Future[str]:
        """Queue one request for the pool; never blocks.

        Returns:
            A future of the reply. It fails with the handler's error, with
            :class:`WorkerCrashError` or :class:`HandlerTimeoutError`, or
            with ``RuntimeError`` once the dispatcher is shut down.
        """
        future: Future[str] = Future()
        refusal = self._ledger.add(request, future)
        if refusal is not None:
            future.set_exception(refusal)
        elif not self._dispatch_nowait():
            self._wakeup.set()
        return future

    def _dispatch_nowait(self) -> bool:
        """Hand waiting requests to a whole pool from the caller's thread.

        Saves the hop through the supervisor, most of a light load's latency.
        Gives up at once if the supervisor is dispatching or the pool needs it
        (broken, being replaced). The supervisor still reads the start
        reports: it is woken every :data:`REPORTS_PER_DRAIN` requests
        dispatched here, long before they could fill the report pipe.

        Returns:
            Whether the supervisor may go on sleeping: nothing is left
            waiting and no reports need draining.
        """
        pool = self._pool
        if pool is None or not self._dispatch_lock.acquire(blocking=False):
            return False
        try:
            if pool is not self._pool or pool.broken is not None:
                return False
            self._undrained_starts += self._dispatch_waiting(pool)
        except Exception:  # the supervisor meets the same error and fails what it must
            logger.exception("dispatching from submit failed; leaving it to the supervisor")
            return False
        finally:
            self._dispatch_lock.release()
        return self._undrained_starts < REPORTS_PER_DRAIN and not self._ledger.has_waiting()

    def shutdown(self) -> None:
        """Answer every request taken, then stop the workers; idempotent.

        Waits for running handlers (the timeout, if any, still applies). No
        worker process is left afterwards.
        """
        self._ledger.refuse("the process pool dispatcher is shut down")
        self._closing = True
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            self._wakeup.set()
            supervisor.join()
            pool = self._pool
            assert pool is not None, "the supervisor runs only once a pool is open"
            pool.close()
        self._wakeup.close()

    def stats(self) -> dict[str, Any]:
        """Pool health and one entry per live worker (any thread).

        Returns:
            ``crashed``, ``timed_out``, ``abandoned`` (requests failed after
            breaking the pool twice), ``resubmitted``, ``pool_rebuilds``,
            ``recycled`` (workers replaced for memory), ``tasks`` (loky tasks
            submitted, one warm-up per pool included), ``in_flight``, ``waiting`` and
            ``workers``: a list of ``{pid, rss, cpu_percent, served}``. Worker
            reports not read yet (a respawned worker, say) show in the next call:
            this one wakes the supervisor to read them.
        """
        self._wakeup.set()
        figures = self._ledger.figures()
        pool = self._pool
        infos = pool.worker_infos() if pool is not None else []
        figures["workers"] = [entry for entry in map(_describe_worker, infos) if entry]
        return figures

    # -- start-up ------------------------------------------------------------------------

    def _open_pool(self) -> _Pool:
        """A new pool, its workers spawning already (through an empty warm-up task)."""
        pool = _Pool.open(self._payload, self._workers, self._max_rss)
        try:
            self._submit_batch(pool, [])
        except BaseException:  # e.g. no process could be spawned: leave none behind
            pool.close()
            raise
        return pool

    def _wait_until_ready(self, pool: _Pool) -> None:
        """Wait until every worker reported that it loaded the handler."""
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while True:
            self._apply_reports(pool, pool.read_reports_nowait())
            if pool.ready_count >= self._workers:
                return
            if pool.broken is not None:
                raise PoolStartError("a worker process died while starting") from pool.broken
            remaining = deadline - time.monotonic()
            if not wait([pool.reports, self._wakeup.reader], max(0.0, remaining)):
                raise PoolStartError(
                    f"the worker processes did not start within {WORKER_START_TIMEOUT_S} s"
                )
            self._wakeup.clear()

    def _warn_if_memory_cap_is_too_low(self, pool: _Pool) -> None:
        """Warn when a fresh worker already uses ``max_worker_memory``."""
        sizes = [entry["rss"] for entry in map(_describe_worker, pool.worker_infos()) if entry]
        if self._max_rss is not None and max(sizes, default=0) >= self._max_rss:
            logger.warning(
                "max_worker_memory (%d bytes) is below a fresh worker's RSS (%d bytes): "
                "every worker will be replaced after each task",
                self._max_rss,
                max(sizes),
            )

    # -- the supervisor thread -----------------------------------------------------------

    def _supervise(self, pool: _Pool) -> None:
        """Run the supervisor until shut down and idle; on a bug, fail every request."""
        try:
            while True:
                pool = self._tend(pool)
                if self._closing and self._ledger.idle():
                    return
                self._wait_for_news(pool)
        except Exception as exc:
            logger.exception("the process pool supervisor failed; failing every request")
            self._fail_all(exc)

    def _tend(self, pool: _Pool) -> _Pool:
        """One pass: reports, a broken pool, deadlines, then waiting requests."""
        self._undrained_starts = 0
        self._apply_reports(pool, pool.read_reports_nowait())
        if pool.broken is not None:
            pool = self._recover(pool)
        self._expire_deadlines(pool)
        with self._dispatch_lock:
            self._dispatch_waiting(pool)
        return pool

    def _wait_for_news(self, pool: _Pool) -> None:
        """Sleep until a wake-up or the next deadline, and a report if timing matters.

        Start reports set deadlines, so with a request timeout each one wakes
        the supervisor. Without one they are only needed when a pool breaks:
        they wait in the pipe and are read on the next pass, which halves the
        pool's cost per request for light handlers. The pipe cannot fill: a
        dispatch by the supervisor is a pass, and one from ``submit`` wakes it
        every :data:`REPORTS_PER_DRAIN` requests.
        """
        if pool.broken is not None:
            return
        timeout = self._ledger.seconds_to_next_deadline(time.monotonic())
        watched = [self._wakeup.reader]
        if self._timeout_s is not None:
            watched.append(pool.reports)
        wait(watched, timeout)
        self._wakeup.clear()

    def _apply_reports(self, pool: _Pool, reports: list[_Report]) -> None:
        """Register started workers and note which worker started which request.

        Raises:
            PoolStartError: a worker could not load the handler.
        """
        starts: list[tuple[int, int]] = []
        for kind, pid, payload in reports:
            if kind == _STARTED:
                starts.append((payload, pid))
            elif kind == _READY:
                self._note_ready(pool, pid)
            else:
                raise PoolStartError(f"worker {pid} could not load the handler:\n{payload}")
        self._ledger.note_started(starts, time.monotonic())

    def _note_ready(self, pool: _Pool, pid: int) -> None:
        """Register a worker; one beyond the first ``workers`` replaced a recycled one."""
        if pool.register_worker(pid) > self._workers:
            self._ledger.count("recycled")
            logger.info("worker %d started in place of a recycled worker", pid)

    def _dispatch_waiting(self, pool: _Pool) -> int:
        """Hand waiting requests to loky while it has room, in batches under load.

        Returns:
            How many requests went to loky.
        """
        dispatched = 0
        while pool.has_room(self._sizing.capacity()):
            batch = self._ledger.take_batch(self._sizing.capacity(), self._sizing.batch_limit())
            if not batch:
                break
            self._submit_batch(pool, batch)
            dispatched += len(batch)
        return dispatched

    def _submit_batch(self, pool: _Pool, batch: list[_Request]) -> None:
        """Submit one task; if loky says the pool broke, put the requests back."""
        items = [(request.request_id, request.text) for request in batch]
        try:
            task = pool.submit(items)
        except BrokenProcessPool as exc:
            pool.mark_broken(exc, None)
            self._ledger.put_back(batch)
            return
        self._ledger.count("tasks")
        ids = [request_id for request_id, _ in items]
        task.add_done_callback(functools.partial(self._on_task_done, pool, ids))

    def _expire_deadlines(self, pool: _Pool) -> None:
        """Fail the requests that ran past the timeout and kill their workers."""
        for request in self._ledger.pop_expired(time.monotonic()):
            pid = request.pid
            assert pid is not None, "only started requests have a deadline"
            logger.warning(
                "request %d ran past %s s in worker %d; killing the worker",
                request.request_id,
                self._timeout_s,
                pid,
            )
            pool.kill_worker(pid)
            request.future.set_exception(
                HandlerTimeoutError(f"handle_request ran past {self._timeout_s} s")
            )

    # -- recovery ------------------------------------------------------------------------

    def _recover(self, broken: _Pool) -> _Pool:
        """Replace a broken pool; fail its culprits and resubmit everyone else.

        Raises:
            PoolStartError: workers keep dying before they load the handler.
        """
        self._apply_reports(broken, broken.close())  # close() lets loky finish failing tasks
        self._check_progress(broken)
        fresh = self._open_pool()
        self._pool = fresh
        requests = self._ledger.take_in_flight()
        verdict = _judge(broken, requests)
        self._ledger.requeue(verdict.retry)
        self._fail_culprits(broken, verdict)
        self._ledger.count("pool_rebuilds")
        logger.warning(
            "the process pool broke (%s); started a new one and resubmitted %d requests",
            type(broken.broken).__name__,
            len(verdict.retry),
        )
        return fresh

    def _check_progress(self, broken: _Pool) -> None:
        """Give up after :data:`MAX_FUTILE_REBUILDS` pools in a row with no ready worker."""
        self._futile_rebuilds = 0 if broken.ready_count else self._futile_rebuilds + 1
        if self._futile_rebuilds >= MAX_FUTILE_REBUILDS:
            raise PoolStartError(
                f"{self._futile_rebuilds} pools in a row broke before a worker loaded the handler"
            ) from broken.broken

    def _fail_culprits(self, broken: _Pool, verdict: _Verdict) -> None:
        """Fail the requests whose worker died, and those that broke the pool twice."""
        for request in verdict.culprits:
            logger.error("worker %s died running request %d", request.pid, request.request_id)
            _fail_with(request, WorkerCrashError("the worker process died"), broken.broken)
        for request in verdict.abandoned:
            logger.error("request %d broke the pool twice; giving up", request.request_id)
            _fail_with(request, WorkerCrashError("the request broke the pool twice"), broken.broken)
        self._ledger.count("crashed", len(verdict.culprits))
        self._ledger.count("abandoned", len(verdict.abandoned))

    def _fail_all(self, error: Exception) -> None:
        """Fail every outstanding request and refuse new ones (the supervisor died)."""
        for request in self._ledger.close("the process pool supervisor failed"):
            failure = RuntimeError("the process pool supervisor failed")
            failure.__cause__ = error
            with contextlib.suppress(InvalidStateError):  # its owner cancelled it
                request.future.set_exception(failure)

    # -- loky's manager thread -----------------------------------------------------------

    def _on_task_done(self, pool: _Pool, ids: list[int], task: Future[Any]) -> None:
        """Resolve the futures of a finished task, or flag its pool as broken."""
        error = task.exception()
        if isinstance(error, BrokenProcessPool):
            alive = None if pool.alive_at_break is not None else _live_child_pids()
            pool.mark_broken(error, alive)
            self._wakeup.set()
            return
        if error is None:
            pid, outcomes = task.result()
        else:  # loky could not send the result back: fail the whole batch
            pid, outcomes = None, [_Outcome(request_id, error=error) for request_id in ids]
        settled = self._ledger.settle(outcomes)
        self._sizing.observe(outcomes)
        pool.task_done(pid, len(settled))
        for request, outcome in settled:
            _resolve(request.future, outcome)
        if self._closing or self._ledger.has_waiting():
            self._wakeup.set()


class _TaskSizing:
    """How many loky tasks to keep in flight and how many requests each carries.

    Light handlers (under :data:`LIGHT_HANDLER_S`) get one task per worker at
    a time, so the requests that arrive meanwhile travel together in the next
    task: the pool hop is paid per batch, not per request. Heavy handlers get
    one request per task and two tasks per worker, so a worker never idles
    waiting for its next request and the work stays spread over all workers.
    Until the first task is measured, handlers count as heavy.
    """

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._handler_s: float | None = None

    def observe(self, outcomes: list[_Outcome]) -> None:
        """Fold a finished task's handler times into the moving average."""
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

    def capacity(self) -> int:
        """Tasks to keep in flight over the whole pool."""
        return self._workers * (1 if self.is_light() else 2)

    def batch_limit(self) -> int:
        """Most requests in the next task."""
        return MAX_BATCH_SIZE if self.is_light() else 1


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


def _judge(pool: _Pool, requests: list[_Request]) -> _Verdict:
    """Split the requests of a broken pool into culprits, given-up ones and retries.

    The request a worker started last was running when the pool broke (those
    before it in the same batch had finished). One running in a worker that
    died on its own is a culprit. When no worker explains the break, each
    running request counts an unexplained break, and fails at
    :data:`MAX_UNEXPLAINED_BREAKS`; every other request is retried.
    """
    running = _last_started_per_worker(requests)
    culprits = [request for request in running if pool.died_on_its_own(request.pid)]
    explained = bool(culprits or pool.killed)
    abandoned: list[_Request] = []
    retry: list[_Request] = []
    for request in requests:
        if request in culprits:
            continue
        if not explained and request in running:
            request.unexplained_breaks += 1
        given_up = request.unexplained_breaks >= MAX_UNEXPLAINED_BREAKS
        (abandoned if given_up else retry).append(request)
    return _Verdict(culprits, abandoned, retry)


def _last_started_per_worker(requests: list[_Request]) -> list[_Request]:
    """The request each worker started last, among ``requests``."""
    last: dict[int, _Request] = {}
    for request in sorted(requests, key=lambda request: request.started):
        if request.pid is not None:
            last[request.pid] = request
    return list(last.values())


def _resolve(future: Future[str], outcome: _Outcome) -> None:
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
    try:
        with process.oneshot():
            rss = int(process.memory_info().rss)
            cpu_percent = float(process.cpu_percent(interval=None))
    except psutil.NoSuchProcess:
        return None
    return {"pid": pid, "rss": rss, "cpu_percent": cpu_percent, "served": served}
