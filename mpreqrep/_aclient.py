"""The awaitable client: :func:`do_request_async` for asyncio programs.

Speaks the same wire protocol as :func:`mpreqrep.do_request` (SPEC sections 1
and 3) over asyncio streams, so an event loop can keep many requests in
flight without a thread each. Framing and address parsing are shared with the
blocking client; this module only owns the asyncio I/O. It knows nothing of
the server, threads or processes.
"""

from __future__ import annotations

import asyncio
import contextlib

from ._address import format_address, tcp_endpoint
from ._client import MAX_REPLY_SIZE, reply_receiver, reply_too_large, timeout_seconds
from ._errors import NoServerError, RequestTooLargeError
from ._framing import LineReceiver, encode_message

RECV_CHUNK_SIZE = 65536


async def do_request_async(
    address: str,
    request: str,
    timeout: float | None = -1,
    *,
    max_reply_size: int | None = MAX_REPLY_SIZE,
) -> str | None:
    """Send one request and await its reply, without blocking the event loop.

    The awaitable twin of :func:`mpreqrep.do_request`, with the same results
    and errors. Each call opens and closes its own connection, so concurrent
    calls from one loop are safe; cancelling the awaiting task closes that
    connection and propagates :class:`asyncio.CancelledError`.

    Args:
        address: ``"[protocol://]host:port"``, as for :func:`mpreqrep.split_address`.
        request: the request text; CRLF is appended unless it ends with one.
        timeout: seconds allowed for connecting, sending and receiving the
            whole reply; ``None``, ``<= 0``, NaN or infinity waits as long as
            it takes (as :func:`mpreqrep.do_request`).
        max_reply_size: bytes the reply may reach, CRLF included (1 GiB);
            ``None`` for no cap.

    Returns:
        The reply up to and including its first CRLF (or up to EOF);
        ``""`` if the server closed without replying; ``None`` if no
        complete reply came within ``timeout``.

    Raises:
        ValueError: a malformed address, a protocol other than tcp,
            ``request`` is not a ``str`` or cannot be encoded, or
            ``max_reply_size`` is not a positive ``int`` or ``None``.
        NoServerError: nobody is listening at the address.
        ReplyTooLargeError: the reply grew past ``max_reply_size`` bytes
            without a CRLF (the connection is closed).
    """
    host, port = tcp_endpoint(address)
    if not isinstance(request, str):
        raise ValueError("request should be a string.")
    exchange = _exchange(host, port, encode_message(request), reply_receiver(max_reply_size))
    seconds = timeout_seconds(timeout)
    try:
        if seconds is None:
            return await exchange
        return await asyncio.wait_for(exchange, seconds)
    except asyncio.TimeoutError:
        return None
    except RequestTooLargeError as exc:
        raise reply_too_large(max_reply_size) from exc


async def _exchange(host: str, port: int, payload: bytes, receiver: LineReceiver) -> str:
    """Connect, send the payload, half-close, and read the reply into ``receiver``."""
    connection = await _connect(host, port)
    if connection is None:
        return ""
    reader, writer = connection
    try:
        await _send(writer, payload)
        return await _receive(reader, receiver)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _connect(
    host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """Open the connection; ``None`` if it was reset as it opened.

    A reset while connecting means the server accepted, then closed (a listener
    closed with this connection in its backlog): no reply, not "no server".

    Raises:
        NoServerError: nobody accepted (refused, unreachable, ...).
    """
    try:
        return await asyncio.open_connection(host, port)
    except (ConnectionResetError, ConnectionAbortedError):
        return None
    except OSError as exc:
        raise NoServerError(f"No server is listening at {format_address(host, port)}.") from exc


async def _send(writer: asyncio.StreamWriter, payload: bytes) -> None:
    """Write the request and shut down the write side (SPEC section 1, step 1).

    A server that hangs up early (say, on an oversized request, or a listener
    closed with this connection still in its backlog) may reset the connection
    (``ECONNRESET``, ``EPIPE``, ``ENOTCONN`` from the half-close); that is not
    an error here, since the reply, or its absence, is read next.
    """
    with contextlib.suppress(OSError):
        writer.write(payload)
        await writer.drain()
        writer.write_eof()


async def _receive(reader: asyncio.StreamReader, receiver: LineReceiver) -> str:
    """Read until the first CRLF or EOF; a failed connection (a reset) before the
    CRLF gives ``""`` (a reply cut short is no reply, see ``_client._receive_reply``).

    Raises:
        RequestTooLargeError: the reply outgrew the receiver's cap.
    """
    while True:
        try:
            data = await reader.read(RECV_CHUNK_SIZE)
        except OSError:
            return ""
        reply = receiver.receive(data)
        if reply is not None:
            return reply
