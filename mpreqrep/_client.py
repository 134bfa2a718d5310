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

A reply is capped at ``max_reply_size`` bytes before its CRLF (1 GiB by
default), so a server that streams without end cannot make a client buffer
without bound: past it, :class:`ReplyTooLargeError`. No reply yoton's own
client can take comes near that: it holds each byte it receives as an object
of its own, about 40 bytes (a 1 GiB reply would cost it some 40 GiB).
"""

from __future__ import annotations

import socket
import time

from ._address import format_address, tcp_endpoint
from ._errors import NoServerError, ReplyTooLargeError, RequestTooLargeError
from ._framing import LineReceiver, encode_message

RECV_CHUNK_SIZE = 65536
MAX_TIMEOUT_S = 1e9  # about 31 years: sockets cannot wait longer; a longer timeout waits
MAX_REPLY_SIZE = 1 << 30  # bytes before the CRLF, CRLF included: 1 GiB


def do_request(
    address: str,
    request: str,
    timeout: float | None = -1,
    *,
    max_reply_size: int | None = MAX_REPLY_SIZE,
) -> str | None:
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
        max_reply_size: bytes the reply may reach, CRLF included (1 GiB);
            ``None`` for no cap, as yoton.

    Returns:
        The reply up to and including its first CRLF (or all of it if the
        server closed first); ``""`` if the server closed without replying;
        ``None`` if ``timeout`` ran out first.

    Raises:
        ValueError: ``request`` is not a ``str`` or cannot be encoded (a
            ``UnicodeEncodeError``: a lone surrogate), the address is
            malformed, its protocol is not tcp, or ``max_reply_size`` is not
            a positive ``int`` or ``None``.
        NoServerError: nobody is listening at the address.
        ReplyTooLargeError: the reply grew past ``max_reply_size`` bytes
            without a CRLF (the connection is closed).

    Thread safety: each call uses its own socket; call it from any thread.
    """
    host, port = tcp_endpoint(address)
    if not isinstance(request, str):
        raise ValueError("request should be a string.")
    payload = encode_message(request)  # before connecting: a lone surrogate raises here
    receiver = reply_receiver(max_reply_size)
    seconds = timeout_seconds(timeout)
    deadline = None if seconds is None else time.monotonic() + seconds
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
            _send_request(sock, payload, deadline)
            return _receive_reply(sock, deadline, receiver)
        except TimeoutError:
            return None
        except RequestTooLargeError as exc:
            raise reply_too_large(max_reply_size) from exc


def reply_receiver(max_reply_size: int | None) -> LineReceiver:
    """A receiver of one reply within ``max_reply_size`` bytes (both clients use it).

    Raises:
        ValueError: ``max_reply_size`` is neither ``None`` nor a positive ``int``.
    """
    positive_int = type(max_reply_size) is int and max_reply_size > 0  # not a bool
    if max_reply_size is not None and not positive_int:
        raise ValueError(f"max_reply_size must be a positive int or None, not {max_reply_size!r}")
    return LineReceiver(max_reply_size)


def reply_too_large(max_reply_size: int | None) -> ReplyTooLargeError:
    """The error for a reply that outgrew ``max_reply_size`` (both clients raise it)."""
    return ReplyTooLargeError(f"the reply has no CRLF within {max_reply_size} bytes")


def timeout_seconds(timeout: float | None) -> float | None:
    """The seconds a client waits: ``timeout`` if above 0, else ``None`` to wait as
    long as it takes (0, negative, ``None``, NaN, or above ``MAX_TIMEOUT_S``)."""
    if timeout is None or not 0 < timeout <= MAX_TIMEOUT_S:  # NaN and infinity wait too
        return None
    return timeout


def _remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (a tiny positive number once past it)."""
    if deadline is None:
        return None
    return max(deadline - time.monotonic(), 1e-6)


def _send_request(sock: socket.socket, payload: bytes, deadline: float | None) -> None:
    """Send the request and half-close; a server that already closed is not an error.

    Raises:
        TimeoutError: the deadline passed.
    """
    sock.settimeout(_remaining(deadline))
    # The server may have closed early (say, an oversize request, or a listener
    # closed with us in its backlog: EPIPE, ECONNRESET, ENOTCONN): then the reply
    # is whatever it sent, usually nothing, which _receive_reply reads.
    try:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
    except TimeoutError:
        raise
    except OSError:
        pass


def _receive_reply(sock: socket.socket, deadline: float | None, receiver: LineReceiver) -> str:
    """Read into ``receiver`` until the first CRLF or EOF; a failed connection (a
    reset) before the CRLF gives ``""``.

    A server resets a reply it cut short (a client that made no progress),
    so the part that came first is not taken for the whole reply.

    Raises:
        TimeoutError: the deadline passed.
        RequestTooLargeError: the reply outgrew the receiver's cap.
    """
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
