"""The dispatch seam: how ``handle_request`` runs once a request has been read.

Every dispatcher turns request text into a :class:`~concurrent.futures.Future`
of the reply text. The I/O loop only calls :meth:`Dispatcher.submit` and reads
the future; it never knows whether the handler ran inline, on a thread, in a
process pool or on a cluster::

    I/O loop ──submit(text)──▶ Dispatcher ──▶ inline call │ thread pool │ Executor
        ▲                                                       │
        └──────── done callback (reply text or exception) ◀─────┘

This module uses the standard library (and ``_threads``) only; the loky pool
lives in ``_pool/``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from concurrent.futures import Executor, Future

from ._errors import HandlerReturnTypeError
from ._threads import DaemonThreadExecutor

TYPE_CHECKING = False  # typing is not imported at run time (import cost, see README)
if TYPE_CHECKING:
    from typing import Any, Protocol
else:
    Protocol = object  # Handler, TimerHandle and LoopHooks are for type checkers only


class Handler(Protocol):
    """Anything with a ``handle_request`` method: a :class:`RequestServer`."""

    def handle_request(self, request: str) -> str:
        """Return the reply to one request."""


class TimerHandle(Protocol):
    """A callback set to run later on a loop's thread (see :meth:`LoopHooks.call_later`)."""

    def cancel(self) -> None:
        """Never run the callback (any thread); no effect once it has started."""


class LoopHooks(Protocol):
    """What the I/O loop offers a dispatcher that reads replies itself (see
    :meth:`Dispatcher.attach`)."""

    def call_soon(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` on the I/O thread soon (any thread); ``False`` once the
        loop has stopped, when the caller must run it itself."""

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback`` on the I/O thread once ``delay_s`` seconds have passed (any
        thread; from another one it costs a wake-up). Timers due together run in the
        order they were set; one set once the loop has stopped never runs. Raises
        ``ValueError`` for a NaN delay."""

    def add_reader(self, fileobj: Any, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the I/O thread whenever ``fileobj`` is readable
        (I/O thread only)."""

    def remove_reader(self, fileobj: Any) -> None:
        """Stop watching ``fileobj``; harmless if it is not watched (I/O thread only)."""


FailureCallback = Callable[[BaseException], None]
"""Called by a dispatcher that cannot serve any more, with the reason (any thread)."""


def run_handler(handler: Handler, request: str) -> str:
    """Call ``handler.handle_request`` and check that it returned a ``str``.

    Module-level so that process pools and clusters can pickle it.

    Args:
        handler: the server object (or its copy in a worker).
        request: the request text, trailing CRLF included.

    Returns:
        The reply text, as an exact ``str``: a subclass's own methods must
        not run on the I/O thread, which encodes the reply.

    Raises:
        HandlerReturnTypeError: the handler returned something else.
        BaseException: whatever the handler raised.
    """
    reply = handler.handle_request(request)
    if not isinstance(reply, str):
        raise HandlerReturnTypeError(
            f"handle_request() should return a str, not {type(reply).__name__}"
        )
    return str.__str__(reply)  # the reply itself if exact, else a plain copy


class Dispatcher(abc.ABC):
    """Runs ``handle_request`` for the I/O loop.

    ``start`` is called once before the first request, ``submit`` only from
    the I/O thread, ``shutdown`` once after the last reply was written.

    Attributes:
        times_requests_out: the dispatcher enforces ``request_timeout`` itself,
            from the moment a handler starts (failing the future with a
            :class:`~mpreqrep._errors.RequestTimeoutError`); otherwise the I/O loop counts it from
            the moment the request was read.
    """

    times_requests_out = False

    def start(self) -> None:  # noqa: B027 - most dispatchers need no warm-up
        """Prepare to run handlers (warm a pool); errors raise from here."""

    def attach(self, loop: LoopHooks) -> None:  # noqa: B027 - most dispatchers need no loop
        """Called by the I/O loop as it starts serving: a dispatcher may then
        read its replies on the I/O thread, saving a thread hop per request."""

    def on_failure(self, callback: FailureCallback) -> None:  # noqa: B027 - most never fail
        """Register ``callback``, called (from any thread) if the dispatcher can serve
        no more; the server then stops with that error. By default, never called."""

    @abc.abstractmethod
    def submit(self, request: str) -> Future[str]:
        """Start handling one request and return the future of its reply."""

    def begin_stop(self) -> None:  # noqa: B027 - most dispatchers have no graceful timeout
        """The server was asked to stop (any thread): a dispatcher may start a
        graceful timeout now; :meth:`shutdown` follows once the I/O loop drained."""

    def shutdown(self) -> None:  # noqa: B027 - most dispatchers own nothing
        """Release what the dispatcher owns, waiting for running handlers."""

    def stats(self) -> dict[str, Any]:
        """Figures of the dispatcher itself (pool health, workers)."""
        return {}


class InlineDispatcher(Dispatcher):
    """Runs the handler at once in the I/O thread: yoton's sync mode.

    Handlers never overlap and cost no thread hop; a slow handler holds up
    the whole I/O loop until it returns, so sync mode with a request timeout
    uses a one-thread :func:`thread_dispatcher` instead.
    """

    def __init__(self, handler: Handler) -> None:
        self._handler = handler

    def submit(self, request: str) -> Future[str]:
        """Run the handler now; the returned future is already done."""
        future: Future[str] = Future()
        try:
            future.set_result(run_handler(self._handler, request))
        except BaseException as exc:  # SystemExit too: the I/O loop logs it as a failure
            future.set_exception(exc)
        return future


class ExecutorDispatcher(Dispatcher):
    """Submits ``run_handler(server, request)`` to a ``concurrent.futures.Executor``.

    Meant for executors in this process (thread pools): they run the server
    object itself, so nothing is copied. Executors in other processes go
    through ``_remote.RemoteDispatcher``, which sends each worker one copy.

    Args:
        executor: the executor to submit to.
        handler: the server object handed to every call.
        owned: shut the executor down with the server (``True`` for the
            thread pool the server made itself, ``False`` for a user's).
    """

    def __init__(self, executor: Executor, handler: Handler, *, owned: bool) -> None:
        self._executor = executor
        self._handler = handler
        self._owned = owned

    def submit(self, request: str) -> Future[str]:
        """Submit the handler call to the executor."""
        return self._executor.submit(run_handler, self._handler, request)

    def shutdown(self) -> None:
        """Shut the executor down if the server owns it.

        Does not wait: by now every answered request is done, and a handler
        still running was abandoned by its request timeout (a thread cannot
        be killed).
        """
        if self._owned:
            self._executor.shutdown(wait=False, cancel_futures=True)


def thread_dispatcher(handler: Handler, *, max_threads: int) -> ExecutorDispatcher:
    """A dispatcher that runs handlers concurrently on up to ``max_threads`` threads.

    The threads are daemons, as yoton's handler threads are: a handler still
    running never holds up interpreter exit (``stop()`` + ``join()`` still
    wait for every accepted request).
    """
    pool = DaemonThreadExecutor(max_threads, thread_name_prefix="mpreqrep-handler")
    return ExecutorDispatcher(pool, handler, owned=True)
