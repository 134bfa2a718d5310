"""A small thread-pool executor whose threads are daemons, like yoton's handlers.

:class:`concurrent.futures.ThreadPoolExecutor` joins its workers at
interpreter exit, so one running (or stuck) handler holds the process open.
:class:`DaemonThreadExecutor` runs the same :class:`~concurrent.futures.Executor`
interface on daemon threads: exit never waits for them, while
``shutdown(wait=True)`` still does. Threads start on demand, up to
``max_workers``, and an idle one exits after ``idle_timeout_s``, so a pool of
one (``max_workers=1``) costs nothing while unused.

It knows nothing of sockets, servers or handlers::

    submit(fn) ──▶ _queue (deque, under _condition) ──▶ idle thread wakes
                       │                                 or a new one starts
                       ▼                                 (if < max_workers)
                   Future ◀── result / exception ◀── fn(*args, **kwargs)
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future

TYPE_CHECKING = False  # typing is not imported at run time (import cost, see README)
if TYPE_CHECKING:
    from typing import Any, ParamSpec, TypeVar

    _P = ParamSpec("_P")
    _T = TypeVar("_T")

IDLE_TIMEOUT_S = 10.0

_thread_numbers = itertools.count()


class _WorkItem:
    """One submitted call and the future of its result."""

    __slots__ = ("args", "fn", "future", "kwargs")

    def __init__(self, future: Future[Any], fn: Callable[..., Any], args: Any, kwargs: Any) -> None:
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs

    def run(self) -> None:
        """Call the function unless the future was cancelled; record the outcome."""
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            result = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:  # the caller sees it through the future
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)


class DaemonThreadExecutor(Executor):
    """An :class:`~concurrent.futures.Executor` on up to ``max_workers`` daemon threads.

    Args:
        max_workers: the most threads running at once (>= 1).
        thread_name_prefix: threads are named ``{prefix}-{n}``.
        idle_timeout_s: seconds an idle thread waits for work before it exits.

    Raises:
        ValueError: ``max_workers`` < 1 or ``idle_timeout_s`` <= 0.

    Thread safety: :meth:`submit` and :meth:`shutdown` may be called from any
    thread, a worker thread included. A call still running at interpreter
    exit is abandoned, as a daemon thread is.
    """

    def __init__(
        self,
        max_workers: int,
        *,
        thread_name_prefix: str = "mpreqrep-thread",
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        if idle_timeout_s <= 0:
            raise ValueError("idle_timeout_s must be positive")
        self._max_workers = max_workers
        self._prefix = thread_name_prefix
        self._idle_timeout_s = idle_timeout_s
        self._condition = threading.Condition()
        self._queue: collections.deque[_WorkItem] = collections.deque()
        self._threads: set[threading.Thread] = set()
        self._idle = 0
        self._shut_down = False

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        """Schedule ``fn(*args, **kwargs)``; start a thread if none is free.

        Raises:
            RuntimeError: the executor was shut down.
        """
        future: Future[_T] = Future()
        with self._condition:
            if self._shut_down:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.append(_WorkItem(future, fn, args, kwargs))
            # Each idle thread will take one item: start another only if they fall short.
            if len(self._queue) > self._idle and len(self._threads) < self._max_workers:
                self._start_thread()
            elif self._idle:
                self._condition.notify()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new calls; the threads finish what is queued, then exit.

        Args:
            wait: block until every thread has exited (not the calling one,
                if it is a worker of this executor).
            cancel_futures: cancel the calls that have not started yet.
        """
        with self._condition:
            self._shut_down = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft().future.cancel()
            self._condition.notify_all()
            threads = list(self._threads)
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()

    def _start_thread(self) -> None:
        """Start one more daemon worker (called with the condition held)."""
        name = f"{self._prefix}-{next(_thread_numbers)}"
        thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._threads.add(thread)
        thread.start()

    def _work(self) -> None:
        """A worker's life: run items until idle too long or shut down."""
        while (item := self._next_item()) is not None:
            item.run()
            del item  # drop the call's arguments and result before waiting again

    def _next_item(self) -> _WorkItem | None:
        """The next item to run, or ``None`` when this thread should exit."""
        with self._condition:
            while not self._queue:
                if self._shut_down or not self._wait_idle():
                    self._threads.discard(threading.current_thread())
                    return None
            return self._queue.popleft()

    def _wait_idle(self) -> bool:
        """Wait for work (condition held); ``False`` if idle past the timeout."""
        self._idle += 1
        notified = self._condition.wait(self._idle_timeout_s)
        self._idle -= 1
        return notified or bool(self._queue)
