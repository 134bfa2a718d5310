"""Faults for the supervision tests: an exception raised in the pool's supervisor thread.

The exception is the cause (as a bug or a stray ``SystemExit`` would raise it);
what follows is the library's own doing. ``PyThreadState_SetAsyncExc`` is
CPython's documented C API for raising in another thread.
"""

from __future__ import annotations

import ctypes
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from .ops_handlers import OpsServer

SUPERVISOR_THREAD = "mpreqrep-pool-supervisor"


def raise_in_thread(thread: threading.Thread, exc_type: type[BaseException]) -> None:
    """Have ``thread`` raise ``exc_type`` at its next Python instruction."""
    assert thread.ident is not None
    raised = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident), ctypes.py_object(exc_type)
    )
    assert raised == 1, raised


def raise_and_wake(
    thread: threading.Thread, exc_type: type[BaseException], wake: Callable[[], object]
) -> None:
    """Have ``thread`` raise ``exc_type``, then call ``wake`` so that it runs at once.

    Done from a thread of its own with no trace function, while the caller waits in
    ``join`` (no bytecode runs meanwhile): on CPython 3.11 a thread traced by
    coverage that runs while another's async exception is pending can loop for ever
    at its next call.
    """

    def inject() -> None:
        sys.settrace(None)
        raise_in_thread(thread, exc_type)
        wake()

    injector = threading.Thread(target=inject)
    injector.start()
    injector.join()


def supervisor_thread() -> threading.Thread:
    """The one pool supervisor thread of this process."""
    (thread,) = [t for t in threading.enumerate() if t.name == SUPERVISOR_THREAD]
    return thread


class EndsSupervisionOnSigusr1(OpsServer):
    """An :class:`OpsServer` whose process, on SIGUSR1, raises ``SystemExit`` in its
    pool's supervisor thread (and wakes it). Built in the main thread; workers'
    copies are unpickled, so they never install the handler."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        signal.signal(signal.SIGUSR1, self._end_supervision)

    def _end_supervision(self, signum: int, frame: FrameType | None) -> None:
        wanted = self.stats()["workers_wanted"]
        raise_and_wake(supervisor_thread(), SystemExit, lambda: self.resize(wanted))
