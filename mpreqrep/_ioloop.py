"""The acceptor thread: one selector loop that accepts, reads and replies.

Owns the loop itself: :meth:`IOLoop.serve` runs select, hands each ready
socket to its step, runs the timers that came due, replies for the futures
that finished (those a timer failed too), expires deadlines, and closes
everything when it ends. The steps live in their own
modules, one concern each, and this one only wires them together:

- :mod:`mpreqrep._reactor` (on :mod:`mpreqrep._loopcore`): the selector,
  the wake-up socketpair, ``call_soon``, ``call_later``,
  ``add_reader``/``remove_reader`` (the class this builds on);
- :mod:`mpreqrep._acceptor`: the listener: accepting with back-off,
  pausing while there is no room, the stop linger and the backlog sweep;
- :mod:`mpreqrep._connection`: each connection's state and its read,
  write and close steps, under one guard per step;
- :mod:`mpreqrep._handoff`: the wait: dispatch, the queue for room, the
  request timeout, the futures' way back from other threads;
- :mod:`mpreqrep._deadlines` and :mod:`mpreqrep._budget`: the timeouts
  of each phase, and the bound on buffered bytes.

It hands each complete request to a :class:`~mpreqrep._dispatch.Dispatcher`
and never waits on a handler: replies come back through future callbacks,
which queue the future and wake the selector. It knows nothing of loky,
psutil or the server class.

Data flow across threads::

    I/O thread                                   handler threads / pool
    ──────────                                   ──────────────────────
    accept ─▶ read ─▶ framing ─▶ submit(text) ─────────▶ handle_request
                                                                │
    write ◀─ reply ◀─ _completed deque ◀─ done callback ◀───────┘
       │                  (+ 1 byte on the wake-up socket)
       ▼
    SHUT_WR, close

Each connection moves READING → WAITING → WRITING → CLOSED; each phase has
its own deadline (read timeout, request timeout, write timeout: the last one
measures progress). Whatever a step raises costs only that connection, so
the loop ends only through :meth:`IOLoop.request_stop` (or Ctrl-C on the
main thread). The bytes buffered for connections are kept under a bound:
past it, no connection is accepted and no request dispatched.
"""

from __future__ import annotations

import threading
import time

from ._acceptor import Acceptor
from ._budget import BufferBudget
from ._connection import READING, Connection, Connections
from ._deadlines import Deadlines, select_timeout
from ._handoff import Handoff
from ._reactor import Reactor, log_failure
from ._stats import ServerStats

TYPE_CHECKING = False  # typing is not imported at run time (import cost, see README)
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable

    from ._dispatch import Dispatcher


class IOLoop(Reactor):
    """Accepts connections and moves each through read → submit → reply → close.

    Args:
        listener: a bound, listening TCP socket; closed when serving ends.
        dispatcher: runs ``handle_request`` for each complete request.
        read_timeout_s: how long a client may take to send its request (and
            to take its reply) before it is dropped.
        request_timeout_s: how long a handler may run before its client is
            dropped without a reply; ``None`` for no limit.
        max_request_size: bytes a request may reach without a CRLF.
        max_pending: requests submitted and not yet answered past which no
            new connection is accepted; ``None`` for no limit.
        max_buffered_bytes: request and reply bytes buffered for connections
            past which no new connection is accepted and no new request is
            dispatched; the requests in flight count as replies as large as
            the largest of the last ``REPLY_SIZE_MEMORY_S`` seconds (so a
            burst of big replies cannot overshoot it by more than about one
            of them); ``None`` for no limit.
        on_accept: called with the peer address of each accepted connection.

    Thread safety: :meth:`serve` runs in one thread; :meth:`request_stop`,
    :meth:`call_soon`, :meth:`call_later` and the future callbacks may come
    from any thread.
    """

    def __init__(
        self,
        listener: socket.socket,
        dispatcher: Dispatcher,
        *,
        read_timeout_s: float,
        request_timeout_s: float | None,
        max_request_size: int,
        max_pending: int | None,
        max_buffered_bytes: int | None = None,
        on_accept: Callable[[object], None] | None = None,
    ) -> None:
        super().__init__()
        self.stats = ServerStats()
        self._dispatcher = dispatcher
        self._buffers = BufferBudget(max_buffered_bytes)
        self._read_deadlines = Deadlines(read_timeout_s)
        self._request_deadlines = Deadlines(request_timeout_s)
        self._write_deadlines = Deadlines(read_timeout_s)
        self._deadline_queues = (
            self._read_deadlines,
            self._request_deadlines,
            self._write_deadlines,
        )
        self._wire(listener, max_request_size, max_pending, on_accept)

    def _wire(
        self,
        listener: socket.socket,
        max_request_size: int,
        max_pending: int | None,
        on_accept: Callable[[object], None] | None,
    ) -> None:
        """Build the connection steps, the handoff and the acceptor, and link them."""
        steps = Connections(
            self._selector,
            buffers=self._buffers,
            stats=self.stats,
            read_deadlines=self._read_deadlines,
            write_deadlines=self._write_deadlines,
            max_request_size=max_request_size,
            on_accept=on_accept,
        )
        self._handoff = handoff = Handoff(
            self._dispatcher,
            steps,
            buffers=self._buffers,
            stats=self.stats,
            request_deadlines=self._request_deadlines,
            max_pending=max_pending,
            wake_nowait=self._wake_nowait,
        )
        steps.on_request = handoff.submit
        self._acceptor = Acceptor(
            listener,
            self._selector,
            open_connection=steps.open,
            can_accept=handoff.can_accept,
            connections=steps.live,
        )
        self._connections = steps.live
        # The steps the loop runs, bound once (no attribute chain per event).
        self._guarded, self._read, self._write = steps.guarded, steps.read, steps.write
        self._drop, self._close = steps.drop, steps.close
        self._reply_completed = handoff.reply_completed

    # -- control, from any thread -------------------------------------------------

    def request_stop(self) -> None:
        """Stop soon (see :mod:`mpreqrep._acceptor`); :meth:`serve` returns once the
        listener is closed and every accepted request is done. Idempotent."""
        self._acceptor.request_stop()
        self._wake_nowait()

    def close(self) -> None:
        """Release every socket of a loop that will not serve (after a failed
        start); :meth:`serve` does this itself when it ends."""
        self._close_everything()

    @property
    def buffered_bytes(self) -> int:
        """Request and reply bytes buffered for connections now (any thread)."""
        return self._buffers.held

    def counts(self) -> tuple[int, int, int]:
        """Requests in flight, requests queued for room, connections still reading."""
        in_flight, queued = len(self._handoff.in_flight), len(self._handoff.queued)
        return in_flight, queued, max(len(self._connections) - in_flight - queued, 0)

    # -- the loop ---------------------------------------------------------------------

    def serve(self) -> None:
        """Serve until :meth:`request_stop`, then drain and close every socket."""
        self._acceptor.start()
        self._watch_wakeups()
        self._handoff.serving_thread = threading.get_ident()
        self._dispatcher.attach(self)
        try:
            while self._keep_serving():
                for key, _ in self._selector.select(self._select_timeout()):
                    self._handle_event(key.data)
                now = time.monotonic()
                self._run_timers(now)  # before the replies: a timer may finish futures
                self._reply_completed()
                self._expire_deadlines(now)
                self._end_pass()  # the calls queued on this thread, once no event waits
        finally:
            self._close_everything()

    def _keep_serving(self) -> bool:
        """Update the listener's watch (closing it once a stop is due); whether the
        listener or any connection is left to serve."""
        return self._acceptor.update() or bool(self._connections)

    def _handle_event(self, target: Connection | Callable[[], None]) -> None:
        """Run the step a ready socket is waiting for."""
        if isinstance(target, Connection):
            self._guarded(target, self._read if target.phase == READING else self._write)
            return
        try:
            target()
        except BaseException as exc:
            log_failure(exc, "a reader callback on the I/O loop failed")

    def _select_timeout(self) -> float | None:
        """Seconds until the next deadline, timer or accept back-off, ``None`` if none;
        0 while calls put off by the last pass wait."""
        if self._calls:
            return 0.0
        wake_at, timer_at = self._acceptor.wakeup_time(), self._next_timer_at()
        if timer_at is not None and (wake_at is None or timer_at < wake_at):
            wake_at = timer_at
        return select_timeout(wake_at, self._deadline_queues)

    def _expire_deadlines(self, now: float) -> None:
        """Drop the connections whose current phase ran out of time."""
        for conn in self._read_deadlines.pop_expired(now):
            self._guarded(conn, self._drop, "read timeout")
        for conn in self._write_deadlines.pop_expired(now):
            self._guarded(conn, self._drop, "no write progress within the read timeout")
        for conn in self._request_deadlines.pop_expired(now):
            self._guarded(conn, self._handoff.time_out_request)

    def _close_everything(self) -> None:
        """Release every socket this loop owns (after a drain, or after a crash)."""
        self._refuse_calls()
        for conn in list(self._connections):
            self._guarded(conn, self._close)
        self._acceptor.close()
        self._close_selector()
