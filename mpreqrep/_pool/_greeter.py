"""The handshake: take the connections workers make and read each one's first frame.

A worker connects twice (:mod:`mpreqrep._worker`): its lifeline first, then,
once it loaded the handler, its channel (or a connection saying why it
could not). Each first frame is the pool's token and a message; nothing is
unpickled from a peer that does not know the token. Runs on the
supervisor's :class:`~._loop.SelectLoop`; knows nothing of the workers
beyond the pid a message names.

On loopback TCP (Windows) any local user can connect, so every connection is
a stranger until its first frame proves otherwise, and no stranger may cost
the pool anything or hold the supervisor:

- a first frame is read in steps (:class:`FirstFrame`): its length, then
  the token, then the rest. A wrong token or an implausible length closes
  the connection after at most ``4 + len(token)`` bytes, whatever was
  announced, and nothing is read past the frame's end;
- reads never block, and one event accepts at most :data:`MAX_GREETINGS`
  connections, so a flood cannot hold the loop;
- at most :data:`MAX_GREETINGS` connections wait to introduce themselves
  (a new one closes the oldest), and one that has not within
  :data:`GREETING_TIMEOUT_S` is closed (one loop timer, for the oldest). A
  worker sends its first frame as soon as it connected; before a connection
  is closed for either reason, what it sent already is read.

The listener is a Unix socket in a temporary directory, which a temp
cleaner (or an operator) may remove while the pool runs: no new worker
could connect again. :meth:`Greeter.listener_lost` notices (its file is
gone or is another one), and :meth:`Greeter.replace_listener` heals it.
"""

from __future__ import annotations

import functools
import hmac
import logging
import os
import pickle
import time
from collections.abc import Callable

from .._channel import FRAME_HEADER, Address, Channel, Listener
from .._loopcore import Timer
from .._worker import Hello, InitFailed, Lifeline
from ._loop import SelectLoop

Introduction = Lifeline | Hello | InitFailed

GREETING_TIMEOUT_S = 10.0
"""How long a connection may take to send its first frame (a worker sends it at once)."""

MAX_GREETINGS = 128
"""Most connections waiting for their first frame, and most accepted per event."""

MAX_INTRODUCTION_SIZE = 1 << 20
"""Largest first frame (an :class:`InitFailed` carries a traceback)."""

logger = logging.getLogger("mpreqrep")


def read_introduction(payload: bytes, token: str) -> Introduction | None:
    """The message of a connection's first frame, ``None`` unless it carries ``token``."""
    secret = token.encode()
    if not hmac.compare_digest(payload[: len(secret)], secret):
        return None
    message = pickle.loads(payload[len(secret) :])
    return message if isinstance(message, (Lifeline, Hello, InitFailed)) else None


class StrangerError(Exception):
    """A connection's first frame is not one of the pool's (wrong length or token)."""


class FirstFrame:
    """A connection's first frame, read step by step and never past its end (sans I/O).

    The steps are the length header, the token, then the rest of the
    payload; each read asks for no more than :meth:`wanted`, so the token is
    checked before a byte of the rest is taken.

    Args:
        token: the pool's secret.
        deadline: the monotonic time by which the frame should be whole.
    """

    def __init__(self, token: bytes, deadline: float) -> None:
        self.deadline = deadline
        self._token = token
        self._data = bytearray()
        self._size = 0  # the payload's length, once the header is in

    def wanted(self) -> int:
        """How many bytes the current step still lacks; 0 once the frame is whole."""
        have = len(self._data)
        header_end = FRAME_HEADER.size
        token_end = header_end + len(self._token)
        if have < header_end:
            return header_end - have
        if have < token_end:
            return token_end - have
        return header_end + self._size - have

    def feed(self, data: bytes) -> None:
        """Add bytes read (no more than :meth:`wanted` asked for).

        Raises:
            StrangerError: the announced length or the token is wrong.
        """
        self._data += data
        have = len(self._data)
        if have == FRAME_HEADER.size:
            (self._size,) = FRAME_HEADER.unpack(self._data)
            if not len(self._token) <= self._size <= MAX_INTRODUCTION_SIZE:
                raise StrangerError(f"a first frame of {self._size} bytes")
        elif have == FRAME_HEADER.size + len(self._token) and not hmac.compare_digest(
            bytes(self._data[FRAME_HEADER.size :]), self._token
        ):
            raise StrangerError("a wrong token")

    @property
    def payload(self) -> bytes:
        """The frame's payload (whole once :meth:`wanted` is 0)."""
        return bytes(self._data[FRAME_HEADER.size :])


class Greeter:
    """Owns the workers' listener; accepts connections and hands each introduced one on.

    Args:
        loop: the supervisor's loop, whose thread runs every method.
        token: the pool's secret.
        introduced: called with each connection and its message; a
            connection that does not introduce itself properly is closed.
        unix: listen on a Unix socket (else on loopback TCP).
    """

    def __init__(
        self,
        loop: SelectLoop,
        token: str,
        introduced: Callable[[Channel, Introduction], None],
        *,
        unix: bool,
    ) -> None:
        self._loop = loop
        self._token = token
        self._secret = token.encode()
        self._introduced = introduced
        self._unix = unix
        self._waiting: dict[Channel, FirstFrame] = {}  # oldest first
        self._timer: Timer | None = None  # for the oldest's deadline
        self._listener = Listener(unix=unix)
        self._identity = _identity(self._listener.address)
        loop.watch(self._listener.sock, self._accept)

    @property
    def address(self) -> Address:
        """Where workers connect."""
        return self._listener.address

    def listener_lost(self) -> bool:
        """Whether the listener's socket file is gone or replaced: nobody can connect."""
        if self._identity is None:  # loopback TCP: nothing in the file system
            return False
        try:
            return _identity(self._listener.address) != self._identity
        except OSError:
            return True

    def replace_listener(self) -> None:
        """Listen on a new listener of the same kind; close the old one, after taking
        what connected to it already. Connections not introduced yet stay."""
        self._accept(0)
        self._loop.remove_reader(self._listener.sock)
        self._listener.close()
        self._listener = Listener(unix=self._unix)
        self._identity = _identity(self._listener.address)
        self._loop.watch(self._listener.sock, self._accept)

    def catch_up(self) -> None:
        """Greet now whatever connections and first frames are already there."""
        self._accept(0)
        for channel in list(self._waiting):
            self._greet(channel, 0)

    def close(self) -> None:
        """Close the listener and the connections not introduced yet."""
        if self._timer is not None:
            self._timer.cancel()
        for channel in self._waiting:
            channel.close()
        self._waiting.clear()
        self._listener.close()

    def _accept(self, mask: int) -> None:
        """Take the connections waiting, a bounded number; each is known once its first
        frame is read."""
        for _ in range(MAX_GREETINGS):
            channel = self._listener.accept()
            if channel is None:
                return
            if len(self._waiting) >= MAX_GREETINGS:
                self._give_up(next(iter(self._waiting)))
            deadline = time.monotonic() + GREETING_TIMEOUT_S
            self._waiting[channel] = FirstFrame(self._secret, deadline)
            self._loop.watch(channel, functools.partial(self._greet, channel))
            if self._timer is None:
                self._timer = self._loop.call_later(GREETING_TIMEOUT_S, self._expire)

    def _expire(self) -> None:
        """Close the connections past their deadline; set the timer for the next one."""
        self._timer = None
        now = time.monotonic()
        for channel, frame in list(self._waiting.items()):
            if frame.deadline > now:
                self._timer = self._loop.call_later(frame.deadline - now, self._expire)
                return
            self._give_up(channel)

    def _greet(self, channel: Channel, mask: int) -> None:
        """Read what a connection's first frame still lacks; once it is whole, hand the
        connection on (or close it, if it is no introduction)."""
        frame = self._waiting.get(channel)
        if frame is None:  # closed by an earlier callback of the same select
            return
        try:
            while wanted := frame.wanted():
                data = channel.read_nowait(wanted)
                if data == b"":
                    return
                if data is None:
                    raise StrangerError("the end of stream before a whole first frame")
                frame.feed(data)
        except StrangerError as exc:
            logger.debug("closed a connection to the workers' listener: %s", exc)
            self._drop(channel)
            return
        self._loop.remove_reader(channel)
        del self._waiting[channel]
        message = read_introduction(frame.payload, self._token)
        if message is None:
            channel.close()
        else:
            self._introduced(channel, message)

    def _give_up(self, channel: Channel) -> None:
        """Close a connection that waited too long or must make room, after reading what
        it sent already."""
        self._greet(channel, 0)
        if channel in self._waiting:
            logger.debug("closed a connection to the workers' listener that sent too little")
            self._drop(channel)

    def _drop(self, channel: Channel) -> None:
        self._loop.remove_reader(channel)
        del self._waiting[channel]
        channel.close()


def _identity(address: Address) -> tuple[int, int] | None:
    """The device and inode of a Unix socket's file, ``None`` for a TCP address.

    Raises:
        OSError: the file is gone.
    """
    if not isinstance(address, str):
        return None
    status = os.stat(address)
    return status.st_dev, status.st_ino
