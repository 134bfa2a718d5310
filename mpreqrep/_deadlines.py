"""Deadlines of the I/O loop: one queue per connection phase, and select's timeout.

Owns the deadline queues (read, request and write timeouts) and the rule
that turns the earliest deadline into a ``select()`` timeout. Each queue
holds one phase with one duration, so insertion order is time order: no
heap is needed, and a connection leaving the phase is forgotten at once.
It must not know about sockets, the selector or what an expired connection
costs: the loop decides that (see :mod:`mpreqrep._ioloop`).
"""

from __future__ import annotations

import time

TYPE_CHECKING = False  # typing is not imported at run time (import cost, see README)
if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._connection import Connection

MAX_SELECT_TIMEOUT_S = 3600.0  # a farther deadline (say 1e300 s) would overflow select()


class Deadlines:
    """Deadlines of one phase and one duration, hence already in time order.

    Held in an insertion-ordered dict keyed by connection, so a connection
    leaving the phase (or closing) is forgotten at once: nothing keeps a
    finished connection, or its buffers, alive until its deadline.

    Args:
        duration_s: how long a connection may stay in the phase; ``None``
            for no limit (nothing is then held).
    """

    def __init__(self, duration_s: float | None) -> None:
        self._duration_s = duration_s
        self._entries: dict[Connection, float] = {}

    def schedule(self, conn: Connection, now: float) -> None:
        """Give ``conn`` this phase's deadline, counted from ``now``."""
        if conn.deadlines is not None:
            conn.deadlines.discard(conn)
        if self._duration_s is not None:
            self._entries[conn] = now + self._duration_s
            conn.deadlines = self

    def discard(self, conn: Connection) -> None:
        """Forget ``conn``'s deadline in this phase."""
        self._entries.pop(conn, None)
        conn.deadlines = None

    def pop_expired(self, now: float) -> list[Connection]:
        """Remove and return the connections whose deadline has passed."""
        expired = []
        entries = self._entries
        while entries:
            conn, deadline = next(iter(entries.items()))
            if deadline > now:
                break
            self.discard(conn)
            expired.append(conn)
        return expired

    def next_deadline(self) -> float | None:
        """The earliest deadline held, or ``None``."""
        return next(iter(self._entries.values()), None)


def forget_deadline(conn: Connection) -> None:
    """Drop the connection's deadline in whatever phase it is."""
    if conn.deadlines is not None:
        conn.deadlines.discard(conn)


def select_timeout(earliest: float | None, queues: Iterable[Deadlines]) -> float | None:
    """Seconds until the earliest of ``earliest`` and the queues' deadlines.

    Args:
        earliest: a monotonic time the loop must wake at anyway, or ``None``.
        queues: the deadline queues to look at.

    Returns:
        The wait, at least 0 and at most ``MAX_SELECT_TIMEOUT_S``; ``None``
        if there is no deadline at all (wait until an event).
    """
    for deadlines in queues:
        deadline = deadlines.next_deadline()
        if deadline is not None and (earliest is None or deadline < earliest):
            earliest = deadline
    if earliest is None:
        return None
    return min(max(earliest - time.monotonic(), 0.0), MAX_SELECT_TIMEOUT_S)
