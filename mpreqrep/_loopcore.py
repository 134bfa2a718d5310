"""What both selector loops share: the wake-up socketpair, queued calls and timers.

The I/O loop (:class:`~mpreqrep._reactor.Reactor`) and the process pool's
supervisor (:class:`~mpreqrep._pool._loop.SelectLoop`) each run a selector
on one thread that other threads must be able to wake and hand work to.
This module owns that part, written once: the selector, the wake-up
socketpair (loky's ``_ThreadWakeup`` idea), the calls queued with
:meth:`LoopCore.call_soon` and the timers set with :meth:`LoopCore.call_later`
(a heap ordered by due time, then by arming order). It must not know what
the loop serves, how it waits or what a failure costs: each loop decides
that (:meth:`LoopCore._call_failed`).

Calls across threads::

    any thread                           loop thread
    ──────────                           ───────────
    call_soon(cb) ─▶ _calls deque ──┐
                    + 1 byte ─▶ wake-up socket ─▶ select() ─▶ _drain_wake
                                    └────────────────────────▶ cb()
    call_later(d, cb) ─▶ (another thread: through call_soon) ─▶ timer heap
                                    select(timeout <= next due) ─▶ _run_timers ─▶ cb()

A timer is armed on the loop thread (from another one, through a queued
call), so the heap has one owner and needs no lock; :meth:`Timer.cancel`
only sets a flag, from any thread, and a cancelled timer leaves the heap
when it comes due or reaches its head. Closing the loop drops every timer
still pending: no timer runs once the loop has closed.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import heapq
import itertools
import math
import selectors
import socket
import threading
import time

TYPE_CHECKING = False  # typing is not imported at run time (import cost, see README)
if TYPE_CHECKING:
    from collections.abc import Callable

WAKE_DRAIN_SIZE = 4096


class Timer:
    """A callback set to run once on a loop's thread (see :meth:`LoopCore.call_later`).

    Attributes:
        cancelled: it will not run (cancelled, already run, or its loop closed).
    """

    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        """Never run the callback (any thread); no effect once it has started."""
        self.cancelled = True


class LoopCore(abc.ABC):
    """A selector that other threads can wake, queue calls on and set timers on.

    Thread safety: :meth:`call_soon`, :meth:`call_later`, :meth:`Timer.cancel`
    and :meth:`_wake_nowait` may come from any thread; everything else runs
    on the loop's thread.
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._calls_lock = threading.Lock()
        self._calls_open = True
        self._loop_thread: int | None = None  # set by the loop as it starts running
        self._timers: list[tuple[float, int, Timer]] = []  # a heap: (due, order, timer)
        self._timer_order = itertools.count()

    def call_soon(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` on the loop's thread soon (any thread).

        Returns:
            ``False`` once the loop has closed: the caller runs it itself.
        """
        with self._calls_lock:
            if not self._calls_open:
                return False
            self._calls.append(callback)
        self._wake_nowait()
        return True

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` on the loop's thread ``delay_s`` seconds from now (any thread).

        Timers due at the same time run in the order they were set; a delay of
        0 or less runs at the end of the loop's next pass; an infinite one
        never. Once the loop has closed the timer never runs (it comes back
        cancelled). A callback that raises is reported as the loop reports
        its queued calls' failures.

        Returns:
            The timer: :meth:`Timer.cancel` stops it.

        Raises:
            ValueError: ``delay_s`` is NaN.
        """
        if math.isnan(delay_s):
            raise ValueError("a timer's delay must be a number of seconds, not NaN")
        timer = Timer(callback)
        entry = (time.monotonic() + delay_s, next(self._timer_order), timer)
        if threading.get_ident() == self._loop_thread:
            if self._calls_open:
                heapq.heappush(self._timers, entry)
            else:
                timer.cancel()
        elif not self.call_soon(lambda: heapq.heappush(self._timers, entry)):
            timer.cancel()
        return timer

    def _bind_thread(self) -> None:
        """The calling thread runs the loop from now on: its timers need no queued call."""
        self._loop_thread = threading.get_ident()

    def _wake_nowait(self) -> None:
        """Make the selector return (any thread)."""
        # OSError: buffer full (a wake-up is pending anyway) or loop already closed.
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")

    def _drain_wake(self) -> None:
        """Empty the wake-up socket and run the callbacks queued by :meth:`call_soon`."""
        with contextlib.suppress(BlockingIOError):
            while self._wake_reader.recv(WAKE_DRAIN_SIZE):
                pass
        self._run_calls()

    def _run_calls(self) -> None:
        """Run the queued callbacks, in order; one that fails is reported (loop thread)."""
        calls = self._calls
        while calls:
            try:
                calls.popleft()()
            except BaseException as exc:
                self._call_failed(exc, "a callback queued")

    def _next_timer_at(self) -> float | None:
        """When the next timer is due (monotonic), ``None`` if none is set (loop thread)."""
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def _run_timers(self, now: float) -> None:
        """Run the timers due at ``now``, in order (loop thread). Timers they set run
        in a later pass, however short their delay."""
        timers = self._timers
        if not timers or timers[0][0] > now:
            return
        due = []
        while timers and timers[0][0] <= now:
            due.append(heapq.heappop(timers)[2])
        for timer in due:
            if timer.cancelled:  # by a timer that ran before it in this batch, say
                continue
            timer.cancelled = True  # it has run: cancelling it now changes nothing
            try:
                timer.callback()
            except BaseException as exc:
                self._call_failed(exc, "a timer")

    @abc.abstractmethod
    def _call_failed(self, exc: BaseException, kind: str) -> None:
        """Report a queued call or timer (``kind``) that raised ``exc``: each loop's rule."""

    def _refuse_calls(self) -> None:
        """Run what is queued; from now on, callers run their callbacks themselves."""
        with self._calls_lock:
            self._calls_open = False
        self._run_calls()

    def _close_selector(self) -> None:
        """Drop the pending timers; close the selector and the wake-up socketpair."""
        for _, _, timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()
