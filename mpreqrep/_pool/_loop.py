"""The supervisor thread's event loop: a selector, a wake-up socket, queued calls.

It offers the I/O loop's hooks (``call_soon``, ``add_reader``,
``remove_reader``; see :class:`~mpreqrep._dispatch.LoopHooks`), so a
channel can be read on the supervisor thread until the I/O loop attaches,
and the dispatcher treats both hosts alike. Callbacks registered with
:meth:`SelectLoop.watch` receive the selector's event mask. :class:`Flushes`
keeps the channels whose socket did not take a whole write. Knows nothing
of workers or requests.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import selectors
import socket
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("mpreqrep")

EventCallback = Callable[[int], None]


class Flushes:
    """The channels with bytes their socket did not take yet (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: set[Any] = set()

    def add(self, channel: Any) -> None:
        """Write ``channel``'s outbox on the next :meth:`flush` (any thread)."""
        with self._lock:
            self._waiting.add(channel)

    def flush(self, write: Callable[[Any], bool]) -> bool:
        """Call ``write`` on each waiting channel (it returns whether bytes still wait);
        whether some channel still waits."""
        with self._lock:
            channels = list(self._waiting)
        still = {channel for channel in channels if write(channel)}
        with self._lock:
            self._waiting -= set(channels) - still
            return bool(self._waiting)


class SelectLoop:
    """A selector loop run by one thread, with thread-safe :meth:`call_soon` and :meth:`wake`.

    Thread safety: :meth:`call_soon` and :meth:`wake` from any thread; the
    rest from the loop's thread.
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._selector.register(self._wake_reader, selectors.EVENT_READ, self._drain_wake)
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._calls_lock = threading.Lock()
        self._accepting_calls = True
        self._loop_closed = False

    def call_soon(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` on the loop's thread soon; ``False`` once the loop has closed."""
        with self._calls_lock:
            if not self._accepting_calls:
                return False
            self._calls.append(callback)
        self.wake()
        return True

    def wake(self) -> None:
        """Make the loop's wait return (any thread)."""
        with contextlib.suppress(OSError):  # full (a wake-up is pending) or closed
            self._wake_writer.send(b"\0")

    def add_reader(self, fileobj: Any, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever ``fileobj`` is readable."""
        self.watch(fileobj, lambda mask: callback())

    def remove_reader(self, fileobj: Any) -> None:
        """Stop watching ``fileobj``; harmless if unwatched."""
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fileobj)

    def watch(self, fileobj: Any, callback: EventCallback) -> None:
        """Call ``callback(mask)`` whenever ``fileobj`` is readable."""
        self._selector.register(fileobj, selectors.EVENT_READ, callback)

    def run_once(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds and run the callback of every ready file.

        Returns:
            Whether a callback failed (each failure is logged, the others still run).
        """
        failed = False
        for key, mask in self._selector.select(timeout):
            try:
                key.data(mask)
            except Exception:
                logger.exception("process pool supervision failed; it goes on")
                failed = True
        return failed

    def close_loop(self) -> None:
        """Refuse new calls, run the queued ones, close the selector and the wake-up socket."""
        with self._calls_lock:
            self._accepting_calls = False
        self._run_calls()
        if not self._loop_closed:
            self._loop_closed = True
            self._selector.close()
            self._wake_reader.close()
            self._wake_writer.close()

    def _drain_wake(self, mask: int) -> None:
        """Empty the wake-up socket and run the callbacks queued by :meth:`call_soon`."""
        with contextlib.suppress(BlockingIOError):
            while self._wake_reader.recv(4096):
                pass
        self._run_calls()

    def _run_calls(self) -> None:
        """Run the queued callbacks in order; one that fails is logged."""
        while True:
            with self._calls_lock:
                if not self._calls:
                    return
                callback = self._calls.popleft()
            try:
                callback()
            except Exception:
                logger.exception("process pool supervision failed; it goes on")
