"""Stopping the pool: drain, close the channels, give up after the graceful timeout, kill.

Once stopping is asked, the workers answer what they were sent (the
supervisor keeps the pool whole meanwhile: a worker that dies is still
replaced), then every channel closes and each worker exits on its own; one
still alive :data:`SHUTDOWN_GRACE_S` later is killed. With a graceful
timeout (``begin_stop``), when it passes every request still taken fails and
every worker is killed, frozen ones too::

    request() ─▶ closing ─▶ wind_down(): pool idle? ── no ─▶ keep serving
                                │ yes
                                ▼
                 released: pool.release() (channels close, workers exit),
                 starting workers killed ─▶ +SHUTDOWN_GRACE_S: kill the rest
    arm(t) ─▶ give_up_if_due(now >= t): pool.abandon(), kill every worker

Runs on the supervisor thread (:meth:`Shutdown.request` from any). Knows
nothing of the thread, sockets or spawning.
"""

from __future__ import annotations

import logging
from typing import Protocol

from ._process import WorkerProcess
from ._table import WorkerTable

logger = logging.getLogger("mpreqrep")

SHUTDOWN_GRACE_S = 5.0
"""How long workers may take to exit once their channels are closed; then they are killed."""


class Draining(Protocol):
    """The pool's side of stopping."""

    def is_idle(self) -> bool:
        """Whether no request is waiting or on a worker."""

    def release(self) -> None:
        """Close every channel (shutting down, idle): the workers exit."""

    def abandon(self) -> None:
        """The graceful timeout passed: fail every request taken, refuse new ones."""


class Shutdown:
    """Where stopping stands, and what it does to the pool and the table next.

    Args:
        pool: the dispatcher side.
        table: the supervisor's table.

    Attributes:
        closing: stopping was asked (or the pool cannot go on).
        released_at: when the channels were closed, ``None`` before.
        given_up: the graceful timeout passed.
    """

    def __init__(self, pool: Draining, table: WorkerTable) -> None:
        self._pool = pool
        self._table = table
        self.closing = False
        self.released_at: float | None = None
        self.given_up = False
        self._give_up_at: float | None = None

    def request(self) -> None:
        """Stop once the pool is idle (any thread)."""
        self.closing = True

    def arm(self, give_up_at: float) -> None:
        """Give up at ``give_up_at`` (monotonic) if still running then; the first call wins."""
        if self._give_up_at is None:
            self._give_up_at = give_up_at

    @property
    def ending(self) -> bool:
        """Whether workers now end on purpose (channels closed, or given up)."""
        return self.given_up or self.released_at is not None

    def finished(self) -> bool:
        """Whether stopping was asked, the channels are closed and every worker ended."""
        return self.closing and self.released_at is not None and not len(self._table)

    def give_up_if_due(self, now: float) -> None:
        """Once the graceful timeout passed: fail what is left, kill every worker."""
        if self._give_up_at is None or now < self._give_up_at or self.given_up:
            return
        self.given_up = True
        busy = not self._pool.is_idle()
        self._pool.abandon()
        if busy:
            logger.warning("graceful timeout: killing the workers with requests still running")
        self._kill(self._table.workers())

    def wind_down(self, now: float, *, booting: bool) -> bool:
        """One step of stopping; whether requests still wait for workers (keep the pool whole)."""
        if self.released_at is None and not (booting or self.given_up or self._pool.is_idle()):
            return True
        if self.released_at is None:
            self.released_at = now
            self._pool.release()  # ready workers exit once their channel closes
            self._kill(self._table.starting())  # no request on them: no need to wait
        elif now - self.released_at >= SHUTDOWN_GRACE_S:
            self._kill(self._table.workers())
        return False

    def timeouts(self, now: float) -> list[float | None]:
        """Seconds until the grace period ends and until the graceful timeout passes."""
        return [
            None
            if self.released_at is None or not len(self._table)
            else self.released_at + SHUTDOWN_GRACE_S - now,
            None if self._give_up_at is None or self.given_up else self._give_up_at - now,
        ]

    @staticmethod
    def _kill(workers: list[WorkerProcess]) -> None:
        for worker in workers:
            worker.kill("killed")
