"""The supervisor's table of worker processes by pid, and its counters (thread-safe).

gunicorn's arbiter keeps the same table. The supervisor thread adds and
removes workers and counts restarts and failed starts; any thread reads the
figures (``stats()``) and the workers serving. Knows nothing of requests,
sockets, the turnover plan or stopping.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ._process import WorkerProcess

RESTART_CAUSES = ("crashed", "timed_out", "recycled", "reloaded", "killed")

REMOVED = "removed"
"""The cause of a worker retired by resizing down: not a restart."""

logger = logging.getLogger("mpreqrep")


class WorkerTable:
    """Worker processes by pid, restarts by cause and failed starts.

    Thread safety: :meth:`figures`, :meth:`ready` and :meth:`kill_all` from
    any thread; the rest from the supervisor thread (reads there need no
    lock: only that thread writes).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._workers: dict[int, WorkerProcess] = {}
        self._restarts = dict.fromkeys(RESTART_CAUSES, 0)
        self._start_failures = 0
        self._closed = False

    def __len__(self) -> int:
        return len(self._workers)

    @property
    def closed(self) -> bool:
        """Whether :meth:`kill_all` ran: no worker is to start any more."""
        return self._closed

    def get(self, pid: int) -> WorkerProcess | None:
        """The worker ``pid``, ``None`` if it is not (or no longer) in the table."""
        return self._workers.get(pid)

    def workers(self) -> list[WorkerProcess]:
        """Every worker, starting ones included (a copy)."""
        return list(self._workers.values())

    def starting(self) -> list[WorkerProcess]:
        """The workers that have not loaded the handler yet."""
        return [worker for worker in self._workers.values() if not worker.ready]

    def add(self, worker: WorkerProcess) -> bool:
        """Take in a new worker; ``False`` (and it is killed) once :meth:`kill_all` ran."""
        with self._lock:
            if not self._closed:
                self._workers[worker.pid] = worker
                return True
        worker.kill("killed")
        return False

    def remove(self, worker: WorkerProcess) -> None:
        """Forget a reaped worker."""
        with self._lock:
            del self._workers[worker.pid]

    def kill(self, pids: list[int], cause: str) -> None:
        """Kill the workers ``pids`` (those still in the table) for ``cause``."""
        for pid in pids:
            worker = self._workers.get(pid)
            if worker is not None:
                worker.kill(cause)

    def kill_slow_starters(self, now: float, timeout_s: float) -> None:
        """Kill the workers that did not load the handler within ``timeout_s``."""
        for worker in self.starting():
            if now - worker.started_at >= timeout_s:
                worker.kill(f"did not start within {timeout_s} s")

    def count_end(self, worker: WorkerProcess, status: int | None) -> None:
        """Count and log the end of a serving worker (replaced for its ``cause``, or
        ``crashed``; unknown causes count as ``killed``, removed ones not at all)."""
        cause = worker.cause or "crashed"
        if cause != REMOVED:
            with self._lock:
                self._restarts[cause if cause in self._restarts else "killed"] += 1
        level = logging.INFO if cause in ("recycled", "reloaded", REMOVED) else logging.WARNING
        logger.log(level, "worker %d ended (%s, exit status %s)", worker.pid, cause, status)

    def count_start_failure(self) -> None:
        with self._lock:
            self._start_failures += 1

    def ready(self) -> list[WorkerProcess]:
        """The workers serving their channel (any thread)."""
        with self._lock:
            return [worker for worker in self._workers.values() if worker.ready]

    def figures(self, wanted: int) -> dict[str, Any]:
        """Wanted, alive and starting workers, restarts by cause, failed starts (any thread)."""
        with self._lock:
            workers = list(self._workers.values())
            return {
                "workers_wanted": wanted,
                "workers_alive": sum(worker.ready for worker in workers),
                "workers_starting": sum(not worker.ready for worker in workers),
                **{f"restarts_{cause}": count for cause, count in self._restarts.items()},
                "start_failures": self._start_failures,
            }

    def kill_all(self) -> None:
        """Kill every worker and take in no more (any thread: interpreter exit)."""
        with self._lock:
            self._closed = True
            workers = list(self._workers.values())
        for worker in workers:
            worker.kill("killed")
