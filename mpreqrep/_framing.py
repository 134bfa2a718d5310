"""Sans-I/O framing of the wire protocol (SPEC section 1).

A message is UTF-8 text that ends at its first ``"\\r\\n"`` (kept) or at EOF.
This module turns text into bytes to send and received bytes into text. It
never touches a socket, a clock or a thread: the I/O loop and the client feed
it bytes and ask whether a message is complete.
"""

from __future__ import annotations

from ._errors import RequestTooLargeError

CRLF = b"\r\n"
ENCODING = "utf-8"


def encode_message(text: str) -> bytes:
    """Encode text for the wire, appending CRLF unless it already ends with one.

    Args:
        text: the request or reply.

    Returns:
        The UTF-8 bytes to send.
    """
    if not text.endswith("\r\n"):
        text += "\r\n"
    return text.encode(ENCODING)


def decode_message(data: bytes | bytearray) -> str:
    """Decode received bytes as yoton does: UTF-8, invalid sequences dropped."""
    return data.decode(ENCODING, errors="ignore")


class LineReceiver:
    """Collects bytes until the first CRLF or EOF, within a size cap.

    Searches for CRLF only in the bytes that are new (plus the one before
    them), so feeding a message a byte at a time stays linear.

    Args:
        max_size: how many bytes may arrive without a CRLF before
            :class:`RequestTooLargeError` is raised; ``None`` for no cap.
    """

    __slots__ = ("_buffer", "_max_size")

    def __init__(self, max_size: int | None = None) -> None:
        self._buffer = bytearray()
        self._max_size = max_size

    def receive_data(self, data: bytes) -> str | None:
        """Add bytes; return the message once its first CRLF has arrived.

        Args:
            data: the bytes just received (not empty).

        Returns:
            The decoded message up to and including the first CRLF, or
            ``None`` while it is incomplete. Bytes after the CRLF are dropped.

        Raises:
            RequestTooLargeError: the message, CRLF included, is longer than
                ``max_size`` bytes (raised as soon as that is certain).
        """
        buffer = self._buffer
        received: bytes | bytearray = data
        search_from = 0
        if buffer:  # else the usual whole message in one read: search it in place
            search_from = len(buffer) - 1
            buffer += data
            received = buffer
        end = received.find(CRLF, search_from)
        size = len(received) if end < 0 else end + 2
        if self._max_size is not None and size > self._max_size:
            raise RequestTooLargeError(f"no CRLF within {self._max_size} bytes")
        if end >= 0:
            return decode_message(received[:size])
        if received is data:
            buffer += data
        return None

    def receive(self, data: bytes) -> str | None:
        """Feed what one read returned: bytes, or ``b""`` at EOF.

        Returns:
            The message once complete (at its CRLF, or at EOF), else ``None``.

        Raises:
            RequestTooLargeError: as :meth:`receive_data`.
        """
        return self.receive_data(data) if data else self.receive_eof()

    def receive_eof(self) -> str:
        """Return what arrived before EOF, decoded: a message without CRLF."""
        return decode_message(bytes(self._buffer))

    @property
    def buffered_size(self) -> int:
        """How many bytes are held."""
        return len(self._buffer)
