"""The core of the I/O loop: the selector, queued calls, timers, readers.

Builds on :class:`~mpreqrep._loopcore.LoopCore` (the wake-up socketpair,
the calls other threads queue with ``call_soon``, the timers set with
``call_later``) and adds the readers a dispatcher adds with
:meth:`Reactor.add_reader`, and the I/O thread's way with its own calls.
Also the one rule for a failure on the I/O thread: it is logged with its
traceback, and only Ctrl-C on the main thread propagates
(:func:`log_failure`). It must not know about connections, listeners,
deadlines or dispatching: those are :class:`~mpreqrep._ioloop.IOLoop`'s,
which builds on this class.

A call queued on the I/O thread itself costs no wake-up byte and no lock: it
runs at the end of a pass (:meth:`Reactor._end_pass`, called by the loop
after its other steps) once no event is ready, or after
:data:`MAX_GATHERED_PASSES` passes that found more, so the calls gather what
a burst of events brings (as Netty's flush consolidation ends a read loop). A
dispatcher uses that to gather its writes to a worker into one (see
:mod:`mpreqrep._pool`): one hop per burst instead of one per pass. A timer
set on the I/O thread costs no wake-up either: the loop's select timeout
counts it (see :mod:`mpreqrep._ioloop`).
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import signal
import threading

from ._loopcore import LoopCore

TYPE_CHECKING = False  # typing is not imported at run time (import cost, see README)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

logger = logging.getLogger("mpreqrep")

MAX_GATHERED_PASSES = 3
"""Passes that found more events ready, after which the calls queued on the I/O thread
run anyway (a bound on their delay under a steady stream of events)."""


def log_failure(exc: BaseException, message: str, *args: object) -> None:
    """Log ``exc`` with its traceback, unless it is Ctrl-C on the main thread,
    which is nobody's failure and must end serving: it is raised again."""
    if isinstance(exc, KeyboardInterrupt) and threading.current_thread() is threading.main_thread():
        raise exc
    logger.error(message, *args, exc_info=exc)


class Reactor(LoopCore):
    """A selector that other threads can wake, queue calls and set timers on.

    Thread safety: :meth:`call_soon`, :meth:`call_later` and
    :meth:`_wake_nowait` may come from any thread; everything else runs on
    the I/O thread.
    """

    def __init__(self) -> None:
        super().__init__()
        self._gathered_passes = 0
        self._wakes_on_signals = False

    def call_soon(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` on the I/O thread soon (any thread).

        On the I/O thread it runs at the end of a pass (see :meth:`_end_pass`),
        without a wake-up.

        Returns:
            ``False`` once the loop has stopped: the caller runs it itself.
        """
        if threading.get_ident() == self._loop_thread:  # only this thread closes the calls
            if self._calls_open:
                self._calls.append(callback)
            return self._calls_open
        return super().call_soon(callback)

    def add_reader(self, fileobj: Any, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever ``fileobj`` is readable (I/O thread only)."""
        self._selector.register(fileobj, selectors.EVENT_READ, callback)

    def remove_reader(self, fileobj: Any) -> None:
        """Stop watching ``fileobj``; harmless if unwatched or stopped (I/O thread only)."""
        with contextlib.suppress(KeyError, ValueError, RuntimeError):
            self._selector.unregister(fileobj)

    def _watch_wakeups(self) -> None:
        """Have the selector return when another thread writes to the wake-up socket;
        from now on, calls queued and timers set on this thread need no wake-up."""
        self._bind_thread()
        self._selector.register(self._wake_reader, selectors.EVENT_READ, self._drain_wake)
        self._wake_on_signals()

    def _wake_on_signals(self) -> None:
        """On the main thread, make a signal wake the selector, whichever thread the
        kernel gave it to: Python runs its handler (Ctrl-C's) only once the main thread
        runs again, and a signal taken by another thread does not end its select().
        The wake-up socket becomes the signal wake-up fd, unless one is set already
        (someone else's: it stays)."""
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.set_wakeup_fd(self._wake_writer.fileno(), warn_on_full_buffer=False)
        if previous != -1:
            signal.set_wakeup_fd(previous)
        self._wakes_on_signals = previous == -1

    def _close_selector(self) -> None:
        """Give back the signal wake-up fd (before its socket closes), then close."""
        if self._wakes_on_signals:
            self._wakes_on_signals = False
            signal.set_wakeup_fd(-1)
        super()._close_selector()

    def _end_pass(self) -> None:
        """Run the calls queued on this thread, unless more events are ready and fewer
        than :data:`MAX_GATHERED_PASSES` passes have already put them off (I/O thread;
        the loop calls it at the end of every pass)."""
        if not self._calls:
            return
        if self._gathered_passes < MAX_GATHERED_PASSES and self._selector.select(0):
            self._gathered_passes += 1  # the next pass takes those events first
            return
        self._gathered_passes = 0
        self._run_calls()

    def _call_failed(self, exc: BaseException, kind: str) -> None:
        """Log a queued call or a timer that failed; Ctrl-C on the main thread propagates."""
        log_failure(exc, "%s on the I/O loop failed", kind)
