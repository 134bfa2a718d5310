"""The wait of each request: dispatch, back-pressure, replies from other threads.

Owns the WAITING phase of a connection: the requests queued for room (under
``max_pending`` and the buffer bound), the futures in flight, the request
timeout, and the way a finished future comes back to the I/O thread. It
never waits on a handler. It must not know how a handler runs (that is
behind the :class:`~mpreqrep._dispatch.Dispatcher` seam) nor how bytes are
read or written (:mod:`mpreqrep._connection`).

Data flow across threads::

    I/O thread                                   handler threads / pool
    ──────────                                   ──────────────────────
    read ─▶ submit ─▶ (queue for room) ─▶ dispatcher.submit(text) ─▶ handle_request
                                                                          │
    start_writing ◀─ _reply ◀─ _completed deque ◀─ done callback ◀────────┘
                                 (+ 1 byte on the wake-up socket)
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import CancelledError

from ._connection import WAITING
from ._errors import RequestTimeoutError
from ._framing import encode_message

TYPE_CHECKING = False  # typing is not imported at run time (import cost, see README)
if TYPE_CHECKING:
    from collections.abc import Callable
    from concurrent.futures import Future

    from ._budget import BufferBudget
    from ._connection import Connection, Connections
    from ._deadlines import Deadlines
    from ._dispatch import Dispatcher
    from ._stats import ServerStats

logger = logging.getLogger("mpreqrep")


class Handoff:
    """Hands complete requests to the dispatcher and their replies back.

    Args:
        dispatcher: runs ``handle_request`` for each request.
        connections: the steps that write a reply and close a connection.
        buffers: the bound on buffered bytes (room for one more request).
        stats: the failed and timed-out counts.
        request_deadlines: the request timeout, from the end of the read.
        max_pending: requests in flight past which the others queue;
            ``None`` for no limit.
        wake_nowait: makes the I/O thread's selector return (any thread).

    Thread safety: I/O thread only, but for the futures' done callbacks.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        connections: Connections,
        *,
        buffers: BufferBudget,
        stats: ServerStats,
        request_deadlines: Deadlines,
        max_pending: int | None,
        wake_nowait: Callable[[], None],
    ) -> None:
        self.serving_thread: int | None = None  # set by the loop when it serves
        self.in_flight: dict[Future[str], Connection] = {}
        self.queued: collections.deque[tuple[Connection, str]] = collections.deque()
        self._completed: collections.deque[Future[str]] = collections.deque()
        self._wake_pending = False
        self._dispatcher = dispatcher
        self._guarded = connections.guarded
        self._unwatch = connections.unwatch
        self._start_writing = connections.start_writing
        self._close = connections.close
        self._buffers = buffers
        self._stats = stats
        self._request_deadlines = request_deadlines
        self._max_pending = max_pending
        self._wake_nowait = wake_nowait

    # -- room ---------------------------------------------------------------------------

    def can_accept(self) -> bool:
        """Whether one more connection fits: room with the queued requests counted."""
        return self._has_room(len(self.queued))

    def _has_room(self, extra: int = 0) -> bool:
        """Whether one more request fits beside those in flight and ``extra`` more:
        under ``max_pending``, and under the buffer bound (else a new request
        waits in the queue, a new connection in the backlog, till slow readers
        drain)."""
        pending = len(self.in_flight) + extra
        if self._max_pending is not None and pending >= self._max_pending:
            return False
        return self._buffers.has_room(pending)

    # -- dispatching --------------------------------------------------------------------

    def submit(self, conn: Connection, request: str) -> None:
        """Start the request's wait: dispatch it now, or queue it while the
        dispatcher holds ``max_pending`` requests."""
        self._unwatch(conn)
        self._buffers.hold(conn, 0)
        conn.phase = WAITING
        self._request_deadlines.schedule(conn, time.monotonic())
        if self.queued or not self._has_room():
            self.queued.append((conn, request))
        else:
            self._dispatch(conn, request)

    def _dispatch_queued(self) -> None:
        """Dispatch queued requests while there is room (skipping timed-out ones)."""
        while self.queued and self._has_room():
            conn, request = self.queued.popleft()
            if conn.phase == WAITING:
                self._guarded(conn, self._dispatch, request)

    def _dispatch(self, conn: Connection, request: str) -> None:
        """Hand the request to the dispatcher; reply now if it is already done."""
        future = self._dispatcher.submit(request)
        if future.done():
            self._reply(conn, future)
            return
        conn.future = future
        self.in_flight[future] = conn
        future.add_done_callback(self._on_future_done)

    # -- replies ------------------------------------------------------------------------

    def _on_future_done(self, future: Future[str]) -> None:
        """Queue a finished future for the I/O thread (runs in any thread).

        On the I/O thread itself (a dispatcher reading replies there) no
        wake-up is needed: the loop replies after every pass.
        """
        self._completed.append(future)
        if threading.get_ident() != self.serving_thread and not self._wake_pending:
            self._wake_pending = True
            self._wake_nowait()

    def reply_completed(self) -> None:
        """Reply for every future finished since the last pass."""
        self._wake_pending = False
        completed = self._completed
        while completed:
            conn = self.in_flight.pop(completed.popleft(), None)
            if conn is not None:
                self._guarded(conn, self._reply, conn.future)
        self._dispatch_queued()

    def _reply(self, conn: Connection, future: Future[str]) -> None:
        """Start writing the reply, or close with none if the handler failed:
        it raised (anything, ``BaseException`` included), its reply cannot be
        encoded (a lone surrogate, say), or its future was cancelled (say by
        an executor shut down under it)."""
        try:
            exc = future.exception()  # never future.result(): it would raise here
        except CancelledError as cancelled:
            exc = cancelled
        if exc is None:
            try:
                outgoing = encode_message(future.result())
            except UnicodeEncodeError as unencodable:
                exc = unencodable
            else:
                self._start_writing(conn, outgoing)
                return
        self._fail(conn, exc)

    def _fail(self, conn: Connection, exc: BaseException) -> None:
        """Log why there is no reply, count it, and close the connection."""
        if isinstance(exc, RequestTimeoutError):  # not a handler's own TimeoutError
            self._stats.timed_out += 1
            logger.warning("request from %s timed out: %s; no reply", conn.peer, exc)
        else:
            self._stats.failed += 1
            logger.error("handle_request failed for %s", conn.peer, exc_info=exc)
        self._close(conn)

    def time_out_request(self, conn: Connection) -> None:
        """Give up on a handler that ran too long: no reply, the connection closes."""
        future = conn.future
        if future is not None:
            self.in_flight.pop(future, None)
            future.cancel()
        self._stats.timed_out += 1
        logger.warning("request from %s timed out; closing without a reply", conn.peer)
        self._close(conn)
