"""The core of the I/O loop: the selector, the wake-up socketpair, queued calls.

Owns the selector and the wake-up socketpair (loky's ``_ThreadWakeup``
idea), the callbacks other threads queue with :meth:`Reactor.call_soon`,
and the readers a dispatcher adds with :meth:`Reactor.add_reader`. Also the
one rule for a failure on the I/O thread: it is logged with its traceback,
and only Ctrl-C on the main thread propagates (:func:`log_failure`). It must
not know about connections, listeners, deadlines or dispatching: those are
:class:`~mpreqrep._ioloop.IOLoop`'s, which builds on this class.

Calls across threads::

    any thread                           I/O thread
    ──────────                           ──────────
    call_soon(cb) ─▶ _calls deque ──┐
                    + 1 byte ─▶ wake-up socket ─▶ select() ─▶ _drain_wake
                                    └────────────────────────▶ cb()

A call queued on the I/O thread itself costs no wake-up byte and no lock: it
runs at the end of a pass (:meth:`Reactor._end_pass`, called by the loop
after its other steps) once no event is ready, or after
:data:`MAX_GATHERED_PASSES` passes that found more, so the calls gather what
a burst of events brings (as Netty's flush consolidation ends a read loop). A
dispatcher uses that to gather its writes to a worker into one (see
:mod:`mpreqrep._pool`): one hop per burst instead of one per pass.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import selectors
import socket
import threading

TYPE_CHECKING = False  # typing is not imported at run time (import cost, see README)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

logger = logging.getLogger("mpreqrep")

WAKE_DRAIN_SIZE = 4096

MAX_GATHERED_PASSES = 3
"""Passes that found more events ready, after which the calls queued on the I/O thread
run anyway (a bound on their delay under a steady stream of events)."""


def log_failure(exc: BaseException, message: str, *args: object) -> None:
    """Log ``exc`` with its traceback, unless it is Ctrl-C on the main thread,
    which is nobody's failure and must end serving: it is raised again."""
    if isinstance(exc, KeyboardInterrupt) and threading.current_thread() is threading.main_thread():
        raise exc
    logger.error(message, *args, exc_info=exc)


class Reactor:
    """A selector that other threads can wake and queue calls on.

    Thread safety: :meth:`call_soon` and :meth:`_wake_nowait` may come from
    any thread; everything else runs on the I/O thread.
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._calls_lock = threading.Lock()
        self._calls_open = True
        self._loop_thread: int | None = None  # set by the loop as it starts serving
        self._gathered_passes = 0

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
        with self._calls_lock:
            if not self._calls_open:
                return False
            self._calls.append(callback)
        self._wake_nowait()
        return True

    def add_reader(self, fileobj: Any, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever ``fileobj`` is readable (I/O thread only)."""
        self._selector.register(fileobj, selectors.EVENT_READ, callback)

    def remove_reader(self, fileobj: Any) -> None:
        """Stop watching ``fileobj``; harmless if unwatched or stopped (I/O thread only)."""
        with contextlib.suppress(KeyError, ValueError, RuntimeError):
            self._selector.unregister(fileobj)

    def _watch_wakeups(self) -> None:
        """Have the selector return when another thread writes to the wake-up socket;
        from now on, calls queued on this thread run at the end of each pass."""
        self._loop_thread = threading.get_ident()
        self._selector.register(self._wake_reader, selectors.EVENT_READ, self._drain_wake)

    def _wake_nowait(self) -> None:
        """Make the selector return (any thread)."""
        # OSError: buffer full (a wake-up is pending anyway) or loop already closed.
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")

    def _drain_wake(self) -> None:
        """Empty the wake-up socket and run the callbacks queued by :meth:`call_soon`."""
        try:
            while self._wake_reader.recv(WAKE_DRAIN_SIZE):
                pass
        except BlockingIOError:
            pass
        self._run_calls()

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

    def _run_calls(self) -> None:
        """Run the queued callbacks, in order; one that fails is logged (I/O thread)."""
        calls = self._calls
        while calls:
            try:
                calls.popleft()()
            except BaseException as exc:
                log_failure(exc, "a callback queued on the I/O loop failed")

    def _refuse_calls(self) -> None:
        """Run what is queued; from now on, callers run their callbacks themselves."""
        with self._calls_lock:
            self._calls_open = False
        self._run_calls()

    def _close_selector(self) -> None:
        """Close the selector and the wake-up socketpair."""
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()
