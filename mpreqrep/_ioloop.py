"""The acceptor thread: one selector loop that accepts, reads and replies.

Owns the listening socket once serving starts, every accepted connection, the
per-connection deadlines and the wake-up socketpair. It hands each complete
request to a :class:`~mpreqrep._dispatch.Dispatcher` and never waits on a
handler: replies come back through future callbacks, which queue the future
and wake the selector. It knows nothing of loky, psutil or the server class.

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
measures progress). Every socket is closed in exactly one place,
:meth:`IOLoop._close`. Every step of a connection runs under one guard,
:meth:`IOLoop._guarded`: whatever it raises costs only that connection, so
the loop ends only through :meth:`IOLoop.request_stop` (or Ctrl-C on the
main thread). The bytes buffered for connections are kept under a bound by
:class:`_BufferBudget`: past it, no connection is accepted and no request
dispatched.

Stopping (so that yoton's idiom, ``stop()`` then at once one more request as a
trigger, is answered): after :meth:`IOLoop.request_stop` the listener stays
open for ``STOP_LINGER_S`` and for as long as requests accepted before the
stop are still running, whichever is longer; connections that arrive in that
time are served as usual, but do not keep the listener open. Then the
connections already waiting in the kernel's backlog are accepted (up to
``STOP_SWEEP_MAX``) and the listener is closed; :meth:`IOLoop.serve` returns
once every accepted connection is done. An idle server thus stops in about
``STOP_LINGER_S``. A client that connects in the instant between the last
accept and the close is reset by the kernel (the client sees ``""``); one
that connects later is refused (``NoServerError``).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future

from ._dispatch import Dispatcher
from ._errors import RequestTimeoutError, RequestTooLargeError
from ._framing import LineReceiver, encode_message
from ._stats import ServerStats

TYPE_CHECKING = False  # typing is not imported at run time (import cost, see README)
if TYPE_CHECKING:
    from typing import Any

logger = logging.getLogger("mpreqrep")

RECV_CHUNK_SIZE = 65536
ACCEPT_BATCH_SIZE = 256
ACCEPT_BACKOFF_S = 0.1
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Linux: hold back the reply's last segment until SHUT_WR, so it leaves with the FIN
# (one segment, not two: about 5 µs less server CPU per request over loopback).
SEND_FLAGS = getattr(socket, "MSG_MORE", 0)
DEFER_ACCEPT_S = 1
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
MAX_SELECT_TIMEOUT_S = 3600.0  # a farther deadline (say 1e300 s) would overflow select()
REPLY_SIZE_MEMORY_S = 10.0  # how long a large reply counts as the size of those to come
STOP_LINGER_S = 0.05
STOP_SWEEP_MAX = 1024

READING, WAITING, WRITING, CLOSED = "reading", "waiting", "writing", "closed"


class _Connection:
    """One accepted socket and where it is in its request-reply exchange."""

    __slots__ = (
        "accepted_at",
        "deadlines",
        "events",
        "future",
        "held",
        "outgoing",
        "peer",
        "phase",
        "receiver",
        "sock",
    )

    def __init__(self, sock: socket.socket, peer: object, receiver: LineReceiver, now: float):
        self.sock = sock
        self.peer = peer
        self.receiver = receiver
        self.accepted_at = now
        self.phase = READING
        self.events = 0
        self.deadlines: _Deadlines | None = None
        self.future: Future[str] | None = None
        self.outgoing: bytes | memoryview = b""
        self.held = 0  # request or reply bytes buffered for this connection


class _Deadlines:
    """Deadlines of one phase and one duration, hence already in time order.

    Held in an insertion-ordered dict keyed by connection, so a connection
    leaving the phase (or closing) is forgotten at once: nothing keeps a
    finished connection, or its buffers, alive until its deadline.
    """

    def __init__(self, duration_s: float | None) -> None:
        self._duration_s = duration_s
        self._entries: dict[_Connection, float] = {}

    def schedule(self, conn: _Connection, now: float) -> None:
        """Give ``conn`` this phase's deadline, counted from ``now``."""
        if conn.deadlines is not None:
            conn.deadlines.discard(conn)
        if self._duration_s is not None:
            self._entries[conn] = now + self._duration_s
            conn.deadlines = self

    def discard(self, conn: _Connection) -> None:
        """Forget ``conn``'s deadline in this phase."""
        self._entries.pop(conn, None)
        conn.deadlines = None

    def pop_expired(self, now: float) -> list[_Connection]:
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


class _BufferBudget:
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

    def hold(self, conn: _Connection, size: int) -> None:
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


def _defer_accept(listener: socket.socket) -> None:
    """Linux: have the kernel hold a new connection until its first bytes (or FIN).

    The eager read at accept then finds the request, and the connection never
    goes through the selector (no register, wake-up, unregister): ~10 µs less
    server CPU per request. A client that stays silent is handed over after
    about ``DEFER_ACCEPT_S`` anyway, so its read timeout starts that much later.
    """
    # AttributeError: no TCP_DEFER_ACCEPT on this platform (or not a real socket).
    with contextlib.suppress(AttributeError, OSError):
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_S)


def _log_failure(exc: BaseException, message: str, *args: object) -> None:
    """Log ``exc`` with its traceback, unless it is Ctrl-C on the main thread,
    which is nobody's failure and must end serving: it is raised again."""
    if isinstance(exc, KeyboardInterrupt) and threading.current_thread() is threading.main_thread():
        raise exc
    logger.error(message, *args, exc_info=exc)


def _close_socket(sock: socket.socket, *, reset: bool) -> None:
    """SHUT_WR then close; never raises ``OSError``.

    With ``reset``, the close sends a reset instead (``SO_LINGER`` 0): for a
    reply cut short, so the client cannot take the part it got for all of it.
    """
    try:
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        else:
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the peer is gone already: nothing left to flush
    finally:
        with contextlib.suppress(OSError):  # the descriptor is released even then
            sock.close()


class IOLoop:
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

    Thread safety: :meth:`serve` runs in one thread; :meth:`request_stop` and
    the future callbacks may come from any thread.
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
        self.stats = ServerStats()
        self._listener = listener
        self._dispatcher = dispatcher
        self._max_request_size = max_request_size
        self._max_pending = max_pending
        self._buffers = _BufferBudget(max_buffered_bytes)
        self._on_accept = on_accept
        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._wake_pending = False
        self._serving_thread: int | None = None
        self._stop_requested = False
        self._linger_until: float | None = None
        self._draining: set[_Connection] | None = None
        self._listening = True
        self._accepting = False
        self._accept_paused_until = 0.0
        self._connections: set[_Connection] = set()
        self._in_flight: dict[Future[str], _Connection] = {}
        self._queued: collections.deque[tuple[_Connection, str]] = collections.deque()
        self._completed: collections.deque[Future[str]] = collections.deque()
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._calls_lock = threading.Lock()
        self._calls_open = True
        self._read_deadlines = _Deadlines(read_timeout_s)
        self._request_deadlines = _Deadlines(request_timeout_s)
        self._write_deadlines = _Deadlines(read_timeout_s)

    # -- control, from any thread -------------------------------------------------

    def request_stop(self) -> None:
        """Stop soon (see the module docstring); :meth:`serve` returns once the
        listener is closed and every accepted request is done. Idempotent."""
        if not self._stop_requested:
            self._linger_until = time.monotonic() + STOP_LINGER_S
            self._stop_requested = True
        self._wake_nowait()

    def call_soon(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` on the I/O thread soon (any thread).

        Returns:
            ``False`` once the loop has stopped: the caller runs it itself.
        """
        with self._calls_lock:
            if not self._calls_open:
                return False
            self._calls.append(callback)
        self._wake_nowait()
        return True

    def add_reader(self, fileobj: Any, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever ``fileobj`` is readable (I/O thread only)."""
        self._selector.register(fileobj, selectors.EVENT_READ, callback)

    def remove_reader(self, fileobj: Any) -> None:
        """Stop watching ``fileobj``; harmless if unwatched or stopped (I/O thread only)."""
        with contextlib.suppress(KeyError, ValueError, RuntimeError):
            self._selector.unregister(fileobj)

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
        in_flight, queued = len(self._in_flight), len(self._queued)
        return in_flight, queued, max(len(self._connections) - in_flight - queued, 0)

    # -- the loop ---------------------------------------------------------------------

    def serve(self) -> None:
        """Serve until :meth:`request_stop`, then drain and close every socket."""
        self._listener.setblocking(False)
        _defer_accept(self._listener)
        self._selector.register(self._wake_reader, selectors.EVENT_READ, self._drain_wake)
        self._serving_thread = threading.get_ident()
        self._dispatcher.attach(self)
        try:
            while self._keep_serving():
                for key, _ in self._selector.select(self._select_timeout()):
                    self._handle_event(key.data)
                self._reply_completed()
                self._expire_deadlines(time.monotonic())
        finally:
            self._close_everything()

    def _keep_serving(self) -> bool:
        """Update the listener's watch (closing it once a stop is due); whether the
        listener or any connection is left to serve."""
        self._update_accepting()
        return self._listening or bool(self._connections)

    def _handle_event(self, target: _Connection | Callable[[], None]) -> None:
        """Run the step a ready socket is waiting for."""
        if isinstance(target, _Connection):
            self._guarded(target, self._read if target.phase == READING else self._write)
            return
        try:
            target()
        except BaseException as exc:
            _log_failure(exc, "a reader callback on the I/O loop failed")

    def _guarded(self, conn: _Connection, step: Callable[..., None], *args: Any) -> None:
        """The one guard of every per-connection step (read, dispatch, reply, write,
        close): whatever the step raises, ``BaseException`` included, costs only
        this connection. It is logged with its traceback, counted as failed, and
        the connection closes without a reply (a reset if part of one was sent).

        A ``KeyboardInterrupt`` on the main thread is Ctrl-C, not a step's
        fault: it propagates. (A handler's own exceptions never propagate on
        this thread: they reach the loop inside its future.)
        """
        try:
            step(conn, *args)
        except BaseException as exc:
            _log_failure(exc, "error serving the connection from %s; no reply", conn.peer)
            self.stats.failed += 1
            if conn.phase != CLOSED:
                self._close(conn)

    def _select_timeout(self) -> float | None:
        """Seconds until the next deadline (or accept back-off), ``None`` if none."""
        earliest = self._accept_paused_until or None
        linger_until = self._linger_until
        if linger_until is not None and (earliest is None or linger_until < earliest):
            earliest = linger_until
        for deadlines in (self._read_deadlines, self._request_deadlines, self._write_deadlines):
            deadline = deadlines.next_deadline()
            if deadline is not None and (earliest is None or deadline < earliest):
                earliest = deadline
        if earliest is None:
            return None
        return min(max(earliest - time.monotonic(), 0.0), MAX_SELECT_TIMEOUT_S)

    # -- accepting ----------------------------------------------------------------------

    def _update_accepting(self) -> None:
        """Watch the listener while it is open, the pool has room and no accept
        back-off is running; close it once a stop is due."""
        if not self._listening:
            return
        if self._stop_requested and self._stop_is_due():
            self._sweep_backlog()
            self._close_listener()
            return
        if self._accept_paused_until and time.monotonic() >= self._accept_paused_until:
            self._accept_paused_until = 0.0
        should_accept = self._can_accept() and not self._accept_paused_until
        if should_accept != self._accepting:
            if should_accept:
                self._selector.register(self._listener, selectors.EVENT_READ, self._accept_batch)
            else:
                self._selector.unregister(self._listener)
            self._accepting = should_accept

    def _stop_is_due(self) -> bool:
        """Whether the linger is over and the requests accepted before the stop are done."""
        if self._draining is None:  # the first look since the stop
            self._draining = set(self._connections)
        elif self._draining:
            self._draining = {conn for conn in self._draining if conn.phase != CLOSED}
        if self._linger_until is not None:
            if time.monotonic() < self._linger_until:
                return False
            self._linger_until = None  # no more select timeouts for it
        return not self._draining

    def _sweep_backlog(self) -> None:
        """Accept what already waits in the backlog, so that it is answered too."""
        for _ in range(STOP_SWEEP_MAX):
            try:
                sock, peer = self._listener.accept()
            except OSError:  # BlockingIOError: the backlog is empty
                return
            self._open(sock, peer)

    def _accept_batch(self) -> None:
        """Accept the connections that are waiting, up to one batch."""
        for _ in range(ACCEPT_BATCH_SIZE):
            try:
                sock, peer = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                self._on_accept_error(exc)
                return
            self._open(sock, peer)
            if not self._can_accept():
                return

    def _can_accept(self) -> bool:
        """Whether one more connection fits: room with the queued requests counted."""
        return self._has_room(len(self._queued))

    def _has_room(self, extra: int = 0) -> bool:
        """Whether one more request fits beside those in flight and ``extra`` more:
        under ``max_pending``, and under the buffer bound (else a new request
        waits in the queue, a new connection in the backlog, till slow readers
        drain)."""
        pending = len(self._in_flight) + extra
        if self._max_pending is not None and pending >= self._max_pending:
            return False
        return self._buffers.has_room(pending)

    def _on_accept_error(self, exc: OSError) -> None:
        """Back off on resource exhaustion; ignore a peer that gave up (ECONNABORTED)."""
        if exc.errno in RESOURCE_ERRNOS:
            logger.warning("accept failed (%s); pausing accepts for %.2f s", exc, ACCEPT_BACKOFF_S)
            self._accept_paused_until = time.monotonic() + ACCEPT_BACKOFF_S
        else:
            logger.debug("accept failed: %s", exc)

    def _open(self, sock: socket.socket, peer: object) -> None:
        """Take a new connection into the loop and start its exchange."""
        conn = _Connection(sock, peer, LineReceiver(self._max_request_size), time.monotonic())
        self._connections.add(conn)
        self._guarded(conn, self._start)

    def _start(self, conn: _Connection) -> None:
        """Announce the connection, then read at once if data is there.

        The read deadline, counted from the accept, is only set if the
        request is not complete after that first read (usually it is, and
        then a reply is already on its way).
        """
        conn.sock.setblocking(False)
        if self._on_accept is not None:
            self._on_accept(conn.peer)
        self._read(conn)
        if conn.phase == READING:
            self._read_deadlines.schedule(conn, conn.accepted_at)

    # -- reading ------------------------------------------------------------------------

    def _read(self, conn: _Connection) -> None:
        """Read what has arrived; submit the request once it is complete."""
        try:
            data = conn.sock.recv(RECV_CHUNK_SIZE)
        except BlockingIOError:
            self._watch(conn, selectors.EVENT_READ)
            return
        except OSError as exc:
            self._drop(conn, f"read failed: {exc}")
            return
        if not data:
            self._read_eof(conn)
            return
        try:
            request = conn.receiver.receive_data(data)
        except RequestTooLargeError as exc:
            self._drop(conn, f"request too large ({exc})")
            return
        if request is None:
            self._buffers.hold(conn, conn.receiver.buffered_size)
            self._watch(conn, selectors.EVENT_READ)
        else:
            self._submit(conn, request)

    def _read_eof(self, conn: _Connection) -> None:
        """EOF ends the request (SPEC 1); a client that sent nothing gets nothing."""
        if conn.receiver.buffered_size == 0:
            self._drop(conn, "closed without sending a request")
        else:
            self._submit(conn, conn.receiver.receive_eof())

    # -- handling -----------------------------------------------------------------------

    def _submit(self, conn: _Connection, request: str) -> None:
        """Start the request's wait: dispatch it now, or queue it while the
        dispatcher holds ``max_pending`` requests."""
        self._unwatch(conn)
        self._buffers.hold(conn, 0)
        conn.phase = WAITING
        self._request_deadlines.schedule(conn, time.monotonic())
        if self._queued or not self._has_room():
            self._queued.append((conn, request))
        else:
            self._dispatch(conn, request)

    def _dispatch_queued(self) -> None:
        """Dispatch queued requests while there is room (skipping timed-out ones)."""
        while self._queued and self._has_room():
            conn, request = self._queued.popleft()
            if conn.phase == WAITING:
                self._guarded(conn, self._dispatch, request)

    def _dispatch(self, conn: _Connection, request: str) -> None:
        """Hand the request to the dispatcher; reply now if it is already done."""
        future = self._dispatcher.submit(request)
        if future.done():
            self._reply(conn, future)
            return
        conn.future = future
        self._in_flight[future] = conn
        future.add_done_callback(self._on_future_done)

    def _on_future_done(self, future: Future[str]) -> None:
        """Queue a finished future for the I/O thread (runs in any thread).

        On the I/O thread itself (a dispatcher reading replies there) no
        wake-up is needed: the loop replies after every pass.
        """
        self._completed.append(future)
        if threading.get_ident() != self._serving_thread and not self._wake_pending:
            self._wake_pending = True
            self._wake_nowait()

    def _reply_completed(self) -> None:
        """Reply for every future finished since the last pass."""
        self._wake_pending = False
        completed = self._completed
        while completed:
            conn = self._in_flight.pop(completed.popleft(), None)
            if conn is not None:
                self._guarded(conn, self._reply, conn.future)
        self._dispatch_queued()

    # -- replying -----------------------------------------------------------------------

    def _reply(self, conn: _Connection, future: Future[str]) -> None:
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

    def _start_writing(self, conn: _Connection, outgoing: bytes) -> None:
        """Leave the wait and send the first part of the reply."""
        self._forget_deadline(conn)
        conn.phase = WRITING
        conn.future = None
        conn.outgoing = outgoing
        self._buffers.hold(conn, len(outgoing))
        self._buffers.note_reply(len(outgoing))
        self._write(conn)

    def _fail(self, conn: _Connection, exc: BaseException) -> None:
        """Log why there is no reply, count it, and close the connection."""
        if isinstance(exc, RequestTimeoutError):  # not a handler's own TimeoutError
            self.stats.timed_out += 1
            logger.warning("request from %s timed out: %s; no reply", conn.peer, exc)
        else:
            self.stats.failed += 1
            logger.error("handle_request failed for %s", conn.peer, exc_info=exc)
        self._close(conn)

    def _write(self, conn: _Connection) -> None:
        """Send what the socket takes; close once the whole reply is out.

        The write deadline measures progress: it starts again whenever bytes
        leave, so a client that reads steadily gets the whole reply however
        long that takes, and one that stops reading is dropped after the
        read timeout (with a reset, see :meth:`_close`).
        """
        try:
            sent = conn.sock.send(conn.outgoing, SEND_FLAGS)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._drop(conn, f"write failed: {exc}")
            return
        if sent < len(conn.outgoing):
            conn.outgoing = memoryview(conn.outgoing)[sent:]
            self._buffers.hold(conn, len(conn.outgoing))
            if sent or conn.events != selectors.EVENT_WRITE:
                self._write_deadlines.schedule(conn, time.monotonic())
            self._watch(conn, selectors.EVENT_WRITE)
            return
        conn.outgoing = b""
        self.stats.record_served(time.monotonic() - conn.accepted_at)
        self._close(conn)

    # -- deadlines ----------------------------------------------------------------------

    def _expire_deadlines(self, now: float) -> None:
        """Drop the connections whose current phase ran out of time."""
        for conn in self._read_deadlines.pop_expired(now):
            self._guarded(conn, self._drop, "read timeout")
        for conn in self._write_deadlines.pop_expired(now):
            self._guarded(conn, self._drop, "no write progress within the read timeout")
        for conn in self._request_deadlines.pop_expired(now):
            self._guarded(conn, self._time_out_request)

    @staticmethod
    def _forget_deadline(conn: _Connection) -> None:
        """Drop the connection's deadline in whatever phase it is."""
        if conn.deadlines is not None:
            conn.deadlines.discard(conn)

    def _time_out_request(self, conn: _Connection) -> None:
        """Give up on a handler that ran too long: no reply, the connection closes."""
        future = conn.future
        if future is not None:
            self._in_flight.pop(future, None)
            future.cancel()
        self.stats.timed_out += 1
        logger.warning("request from %s timed out; closing without a reply", conn.peer)
        self._close(conn)

    # -- sockets ------------------------------------------------------------------------

    def _watch(self, conn: _Connection, events: int) -> None:
        """Make the selector report ``events`` for this connection."""
        if conn.events == events:
            return
        if conn.events:
            self._selector.modify(conn.sock, events, conn)
        else:
            self._selector.register(conn.sock, events, conn)
        conn.events = events

    def _unwatch(self, conn: _Connection) -> None:
        """Stop the selector reporting on this connection."""
        if conn.events:
            self._selector.unregister(conn.sock)
            conn.events = 0

    def _drop(self, conn: _Connection, reason: str) -> None:
        """Close a connection for a client-side fault, without a reply."""
        self.stats.dropped += 1
        logger.debug("dropping connection from %s: %s", conn.peer, reason)
        self._close(conn)

    def _close(self, conn: _Connection) -> None:
        """The one place a connection ends: the bookkeeping first (it cannot
        fail), then SHUT_WR and close, or a reset if the reply was cut short."""
        cut_short = conn.phase == WRITING and len(conn.outgoing) > 0
        conn.phase = CLOSED
        self._connections.discard(conn)
        self._forget_deadline(conn)
        self._buffers.hold(conn, 0)
        try:
            self._unwatch(conn)
        finally:
            _close_socket(conn.sock, reset=cut_short)

    def _close_listener(self) -> None:
        """Stop listening for good."""
        self._listening = False
        if self._accepting:
            self._selector.unregister(self._listener)
            self._accepting = False
        self._listener.close()

    def _close_everything(self) -> None:
        """Release every socket this loop owns (after a drain, or after a crash)."""
        with self._calls_lock:
            self._calls_open = False  # from now on, callers run their callbacks themselves
        self._run_calls()
        for conn in list(self._connections):
            self._guarded(conn, self._close)
        self._close_listener()
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()

    def _wake_nowait(self) -> None:
        """Make the selector return (any thread)."""
        # OSError: buffer full (a wake-up is pending anyway) or loop already closed.
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")

    def _drain_wake(self) -> None:
        """Empty the wake-up socket and run the callbacks queued by :meth:`call_soon`."""
        try:
            while self._wake_reader.recv(4096):
                pass
        except BlockingIOError:
            pass
        self._run_calls()

    def _run_calls(self) -> None:
        """Run the queued callbacks, in order; one that fails is logged."""
        calls = self._calls
        while calls:
            try:
                calls.popleft()()
            except BaseException as exc:
                _log_failure(exc, "a callback queued on the I/O loop failed")
