"""The one timer of a pool's request deadlines, on the loop that hosts the channels.

The book knows each running request's deadline; this timer makes sure some
thread looks at the book when the earliest one comes due. It runs on the
channels' host (the supervisor's loop until the I/O loop attaches, the I/O
loop from then on, the supervisor again at hand-back), so the requests that
time out fail on the thread that resolves the others, and a request costs
no wake-up of another thread: the timer is set again only when the earliest
deadline moves earlier than the one it is set for (from none to one, in
practice: with one timeout for all, a later request's deadline is never
earlier). A timer that comes due for a request answered meanwhile finds
nothing expired and is set for the next deadline, if any; one that was
cancelled too late to stop it (it had started on its old host) does
nothing::

    book changed (any thread, lock held) ─▶ moved(earliest deadline)
        earlier than the one set for? ─▶ host.call_later(...)
    host thread, at the deadline ─▶ expire callback: book.expire,
        fail those requests, kill their workers, moved(next deadline)
    rehost(new host) ─▶ cancel on the old host, set on the new one

Knows nothing of requests, workers or threads: the caller holds its lock
around every call.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable

from .._dispatch import LoopHooks, TimerHandle


class DeadlineTimer:
    """A timer at the earliest request deadline, on one host at a time.

    Not thread-safe: the caller holds its lock around every call.

    Args:
        host: the loop the timer runs on first.
        expire: run on the host's thread with the timer's number when it comes
            due; it asks :meth:`fired` whether that timer is still the one set
            and if so expires the book and calls :meth:`moved` with the next
            deadline.
    """

    def __init__(self, host: LoopHooks, expire: Callable[[int], None]) -> None:
        self._host = host
        self._expire = expire
        self._timer: TimerHandle | None = None
        self._due: float | None = None  # the deadline the timer is set for
        self._numbers = itertools.count()
        self._number = -1  # the timer set now

    def moved(self, deadline: float | None) -> None:
        """The book's earliest deadline is now ``deadline`` (monotonic, ``None`` for
        none): set the timer for it, unless it is set for that time or earlier."""
        if deadline is None or (self._due is not None and self._due <= deadline):
            return
        self._cancel()
        self._due = deadline
        self._number = number = next(self._numbers)
        expire = functools.partial(self._expire, number)
        self._timer = self._host.call_later(deadline - time.monotonic(), expire)

    def fired(self, number: int) -> bool:
        """Timer ``number`` came due: whether it is the one set (nothing is set any
        more then); ``False`` for one cancelled too late to stop it."""
        if number != self._number:
            return False
        self._cancel()  # it runs already: only forgotten
        return True

    def rehost(self, host: LoopHooks, deadline: float | None) -> None:
        """Run on ``host`` from now on, set for ``deadline``; the old host's timer is
        cancelled (it may have closed: then it would never run anyway)."""
        self._cancel()
        self._host = host
        self.moved(deadline)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._due = None
        self._number = -1
