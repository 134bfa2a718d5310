"""``do_request``: the yoton-compatible client (SPEC section 3).

Connects, sends one request, half-closes, and reads the reply into the
framing layer until its first CRLF, EOF or the deadline. Blocking sockets
with a timeout recomputed from one ``time.monotonic()`` deadline: no polling
and no sleeps.

Every connection-level failure has one documented outcome, never a bare
``OSError``: nobody accepts (refused, unreachable) → :class:`NoServerError`;
the connection fails once made (reset, ``ENOTCONN`` on shutdown, a listener closed with the
connection still in its backlog) → the server closed without a reply, ``""``
(or the part of the reply that came first); the deadline passes → ``None``.
"""

from __future__ import annotations

import socket
import time

from ._address import format_address, tcp_endpoint
from ._errors import NoServerError
from ._framing import LineReceiver, encode_message

RECV_CHUNK_SIZE = 65536
MAX_TIMEOUT_S = 1e9  # about 31 years: sockets cannot wait longer; a longer timeout waits


def do_request(address: str, request: str, timeout: float | None = -1) -> str | None:
    """Send one request and return the reply.

    Works against a :class:`RequestServer`, yoton's server, or any
    line-oriented TCP server (an HTTP server answers its status line).

    Args:
        address: ``"[tcp://]host:port"``, see :func:`split_address`; an
            IPv6 host in brackets, as ``"[::1]:8000"``.
        request: the request text; CRLF is appended unless present.
        timeout: seconds to wait for the whole exchange if > 0; otherwise
            (0, negative, ``None``, NaN, or more than ``MAX_TIMEOUT_S``, as
            infinity) wait as long as it takes.

    Returns:
        The reply up to and including its first CRLF (or all of it if the
        server closed first); ``""`` if the server closed without replying;
        ``None`` if ``timeout`` ran out first.

    Raises:
        ValueError: ``request`` is not a ``str``, the address is malformed,
            or its protocol is not tcp.
        NoServerError: nobody is listening at the address.

    Thread safety: each call uses its own socket; call it from any thread.
    """
    host, port = tcp_endpoint(address)
    if not isinstance(request, str):
        raise ValueError("request should be a string.")
    waits = timeout is None or not 0 < timeout <= MAX_TIMEOUT_S  # NaN and infinity wait too
    deadline = None if waits else time.monotonic() + timeout  # type: ignore[operator]
    try:
        sock = socket.create_connection((host, port), timeout=_remaining(deadline))
    except TimeoutError:
        return None
    except (ConnectionResetError, ConnectionAbortedError):
        # Accepted, then reset before the (timed, non-blocking) connect returned:
        # a listener closed with us in its backlog. No reply, not "no server".
        return ""
    except OSError as exc:
        raise NoServerError(f"No server is listening at {format_address(host, port)}.") from exc
    with sock:
        try:
            _send_request(sock, request, deadline)
            return _receive_reply(sock, deadline)
        except TimeoutError:
            return None


def _remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (a tiny positive number once past it)."""
    if deadline is None:
        return None
    return max(deadline - time.monotonic(), 1e-6)


def _send_request(sock: socket.socket, request: str, deadline: float | None) -> None:
    """Send the request and half-close; a server that already closed is not an error.

    Raises:
        TimeoutError: the deadline passed.
    """
    sock.settimeout(_remaining(deadline))
    # The server may have closed early (say, an oversize request, or a listener
    # closed with us in its backlog: EPIPE, ECONNRESET, ENOTCONN): then the reply
    # is whatever it sent, usually nothing, which _receive_reply reads.
    try:
        sock.sendall(encode_message(request))
        sock.shutdown(socket.SHUT_WR)
    except TimeoutError:
        raise
    except OSError:
        pass


def _receive_reply(sock: socket.socket, deadline: float | None) -> str:
    """Read until the first CRLF or EOF; a failed connection (a reset) before
    the CRLF gives ``""``.

    A server resets a reply it cut short (a client that made no progress),
    so the part that came first is not taken for the whole reply.

    Raises:
        TimeoutError: the deadline passed.
    """
    receiver = LineReceiver()
    while True:
        sock.settimeout(_remaining(deadline))
        try:
            data = sock.recv(RECV_CHUNK_SIZE)
        except TimeoutError:
            raise
        except OSError:
            return ""
        reply = receiver.receive(data)
        if reply is not None:
            return reply
