"""Framed messages between the parent and one worker process, over one socket.

A frame is a 4-byte big-endian length and a pickle. The parent listens on a
Unix socket in a private directory where the platform has Unix sockets, on
loopback TCP where it has not (Windows' CPython has no ``AF_UNIX``); each
worker connects twice, its lifeline and its channel, each opening with the
pool's token (on TCP any local user can connect: the token is the guard,
:mod:`mpreqrep._pool._greeter`). Neither side ever reads a partial frame:
:class:`FrameReader` buffers until a frame is whole. The parent's end is
non-blocking and buffers what the socket does not take (:class:`Channel`);
a worker's end blocks. TCP channels disable Nagle's algorithm, or a second
small frame would wait for the peer's delayed ACK (40 ms on Linux, 200 ms on
Windows).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import socket
import struct
import tempfile
from typing import Any

FRAME_HEADER = struct.Struct("!I")
RECV_CHUNK_SIZE = 65536
LISTEN_BACKLOG = 128

MAX_UNIX_PATH = 100
"""Longest socket path used: the kernel's limit is 104 bytes on macOS and the BSDs,
108 on Linux."""

UNIX_SOCKETS = hasattr(socket, "AF_UNIX")
"""Whether this platform has Unix sockets: a :class:`Listener`'s default kind."""

LOOPBACK = "127.0.0.1"

Address = str | tuple[str, int]

_open_directories: set[str] = set()
"""Directories of the listeners not closed yet, for :func:`remove_socket_directories`."""


def encode_frame(message: object) -> bytes:
    """One frame carrying ``message``, ready to send."""
    return frame_of(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def frame_of(data: bytes) -> bytes:
    """One frame carrying ``data``, a pickle made elsewhere (say by cloudpickle)."""
    return FRAME_HEADER.pack(len(data)) + data


class FrameReader:
    """Splits a byte stream into frame payloads (sans I/O).

    A frame that arrives in many reads (a big reply) is gathered in one
    buffer and copied out once, when its last byte comes: each read costs
    only its own bytes, never the part of the frame that came before.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._needed = 0  # the bytes the buffered partial frame has in all, header included

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the payloads of the frames now complete."""
        if self._buffer:  # the rest of a partial frame: join it to what came before
            self._buffer += data
            if len(self._buffer) < self._needed:
                return []
            data = bytes(self._buffer)
            self._buffer.clear()
        payloads: list[bytes] = []
        start = 0
        header_size = FRAME_HEADER.size
        self._needed = header_size
        while len(data) - start >= header_size:
            (size,) = FRAME_HEADER.unpack_from(data, start)
            end = start + header_size + size
            if end > len(data):
                self._needed = end - start
                break
            payloads.append(data[start + header_size : end])
            start = end
        if start < len(data):
            self._buffer += data[start:]
        return payloads


def connect(address: Address) -> socket.socket:
    """A blocking socket connected to the parent's channel listener."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.connect(address)
        if family == socket.AF_INET:
            _no_delay(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def _no_delay(sock: socket.socket) -> None:
    """Send each frame at once, not after the peer acknowledged the previous one."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Listener:
    """The parent's listening socket that worker channels connect to.

    Args:
        unix: a Unix socket in a fresh directory only this user can enter
            (shortened to ``/tmp`` when ``TMPDIR`` is too long for a socket
            path); ``False``: loopback TCP on an ephemeral port, which any
            local user can reach. Defaults to what the platform has.

    Non-blocking: :meth:`accept` returns ``None`` when no worker is waiting.
    """

    def __init__(self, *, unix: bool = UNIX_SOCKETS) -> None:
        self._directory: str | None = None
        self.address: Address
        self.sock = self._listen_unix() if unix else self._listen_tcp()
        self.sock.listen(LISTEN_BACKLOG)
        self.sock.setblocking(False)

    def _listen_unix(self) -> socket.socket:
        """A Unix socket bound in a private directory (registered for clean-up)."""
        directory = tempfile.mkdtemp(prefix="mpreqrep-")
        if len(os.path.join(directory, "channels")) > MAX_UNIX_PATH and os.path.isdir("/tmp"):
            os.rmdir(directory)  # a long TMPDIR
            directory = tempfile.mkdtemp(prefix="mpreqrep-", dir="/tmp")
        self._directory = directory
        _open_directories.add(directory)
        self.address = os.path.join(directory, "channels")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.address)
        return sock

    def _listen_tcp(self) -> socket.socket:
        """A TCP socket bound to an ephemeral loopback port."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if hasattr(socket, "SO_EXCLUSIVEADDRUSE"):  # pragma: no cover - Windows only
            # No other socket may bind this port, not even with SO_REUSEADDR.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        sock.bind((LOOPBACK, 0))
        self.address = sock.getsockname()
        return sock

    def accept(self) -> Channel | None:
        """The next connected peer's channel, ``None`` if none is waiting.

        Raises:
            OSError: accepting failed for want of resources (``EMFILE``, ...).
        """
        while True:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return None
            except (ConnectionAbortedError, ConnectionResetError):
                continue  # reset while queued (Windows says ECONNRESET): the next one
            if sock.family == socket.AF_INET:
                _no_delay(sock)
            return Channel(sock)

    def close(self) -> None:
        """Close the socket and remove its directory; idempotent."""
        self.sock.close()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            _open_directories.discard(self._directory)
            self._directory = None


def remove_socket_directories() -> None:
    """Remove the socket directories of the listeners still open, for an exit
    that skips their ``close()`` (``os._exit``); a SIGKILL leaves them behind."""
    for directory in list(_open_directories):
        shutil.rmtree(directory, ignore_errors=True)


class Channel:
    """The parent's non-blocking end of one worker's socket.

    Sends never block: what the socket does not take waits in an outbox
    until :meth:`flush`. Not thread-safe; the dispatcher serializes use.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._reader = FrameReader()
        self._outbox = bytearray()
        self.closed = False

    def fileno(self) -> int:
        """The socket's file descriptor (for selectors)."""
        return self.sock.fileno()

    @property
    def has_outbox(self) -> bool:
        """Whether some bytes wait for the socket to take them."""
        return bool(self._outbox)

    def send(self, frame: bytes) -> None:
        """Send ``frame`` now, or as much as fits and the rest on :meth:`flush`.

        A worker that is gone takes nothing; its loss shows as end of stream.
        """
        if self.closed:
            return
        if self._outbox:
            self._outbox += frame
            return
        sent = self._send_some(frame)
        if sent < len(frame):
            self._outbox += memoryview(frame)[sent:]

    def flush(self) -> None:
        """Send what waits in the outbox, as far as the socket takes it."""
        if self._outbox and not self.closed:
            del self._outbox[: self._send_some(self._outbox)]

    def receive(self) -> list[bytes] | None:
        """Payloads of the frames complete so far; ``None`` at end of stream.

        Reads until the socket has nothing more (a short read says so without
        another system call); the end of stream shows on the next call.
        """
        payloads: list[bytes] = []
        while data := self.read_nowait(RECV_CHUNK_SIZE):
            payloads += self._reader.feed(data)
            if len(data) < RECV_CHUNK_SIZE:
                return payloads
        return payloads if data is not None else payloads or None

    def read_nowait(self, max_bytes: int) -> bytes | None:
        """At most ``max_bytes`` of the bytes waiting, around the frame reader (for one that
        must stop at a point, as the greeter at a first frame's end); ``b""`` if none
        wait, ``None`` at end of stream or a reset."""
        try:
            return self.sock.recv(max_bytes) or None
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:  # e.g. ECONNRESET: the peer is gone
            return None

    def close(self) -> None:
        """Close the socket (the worker reads end of stream); idempotent."""
        if not self.closed:
            self.closed = True
            self._outbox.clear()
            self.sock.close()

    def _send_some(self, data: Any) -> int:
        """Bytes of ``data`` the socket took; all of them if the worker is gone."""
        try:
            return int(self.sock.send(data))
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:  # EPIPE, ECONNRESET: the worker is gone; drop the bytes
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
            return len(data)
