"""Waiting in the main thread for signals and for news from other threads, in select().

Owns the signal handlers of the command line while it serves, a
:func:`signal.set_wakeup_fd` pointed at a non-blocking :func:`socket.socketpair`,
and putting back the handlers and the wake-up fd that were there before. Knows
nothing of servers, pools or what a signal means::

    kernel ─▶ Python's C handler, any thread ─▶ one byte: the signal number ─┐
              (later, in the main thread: the Python handler ─▶ on_signal)  │
    another thread ─▶ notify() ─▶ one byte: 0 (not a signal number) ───────┤
                                                                            ▼
    main thread: wait(timeout_s) ─ select() on the socketpair ─▶ the signal numbers

Python runs signal handlers in the main thread only, and a signal that the
kernel delivers to another thread (an I/O loop's, say) does not interrupt the
main thread's wait; the wake-up fd does, whichever thread the kernel picked.
The bytes, not the handlers, say which signals came, so :meth:`SignalWaiter.wait`
never depends on when the Python handler gets to run.

Portable: Windows has no SIGHUP, SIGTTIN or SIGTTOU, but has SIGINT, SIGTERM,
SIGBREAK and socketpair (its wake-up fd must be a socket).
"""

from __future__ import annotations

import contextlib
import select
import signal
import socket
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

NOTIFY_BYTE = b"\0"
READ_CHUNK_SIZE = 4096


def existing_signals(*names: str) -> tuple[signal.Signals, ...]:
    """The signals of ``names`` that this platform has, in that order."""
    return tuple(getattr(signal, name) for name in names if hasattr(signal, name))


SHUTDOWN_SIGNALS = existing_signals("SIGINT", "SIGTERM", "SIGBREAK")
OPERATION_SIGNALS = existing_signals("SIGHUP", "SIGTTIN", "SIGTTOU")


class SignalWaiter:
    """Handle ``signals`` while the ``with`` block runs, and wait for them in select().

    Use it from the main thread (where Python allows signal handlers and the
    wake-up fd). Entering installs a handler for each of ``signals`` and the
    wake-up fd; leaving puts back the previous handlers and wake-up fd and
    closes the sockets.

    Args:
        signals: the signals to handle; any other signal that reaches the
            wake-up fd (one with a Python handler of someone else's, such as
            pytest-timeout's SIGALRM) is not reported.
        on_signal: called with the signal number by the Python handler, in
            the main thread, when Python runs it (for what must happen even
            while the main thread is busy elsewhere, such as exiting at once).
    """

    def __init__(
        self,
        signals: Iterable[int],
        on_signal: Callable[[int], None] | None = None,
    ) -> None:
        self._signals = frozenset(signals)
        self._on_signal = on_signal
        self._receiver, self._sender = socket.socketpair()
        self._previous_handlers: dict[int, Any] = {}
        self._previous_fd = -1

    def __enter__(self) -> SignalWaiter:
        for sock in (self._receiver, self._sender):
            sock.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._sender.fileno())
        try:
            for signum in self._signals:
                self._previous_handlers[signum] = signal.signal(signum, self._handle)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def wait(self, timeout_s: float | None) -> list[int]:
        """Wait until a signal or :meth:`notify`, or for ``timeout_s`` seconds.

        Args:
            timeout_s: the longest wait; ``None`` waits as long as it takes,
                0 or less only collects what came already.

        Returns:
            The numbers of the handled signals that came, in order (repeats
            included); empty after a timeout or a mere :meth:`notify`.
        """
        timeout = None if timeout_s is None else max(timeout_s, 0.0)
        readable, _, _ = select.select([self._receiver], [], [], timeout)
        return self._drain() if readable else []

    def notify(self) -> None:
        """Wake :meth:`wait` up (any thread; never blocks)."""
        # A full buffer already holds a wake-up; a closed socket means nobody waits.
        with contextlib.suppress(BlockingIOError, OSError):
            self._sender.send(NOTIFY_BYTE)

    def _drain(self) -> list[int]:
        """Read every byte waiting; the handled signal numbers among them."""
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := self._receiver.recv(READ_CHUNK_SIZE):
                data += chunk
        return [signum for signum in data if signum in self._signals]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        """The Python signal handler: the byte is written already; tell ``on_signal``."""
        if self._on_signal is not None:
            self._on_signal(signum)

    def _restore(self) -> None:
        """Put back the previous handlers and wake-up fd, and close the sockets."""
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()
        signal.set_wakeup_fd(self._previous_fd)
        self._receiver.close()
        self._sender.close()
