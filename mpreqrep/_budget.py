"""The bound on bytes the I/O loop buffers for its connections.

Owns the count of request and reply bytes held for connections and the
estimate of the replies still to come. Past the bound the loop accepts no
connection and dispatches no request, so slow readers cannot make the
server buffer without limit. It must not know about sockets, the selector
or the dispatcher: the loop asks :meth:`BufferBudget.has_room` and reports
what it holds.
"""

from __future__ import annotations

import time

TYPE_CHECKING = False  # typing is not imported at run time (import cost, see README)
if TYPE_CHECKING:
    from ._connection import Connection

REPLY_SIZE_MEMORY_S = 10.0  # how long a large reply counts as the size of those to come


class BufferBudget:
    """The request and reply bytes buffered for connections, against a bound.

    It also sizes the replies still to come: each request in flight counts
    as large as the largest reply of the last ``REPLY_SIZE_MEMORY_S`` seconds,
    so that a burst of big replies overshoots the bound by about one at most.

    Args:
        bound: bytes past which there is no room; ``None`` for no bound.
    """

    def __init__(self, bound: int | None) -> None:
        self._bound = bound
        self.held = 0
        self._large_reply_size = 0
        self._large_reply_until = 0.0

    def hold(self, conn: Connection, size: int) -> None:
        """Record that ``size`` bytes are buffered for ``conn`` now."""
        self.held += size - conn.held
        conn.held = size

    def note_reply(self, size: int) -> None:
        """Count a reply of ``size`` bytes about to be written."""
        if self._bound is None:
            return
        now = time.monotonic()
        if size >= self._large_reply_size or now >= self._large_reply_until:
            self._large_reply_size = size
            self._large_reply_until = now + REPLY_SIZE_MEMORY_S

    def has_room(self, pending: int) -> bool:
        """Whether one more request fits beside ``pending`` ones whose replies are
        still to come. With nothing held or pending, one request may always go."""
        bound = self._bound
        if bound is None:
            return True
        if self.held >= bound:
            return False
        if not pending:
            return True
        expected = self._large_reply_size if time.monotonic() < self._large_reply_until else 0
        return self.held + pending * expected < bound
