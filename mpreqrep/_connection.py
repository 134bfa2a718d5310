"""One accepted connection: its state, and the steps that move its bytes.

Owns :class:`Connection` (where one socket is in its exchange) and
:class:`Connections`, the live connections and their own steps: start
(announce, eager first read), read into the framing, write the reply with a
progress deadline, and close. Each connection moves READING → WAITING →
WRITING → CLOSED. Every socket is closed in exactly one place,
:meth:`Connections.close`, and every step runs under one guard,
:meth:`Connections.guarded`: whatever it raises costs only that connection.

It hands a complete request to ``on_request`` and never knows what becomes
of it: the dispatcher, the queue for room and the request timeout are
:mod:`mpreqrep._handoff`'s; the listener is :mod:`mpreqrep._acceptor`'s.
"""

from __future__ import annotations

import logging
import selectors
import socket
import struct
import time

from ._deadlines import forget_deadline
from ._errors import RequestTooLargeError
from ._framing import LineReceiver
from ._reactor import log_failure

TYPE_CHECKING = False  # typing is not imported at run time (import cost, see README)
if TYPE_CHECKING:
    from collections.abc import Callable
    from concurrent.futures import Future
    from typing import Any

    from ._budget import BufferBudget
    from ._deadlines import Deadlines
    from ._stats import ServerStats

logger = logging.getLogger("mpreqrep")

RECV_CHUNK_SIZE = 65536
# Linux: hold back the reply's last segment until SHUT_WR, so it leaves with the FIN
# (one segment, not two: about 5 µs less server CPU per request over loopback).
SEND_FLAGS = getattr(socket, "MSG_MORE", 0)
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset

READING, WAITING, WRITING, CLOSED = "reading", "waiting", "writing", "closed"


class Connection:
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
        self.deadlines: Deadlines | None = None
        self.future: Future[str] | None = None
        self.outgoing: bytes | memoryview = b""
        self.held = 0  # request or reply bytes buffered for this connection


def close_socket(sock: socket.socket, *, reset: bool) -> None:
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
        try:  # noqa: SIM105 - no context manager per connection on the I/O thread
            sock.close()
        except OSError:  # the descriptor is released even then
            pass


class Connections:
    """The live connections and the steps that read, write and close them.

    Args:
        selector: the loop's selector; ready connections come back as keys
            whose data is the :class:`Connection`.
        buffers: counts the bytes held for each connection.
        stats: the served, dropped and failed counts.
        read_deadlines: the read timeout, from the accept.
        write_deadlines: the write timeout, restarted whenever bytes leave.
        max_request_size: bytes a request may reach without a CRLF.
        on_accept: called with the peer address of each accepted connection.

    ``on_request(conn, request)`` is set by the loop before serving: it
    receives each complete request, and takes the connection out of READING.
    Thread safety: I/O thread only.
    """

    on_request: Callable[[Connection, str], None]

    def __init__(
        self,
        selector: selectors.BaseSelector,
        *,
        buffers: BufferBudget,
        stats: ServerStats,
        read_deadlines: Deadlines,
        write_deadlines: Deadlines,
        max_request_size: int,
        on_accept: Callable[[object], None] | None,
    ) -> None:
        self.live: set[Connection] = set()
        self._selector = selector
        self._buffers = buffers
        self._stats = stats
        self._read_deadlines = read_deadlines
        self._write_deadlines = write_deadlines
        self._max_request_size = max_request_size
        self._on_accept = on_accept

    def guarded(self, conn: Connection, step: Callable[..., None], *args: Any) -> None:
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
            log_failure(exc, "error serving the connection from %s; no reply", conn.peer)
            self._stats.failed += 1
            if conn.phase != CLOSED:
                self.close(conn)

    def open(self, sock: socket.socket, peer: object) -> None:
        """Take a new connection into the loop and start its exchange."""
        conn = Connection(sock, peer, LineReceiver(self._max_request_size), time.monotonic())
        self.live.add(conn)
        self.guarded(conn, self._start)

    def _start(self, conn: Connection) -> None:
        """Announce the connection, then read at once if data is there.

        The read deadline, counted from the accept, is only set if the
        request is not complete after that first read (usually it is, and
        then a reply is already on its way).
        """
        conn.sock.setblocking(False)
        if self._on_accept is not None:
            self._on_accept(conn.peer)
        self.read(conn)
        if conn.phase == READING:
            self._read_deadlines.schedule(conn, conn.accepted_at)

    # -- reading ------------------------------------------------------------------------

    def read(self, conn: Connection) -> None:
        """Read what has arrived; hand the request on once it is complete."""
        try:
            data = conn.sock.recv(RECV_CHUNK_SIZE)
        except BlockingIOError:
            self._watch(conn, selectors.EVENT_READ)
            return
        except OSError as exc:
            self.drop(conn, f"read failed: {exc}")
            return
        if not data:
            self._read_eof(conn)
            return
        try:
            request = conn.receiver.receive_data(data)
        except RequestTooLargeError as exc:
            self.drop(conn, f"request too large ({exc})")
            return
        if request is None:
            self._buffers.hold(conn, conn.receiver.buffered_size)
            self._watch(conn, selectors.EVENT_READ)
        else:
            self.on_request(conn, request)

    def _read_eof(self, conn: Connection) -> None:
        """EOF ends the request (SPEC 1); a client that sent nothing gets nothing."""
        if conn.receiver.buffered_size == 0:
            self.drop(conn, "closed without sending a request")
        else:
            self.on_request(conn, conn.receiver.receive_eof())

    # -- writing ------------------------------------------------------------------------

    def start_writing(self, conn: Connection, outgoing: bytes) -> None:
        """Leave the wait and send the first part of the reply."""
        forget_deadline(conn)
        conn.phase = WRITING
        conn.future = None
        conn.outgoing = outgoing
        self._buffers.hold(conn, len(outgoing))
        self._buffers.note_reply(len(outgoing))
        self.write(conn)

    def write(self, conn: Connection) -> None:
        """Send what the socket takes; close once the whole reply is out.

        The write deadline measures progress: it starts again whenever bytes
        leave, so a client that reads steadily gets the whole reply however
        long that takes, and one that stops reading is dropped after the
        read timeout (with a reset, see :meth:`close`).
        """
        try:
            sent = conn.sock.send(conn.outgoing, SEND_FLAGS)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.drop(conn, f"write failed: {exc}")
            return
        if sent < len(conn.outgoing):
            conn.outgoing = memoryview(conn.outgoing)[sent:]
            self._buffers.hold(conn, len(conn.outgoing))
            if sent or conn.events != selectors.EVENT_WRITE:
                self._write_deadlines.schedule(conn, time.monotonic())
            self._watch(conn, selectors.EVENT_WRITE)
            return
        conn.outgoing = b""
        self._stats.record_served(time.monotonic() - conn.accepted_at)
        self.close(conn)

    # -- the selector and the end ---------------------------------------------------------

    def _watch(self, conn: Connection, events: int) -> None:
        """Make the selector report ``events`` for this connection."""
        if conn.events == events:
            return
        if conn.events:
            self._selector.modify(conn.sock, events, conn)
        else:
            self._selector.register(conn.sock, events, conn)
        conn.events = events

    def unwatch(self, conn: Connection) -> None:
        """Stop the selector reporting on this connection."""
        if conn.events:
            self._selector.unregister(conn.sock)
            conn.events = 0

    def drop(self, conn: Connection, reason: str) -> None:
        """Close a connection for a client-side fault, without a reply."""
        self._stats.dropped += 1
        logger.debug("dropping connection from %s: %s", conn.peer, reason)
        self.close(conn)

    def close(self, conn: Connection) -> None:
        """The one place a connection ends: the bookkeeping first (it cannot
        fail), then SHUT_WR and close, or a reset if the reply was cut short."""
        cut_short = conn.phase == WRITING and len(conn.outgoing) > 0
        conn.phase = CLOSED
        self.live.discard(conn)
        forget_deadline(conn)
        self._buffers.hold(conn, 0)
        try:
            self.unwatch(conn)
        finally:
            close_socket(conn.sock, reset=cut_short)
