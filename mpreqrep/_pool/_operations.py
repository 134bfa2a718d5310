"""Carrying out the turnover: rolling restarts, recycling and resizing on the table.

:class:`~._turnover.Turnover` decides, sans I/O, who may retire and how many
workers to start; :class:`Operations` applies its plan to the live table
(supervisor thread): it marks why each worker goes, retires serving ones
through the pool (they drain, then exit) and kills unwanted starting ones.
Every planned retirement takes this one path: ``restart_workers()``, a
worker past ``max_requests`` or ``max_worker_memory``, and ``resize(n)``::

    restart() / recycle(pid) ─▶ turnover.replace ─┐
    resize(n) ─▶ turnover.resize ─────────────────┼─▶ turn_over(): plan ─▶ retire │ drop
    missing() ◀─ how many to start (one at a time while replacements wait)

Knows nothing of sockets, the thread or stopping.
"""

from __future__ import annotations

import logging
from typing import Protocol

from ._process import WorkerProcess
from ._table import REMOVED, WorkerTable
from ._turnover import Turnover

logger = logging.getLogger("mpreqrep")


class Retirer(Protocol):
    """The pool's side of a retirement."""

    def retire_worker(self, worker: WorkerProcess) -> None:
        """Send a ready worker no more requests; it exits once it answered its own."""


class Operations:
    """Applies the turnover's plan to the table.

    Args:
        pool: retires serving workers (the dispatcher).
        table: the supervisor's table.
        workers: how many workers to keep at first.

    Thread safety: :meth:`resize` and :attr:`wanted` from any thread (one
    int); the rest on the supervisor thread.
    """

    def __init__(self, pool: Retirer, table: WorkerTable, workers: int) -> None:
        self._pool = pool
        self._table = table
        self._turnover = Turnover(workers)

    @property
    def wanted(self) -> int:
        """How many workers the pool keeps."""
        return self._turnover.wanted

    def resize(self, workers: int) -> None:
        """Keep ``workers`` workers from now on (the next :meth:`turn_over` acts).

        Raises:
            ValueError: ``workers`` is below 1.
        """
        self._turnover.resize(workers)

    def restart(self) -> None:
        """Replace every serving worker, one at a time, each once its successor serves."""
        for worker in self._table.workers():
            if worker.ready and not worker.retired:
                worker.cause = worker.cause or "reloaded"
                self._turnover.replace(worker.pid, recycling=False)

    def recycle(self, pid: int) -> None:
        """Retire worker ``pid`` as soon as another serves (it reached a limit)."""
        worker = self._table.get(pid)
        if worker is not None:
            worker.cause = worker.cause or "recycled"
            self._turnover.replace(pid, recycling=True)

    def missing(self) -> int:
        """How many workers to start now, before any back-off."""
        return self._turnover.missing(self._table.workers())

    def forget(self, pid: int) -> None:
        """Worker ``pid`` is gone: nothing to replace any more."""
        self._turnover.forget(pid)

    def turn_over(self) -> None:
        """Retire the workers the plan says may go, drop unwanted starting ones."""
        plan = self._turnover.plan(self._table.workers())
        for pid in plan.drop:
            self._worker(pid).kill(REMOVED)
        for pid in plan.retire:
            worker = self._worker(pid)
            worker.cause = worker.cause or REMOVED
            worker.retired = True
            logger.info("worker %d retires (%s): it finishes its requests first", pid, worker.cause)
            self._pool.retire_worker(worker)

    def _worker(self, pid: int) -> WorkerProcess:
        worker = self._table.get(pid)
        assert worker is not None, "the plan names workers of the table"
        return worker
