"""The supervisor thread's event loop: a selector, a wake-up socket, queued calls, timers.

It offers the I/O loop's hooks (``call_soon``, ``call_later``,
``add_reader``, ``remove_reader``; see :class:`~mpreqrep._dispatch.LoopHooks`),
so a channel, and the timer of the requests' deadlines, can live on the
supervisor thread until the I/O loop attaches, and the dispatcher treats
both hosts alike. The calls and timers are :class:`~mpreqrep._loopcore.LoopCore`'s,
shared with the I/O loop. Callbacks registered with :meth:`SelectLoop.watch`
receive the selector's event mask. :class:`Flushes` keeps the channels whose
socket did not take a whole write. Knows nothing of workers or requests.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import threading
import time
from collections.abc import Callable
from typing import Any

from .._deadlines import MAX_SELECT_TIMEOUT_S
from .._loopcore import LoopCore

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


class SelectLoop(LoopCore):
    """A selector loop run by one thread, with thread-safe :meth:`call_soon`,
    :meth:`call_later` and :meth:`wake`.

    Thread safety: :meth:`call_soon`, :meth:`call_later` and :meth:`wake`
    from any thread; the rest from the loop's thread (which calls
    ``_bind_thread`` as it starts, so that its own timers need no wake-up).
    """

    def __init__(self) -> None:
        super().__init__()
        self.add_reader(self._wake_reader, self._drain_wake)
        self._loop_closed = False

    def wake(self) -> None:
        """Make the loop's wait return (any thread)."""
        self._wake_nowait()

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

    def timer_wait_s(self, now: float) -> float | None:
        """Seconds from ``now`` until the next timer is due, ``None`` if none is set."""
        due = self._next_timer_at()
        return None if due is None else due - now

    def run_once(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds (at most :data:`MAX_SELECT_TIMEOUT_S`), run the
        callback of every ready file, then the timers that came due.

        Returns:
            Whether a file's callback failed (each failure is logged, the others
            still run; a failed queued call or timer is logged only).
        """
        failed = False
        wait = None if timeout is None else min(timeout, MAX_SELECT_TIMEOUT_S)
        for key, mask in self._selector.select(wait):
            try:
                key.data(mask)
            except Exception:
                logger.exception("process pool supervision failed; it goes on")
                failed = True
        self._run_timers(time.monotonic())
        return failed

    def close_loop(self) -> None:
        """Refuse new calls, run the queued ones, drop the timers, close the selector
        and the wake-up socket; idempotent."""
        self._refuse_calls()
        if not self._loop_closed:
            self._loop_closed = True
            self._close_selector()

    def _call_failed(self, exc: BaseException, kind: str) -> None:
        """Log a queued call or timer that failed; a ``BaseException`` ends supervision."""
        if not isinstance(exc, Exception):
            raise exc
        logger.error("%s on the supervisor thread failed; it goes on", kind, exc_info=exc)
