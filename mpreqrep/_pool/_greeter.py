"""The handshake: take the connections workers make and read each one's first frame.

A worker connects twice (:mod:`mpreqrep._worker`): its lifeline first, then,
once it loaded the handler, its channel (or a connection saying why it
could not). Each first frame is the pool's token and a message; nothing is
unpickled from a peer that does not know the token. Runs on the
supervisor's :class:`~._loop.SelectLoop`; knows nothing of the workers
beyond the pid a message names.

The listener is a Unix socket in a temporary directory, which a temp
cleaner (or an operator) may remove while the pool runs: no new worker
could connect again. :meth:`Greeter.listener_lost` notices (its file is
gone or is another one), and :meth:`Greeter.replace_listener` heals it.
"""

from __future__ import annotations

import functools
import hmac
import os
import pickle
from collections.abc import Callable

from .._channel import Address, Channel, Listener
from .._worker import Hello, InitFailed, Lifeline
from ._loop import SelectLoop

Introduction = Lifeline | Hello | InitFailed


def read_introduction(payload: bytes, token: str) -> Introduction | None:
    """The message of a connection's first frame, ``None`` unless it carries ``token``."""
    secret = token.encode()
    if not hmac.compare_digest(payload[: len(secret)], secret):
        return None
    message = pickle.loads(payload[len(secret) :])
    return message if isinstance(message, (Lifeline, Hello, InitFailed)) else None


class Greeter:
    """Accepts worker connections and hands each introduced one on.

    Args:
        loop: the supervisor's loop, whose thread runs every method.
        listener: the socket workers connect to (closed by :meth:`close`).
        token: the pool's secret.
        introduced: called with each connection and its message; a
            connection that does not introduce itself properly is closed.
    """

    def __init__(
        self,
        loop: SelectLoop,
        listener: Listener,
        token: str,
        introduced: Callable[[Channel, Introduction], None],
    ) -> None:
        self._loop = loop
        self._listener = listener
        self._token = token
        self._introduced = introduced
        self._waiting: set[Channel] = set()
        self._identity = _identity(listener.address)
        loop.watch(listener.sock, self._accept)

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

    def replace_listener(self, listener: Listener) -> None:
        """Listen on ``listener`` from now on; close the old one, after taking what
        connected to it already. Connections not introduced yet stay."""
        self._accept(0)
        self._loop.remove_reader(self._listener.sock)
        self._listener.close()
        self._listener = listener
        self._identity = _identity(listener.address)
        self._loop.watch(listener.sock, self._accept)

    def catch_up(self) -> None:
        """Greet now whatever connections and first frames are already there."""
        self._accept(0)
        for channel in list(self._waiting):
            self._greet(channel, 0)

    def close(self) -> None:
        """Close the listener and the connections not introduced yet."""
        for channel in self._waiting:
            channel.close()
        self._waiting.clear()
        self._listener.close()

    def _accept(self, mask: int) -> None:
        """Take every connection waiting; each is known once its first frame is read."""
        while (channel := self._listener.accept()) is not None:
            self._waiting.add(channel)
            self._loop.watch(channel, functools.partial(self._greet, channel))

    def _greet(self, channel: Channel, mask: int) -> None:
        """Read a connection's first frame, once it is whole."""
        payloads = channel.receive()
        if payloads == []:
            return
        self._loop.remove_reader(channel)
        self._waiting.discard(channel)
        message = read_introduction(payloads[0], self._token) if payloads else None
        if message is None:
            channel.close()
        else:
            self._introduced(channel, message)


def _identity(address: Address) -> tuple[int, int] | None:
    """The device and inode of a Unix socket's file, ``None`` for a TCP address.

    Raises:
        OSError: the file is gone.
    """
    if not isinstance(address, str):
        return None
    status = os.stat(address)
    return status.st_dev, status.st_ino
