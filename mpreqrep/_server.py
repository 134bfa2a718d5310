"""``RequestServer``: the yoton-compatible server thread (SPEC section 4).

Owns the listening socket (bound in ``__init__``), the choice of dispatcher
(inline, threads, a loky pool or a user's executor) and the server's life
cycle: ``start``/``run``/``stop``/``join`` and the context manager. The I/O
itself is :class:`~mpreqrep._ioloop.IOLoop`'s; how handlers run is the
dispatcher's.

In process mode each worker holds a pickled copy of the server: everything
set in ``__init__`` travels, the thread state, sockets and executor do not
(see :meth:`RequestServer.__getstate__`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from types import FrameType, TracebackType

from ._address import format_address, tcp_endpoint
from ._dispatch import Dispatcher, InlineDispatcher, thread_dispatcher
from ._ioloop import IOLoop

TYPE_CHECKING = False  # typing is not imported at run time (import cost, see README)
if TYPE_CHECKING:
    from typing import Any

    from ._pool import ProcessPoolDispatcher

logger = logging.getLogger("mpreqrep")

DEFAULT_MAX_REQUEST_SIZE = 1_048_576
DEFAULT_READ_TIMEOUT_S = 10.0
DEFAULT_MAX_PENDING = 1024
DEFAULT_MAX_BUFFERED_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_THREADS = 64
DEFAULT_BACKLOG = 1024
DEFAULT_GRACEFUL_TIMEOUT_S = 30.0

_THREAD_ATTRIBUTES = frozenset(vars(threading.Thread()))


class _Options:
    """The server's settings; picklable, so they reach process workers too.

    A plain class: a dataclass or a ``NamedTuple`` would import ``dataclasses``
    or ``typing`` with the server (~6 ms, ~4 ms; README, "Coming from yoton").
    """

    def __init__(
        self,
        *,
        async_val: bool,
        verbose: int,
        workers: int | None,
        request_timeout_s: float | None,
        max_request_size: int,
        read_timeout_s: float,
        max_pending: int | None,
        max_buffered_bytes: int | None,
        max_worker_memory: int | None,
        max_threads: int,
        graceful_timeout_s: float | None = DEFAULT_GRACEFUL_TIMEOUT_S,
        max_requests: int | None = None,
        max_requests_jitter: int = 0,
    ) -> None:
        self.graceful_timeout_s = graceful_timeout_s
        self.max_requests = max_requests
        self.max_requests_jitter = max_requests_jitter
        self.async_val = async_val
        self.verbose = verbose
        self.workers = workers
        self.request_timeout_s = request_timeout_s
        self.max_request_size = max_request_size
        self.read_timeout_s = read_timeout_s
        self.max_pending = max_pending
        self.max_buffered_bytes = max_buffered_bytes
        self.max_worker_memory = max_worker_memory
        self.max_threads = max_threads


class _Runtime:
    """What lives only in the serving process: sockets, the loop, the dispatcher."""

    def __init__(
        self, listener: socket.socket, executor: Executor | Callable[..., Executor] | None
    ) -> None:
        self.listener = listener
        self.executor = executor
        self.loop: IOLoop | None = None
        self.dispatcher: Dispatcher | None = None
        self.stop_requested = False
        self.failure: BaseException | None = None
        self.claimed = False  # start() or run() was called: a server serves once
        self.claim_lock = threading.Lock()

    def claim(self, method: str) -> None:
        """Mark the server as serving, or raise if it served before (any thread)."""
        with self.claim_lock:
            if self.claimed:
                raise RuntimeError(
                    f"{method}(): a server serves only once, and this one was started before"
                )
            self.claimed = True

    def prepare(self, server: RequestServer, options: _Options) -> None:
        """Build and start the dispatcher, then the I/O loop that feeds it."""
        dispatcher = _make_dispatcher(server, options, self.executor)
        dispatcher.on_failure(server._stop_with_failure)
        dispatcher.start()
        self.dispatcher = dispatcher
        self.loop = IOLoop(
            self.listener,
            dispatcher,
            read_timeout_s=options.read_timeout_s,
            request_timeout_s=None if dispatcher.times_requests_out else options.request_timeout_s,
            max_request_size=options.max_request_size,
            max_pending=options.max_pending,
            max_buffered_bytes=options.max_buffered_bytes,
            on_accept=_print_accept if options.verbose else None,
        )
        if self.stop_requested:
            self.request_stop()

    def request_stop(self) -> None:
        """Have the loop stop and the dispatcher begin its graceful timeout."""
        self.stop_requested = True
        if self.loop is not None and self.dispatcher is not None:
            self.loop.request_stop()
            self.dispatcher.begin_stop()


class RequestServer(threading.Thread):
    """A request-reply server: subclass it and overload :meth:`handle_request`.

    One TCP connection per request, as in yoton. The socket is bound and
    listening when the constructor returns; :meth:`start` serves in a daemon
    thread, :meth:`run` in the calling thread.

    Args:
        address: ``"[tcp://]host:port"`` (see :func:`split_address`); port 0
            binds an ephemeral port, reported by :attr:`port`.
        async_val: thread mode only: run handlers concurrently on threads.
            ``async`` is accepted as a keyword alias (yoton's signature).
        verbose: print, as yoton does, a line when serving starts and one
            per accepted connection.
        workers: ``None`` for thread mode, an int >= 1 or ``"auto"``
            (physical cores) for a loky process pool of that many workers.
        executor: any ``concurrent.futures.Executor`` to run handlers on
            (not owned: the server does not shut it down), or a factory of
            one, built at start, shut down at stop and rebuilt if a worker's
            death breaks it; a factory that takes ``initializer`` and
            ``initargs`` keywords (e.g. ``functools.partial(loky.ProcessPoolExecutor,
            4)``) gets the server to each worker through them, once.
        request_timeout: seconds a request may wait for its handler before
            its client is closed without a reply, counted from the moment it
            was read (in process mode, from the moment its handler started,
            and its worker is killed). In sync mode handlers then run on one
            handler thread, off the I/O thread, so that the client is cut off
            on time while a handler runs on; they still never overlap, so
            the requests queued behind a handler that runs past the timeout
            time out too.
        max_request_size: bytes a request may reach without a CRLF.
        read_timeout: seconds a client may take to send its request, and
            may let pass without taking any of its reply (a client that
            keeps reading gets all of it, however long that takes).
        max_pending: requests in flight past which accepting pauses.
        max_buffered_bytes: request and reply bytes buffered for clients
            (say, replies to clients that read slowly or not at all) past
            which accepting pauses and newly read requests wait; requests in
            flight count as large as the largest recent reply. ``None`` for
            no bound.
        max_worker_memory: process mode: bytes of RSS past which a worker is
            recycled between requests.
        max_threads: ``async_val=True``: size of the handler thread pool.
        backlog: the listen backlog.
        graceful_timeout: process mode: seconds the running requests get
            after :meth:`stop`; then the workers still running them are
            killed (frozen ones too) and their clients get no reply. 30 by
            default, as gunicorn's; ``None`` waits as long as they run.
        max_requests: process mode: requests after which a worker is
            recycled (replaced once another worker serves), as gunicorn's.
        max_requests_jitter: each worker draws its own limit in
            ``[max_requests, max_requests + max_requests_jitter]``, so
            workers do not recycle together.

    Raises:
        ValueError: a malformed address, a protocol other than tcp, both
            ``workers`` and ``executor``, or a bad option value.
        TypeError: ``executor`` is neither an ``Executor`` nor a callable.
        OSError: the address cannot be bound (e.g. the port is taken).

    Life cycle: as a ``threading.Thread``, a server serves once: a second
    :meth:`start` or :meth:`run` raises ``RuntimeError``. :meth:`stop`
    before serving makes serving end at once. A server also stops by
    itself if serving cannot continue (process mode: the pool's supervision
    ended or kept failing); :attr:`failure` then says why.

    Thread safety: :meth:`stop` and :meth:`stats` may be called from any
    thread. ``handle_request`` calls never overlap in sync thread mode; in
    the other modes they run concurrently.
    """

    def __init__(
        self,
        address: str,
        async_val: bool = False,
        verbose: int = 0,
        *,
        workers: int | str | None = None,
        executor: Executor | Callable[..., Executor] | None = None,
        request_timeout: float | None = None,
        max_request_size: int = DEFAULT_MAX_REQUEST_SIZE,
        read_timeout: float = DEFAULT_READ_TIMEOUT_S,
        max_pending: int | None = DEFAULT_MAX_PENDING,
        max_buffered_bytes: int | None = DEFAULT_MAX_BUFFERED_BYTES,
        max_worker_memory: int | None = None,
        max_threads: int = DEFAULT_MAX_THREADS,
        backlog: int = DEFAULT_BACKLOG,
        graceful_timeout: float | None = DEFAULT_GRACEFUL_TIMEOUT_S,
        max_requests: int | None = None,
        max_requests_jitter: int = 0,
        **kwargs: Any,
    ) -> None:
        async_val = _pop_async_alias(async_val, kwargs)
        super().__init__(daemon=True)
        self._options = _Options(
            async_val=bool(async_val),
            verbose=verbose,
            workers=_resolve_workers(workers),
            request_timeout_s=request_timeout,
            max_request_size=max_request_size,
            read_timeout_s=read_timeout,
            max_pending=max_pending,
            max_buffered_bytes=max_buffered_bytes,
            max_worker_memory=max_worker_memory,
            max_threads=max_threads,
            graceful_timeout_s=graceful_timeout,
            max_requests=max_requests,
            max_requests_jitter=max_requests_jitter,
        )
        _check_options(self._options, executor)
        host, port = tcp_endpoint(address)
        listener = _listen(host, port, backlog)
        self.port: int = listener.getsockname()[1]
        self.address: str = format_address(host, self.port)
        self.name = f"mpreqrep-server-{self.port}"
        self._runtime: _Runtime | None = _Runtime(listener, executor)

    @property
    def failure(self) -> BaseException | None:
        """The error that stopped the server by itself, ``None`` otherwise.

        Set when serving cannot continue (process mode: the pool's
        supervision ended, or failed in every pass for 10 s); every request
        in flight then got no reply and the server stops as after
        :meth:`stop`. Read-only; any thread. A worker's copy has none.
        """
        return None if self._runtime is None else self._runtime.failure

    # -- the handler --------------------------------------------------------------------

    def handle_request(self, request: str) -> str:
        """Return the reply to one request; overload this.

        Args:
            request: the request text, with its trailing CRLF if it had one.

        Returns:
            The reply text; CRLF is appended on the wire unless present.
            The default echoes ``"Requested: " + request``, as yoton's does.
        """
        return "Requested: " + request

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Prepare the dispatcher (warm the pool) here, then serve in a thread.

        Raises:
            RuntimeError: the server was started or run before; raised
                before anything is touched.
            Exception: whatever preparing the dispatcher raised (e.g. the
                server cannot be pickled for process workers). The listener
                is closed then, so clients get ``NoServerError`` at once.
        """
        runtime = self._require_runtime()
        runtime.claim("start")
        with _released_on_failure(runtime):
            runtime.prepare(self, self._options)
            super().start()

    def run(self) -> None:
        """Serve in the calling thread until :meth:`stop`, then drain and clean up.

        In the main thread, with Python's default SIGINT handler in place,
        Ctrl-C stops the server as :meth:`stop` does (the requests in flight
        are answered); a second Ctrl-C raises ``KeyboardInterrupt`` as usual.

        Raises:
            RuntimeError: called directly on a server that was started or
                run before.
            Exception: as :meth:`start`.
        """
        runtime = self._require_runtime()
        if threading.current_thread() is not self:  # called directly, not through start()
            runtime.claim("run")
            with _released_on_failure(runtime):
                runtime.prepare(self, self._options)
        assert runtime.loop is not None and runtime.dispatcher is not None
        logger.info("serving at %s", self.address)
        if self._options.verbose:
            _print_hosting(runtime.listener)
        try:
            with _ctrl_c_stops(self.stop):
                runtime.loop.serve()
        finally:
            runtime.dispatcher.shutdown()
            logger.info("stopped serving at %s", self.address)

    def stop(self) -> None:
        """Ask the server to stop; returns at once. After :meth:`join`, the
        listener is closed and every accepted request has been answered.

        The listener stays open a little longer (50 ms, or while the requests
        accepted before the stop drain) and what arrives meanwhile is answered,
        so yoton's idiom, ``stop()`` then at once one more request as a
        trigger, works (see :mod:`mpreqrep._ioloop`). Idempotent; any thread,
        a handler included.
        """
        self._require_runtime().request_stop()

    def resize(self, workers: int) -> None:
        """Process mode: keep ``workers`` worker processes from now on, while serving.

        New workers start at once; removed ones (starting ones first, then the
        oldest) take no new request and exit once they answered theirs. Returns
        at once; any thread.

        Raises:
            RuntimeError: not serving in process mode.
            ValueError: ``workers`` is not an int of at least 1.
        """
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int of at least 1, not {workers!r}")
        self._pool_dispatcher("resize").resize(workers)

    def restart_workers(self) -> None:
        """Process mode: replace every worker, one at a time, without losing a request.

        Each new worker is serving before its old one retires, and the old one
        answers its requests first. New workers load a fresh copy of the
        server and import its module afresh, so edited code is served. Returns
        at once; any thread.

        Raises:
            RuntimeError: not serving in process mode.
        """
        self._pool_dispatcher("restart_workers").restart_workers()

    def stats(self) -> dict[str, Any]:
        """Counters, latency percentiles and the dispatcher's figures (any thread)."""
        runtime = self._require_runtime()
        if runtime.loop is None or runtime.dispatcher is None:
            return {}
        in_flight, queued, reading = runtime.loop.counts()
        figures = runtime.loop.stats.snapshot(in_flight=in_flight, queued=queued, reading=reading)
        figures["buffered_bytes"] = runtime.loop.buffered_bytes
        # The loop's figures win a clash: they count every request the same way in every mode.
        return {**runtime.dispatcher.stats(), **figures}

    def __enter__(self) -> RequestServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
        self.join()

    # -- pickling for process workers ---------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """Everything set in ``__init__`` except thread state and runtime objects."""
        return {
            key: value
            for key, value in self.__dict__.items()
            if key not in _THREAD_ATTRIBUTES and key != "_runtime"
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild a copy that can handle requests but never serves."""
        threading.Thread.__init__(self, daemon=True)
        self.__dict__.update(state)
        self._runtime = None

    # -- internals ----------------------------------------------------------------------

    def _require_runtime(self) -> _Runtime:
        """The runtime, which copies made for workers do not have."""
        if self._runtime is None:
            raise RuntimeError("this is a worker's copy of the server; it cannot serve")
        return self._runtime

    def _pool_dispatcher(self, method: str) -> ProcessPoolDispatcher:
        """The process pool this server serves with, or ``RuntimeError``."""
        runtime = self._require_runtime()
        dispatcher = runtime.dispatcher
        if self._options.workers is None or dispatcher is None:
            raise RuntimeError(f"{method}() needs a server serving in process mode (workers=N)")
        from ._pool import ProcessPoolDispatcher

        assert isinstance(dispatcher, ProcessPoolDispatcher)
        return dispatcher

    def _stop_with_failure(self, failure: BaseException) -> None:
        """The dispatcher cannot serve any more: remember why and stop (any thread)."""
        runtime = self._require_runtime()
        runtime.failure = runtime.failure or failure
        logger.error("the server at %s stops: %s", self.address, failure)
        self.stop()


@contextlib.contextmanager
def _ctrl_c_stops(stop: Callable[[], None]) -> Iterator[None]:
    """Make the first Ctrl-C call ``stop``, in the main thread with the default
    SIGINT handler in place (anywhere else, change nothing)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return

    def stop_on_sigint(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next one interrupts
        logger.info("Ctrl-C: stopping after the requests in flight (again to interrupt)")
        stop()

    signal.signal(signal.SIGINT, stop_on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def _released_on_failure(runtime: _Runtime) -> Iterator[None]:
    """On a failure to start serving, close the listener (so clients get
    ``NoServerError`` at once, not a hang in the backlog) and release what
    was started."""
    try:
        yield
    except BaseException:
        if runtime.loop is not None:
            runtime.loop.close()  # the listener too
        else:
            runtime.listener.close()
        if runtime.dispatcher is not None:
            runtime.dispatcher.shutdown()
        raise


def _pop_async_alias(async_val: bool, kwargs: dict[str, Any]) -> bool:
    """Accept yoton's documented ``async`` keyword; reject any other extra keyword."""
    if "async" in kwargs:
        async_val = kwargs.pop("async")
    if kwargs:
        raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(kwargs))}")
    return async_val


def _check_options(options: _Options, executor: Executor | Callable[..., Executor] | None) -> None:
    """Reject contradictory or out-of-range settings early, with a clear message."""
    if executor is not None and options.workers is not None:
        raise ValueError("give either workers or executor, not both")
    if options.workers is not None:
        from ._pool._options import check_recycling  # loaded already: workers were resolved

        check_recycling(options.max_requests, options.max_requests_jitter)
    if not (executor is None or isinstance(executor, Executor) or callable(executor)):
        raise TypeError(f"executor must be an Executor or a factory of one, not {executor!r}")
    for name in (
        "request_timeout_s",
        "max_worker_memory",
        "max_pending",
        "max_buffered_bytes",
        "graceful_timeout_s",
    ):
        value = getattr(options, name)
        if value is not None and not 0 < value < math.inf:  # NaN and infinity too: None is no limit
            raise ValueError(
                f"{name.removesuffix('_s')} must be positive and finite, not {value!r}"
            )
    for name in ("max_request_size", "read_timeout_s", "max_threads"):
        value = getattr(options, name)
        if not 0 < value < math.inf:
            raise ValueError(
                f"{name.removesuffix('_s')} must be positive and finite, not {value!r}"
            )


def _resolve_workers(workers: int | str | None) -> int | None:
    """The worker count of process mode (``"auto"`` resolved once, here), or ``None``.

    Raises:
        ValueError: not an int >= 1 or ``"auto"``.
    """
    if workers is None:
        return None
    from ._pool import resolve_worker_count  # loky only for process mode

    return resolve_worker_count(workers)


def _make_dispatcher(
    server: RequestServer, options: _Options, executor: Executor | Callable[..., Executor] | None
) -> Dispatcher:
    """Pick how ``handle_request`` runs: the one place where the modes differ."""
    if executor is not None:
        from ._executors import executor_dispatcher

        return executor_dispatcher(executor, server)
    if options.workers is not None:
        from ._pool import ProcessPoolDispatcher

        return ProcessPoolDispatcher(
            server,
            options.workers,
            request_timeout_s=options.request_timeout_s,
            max_worker_memory=options.max_worker_memory,
            max_requests=options.max_requests,
            max_requests_jitter=options.max_requests_jitter,
            graceful_timeout_s=options.graceful_timeout_s,
        )
    if options.async_val:
        return thread_dispatcher(server, max_threads=options.max_threads)
    if options.request_timeout_s is not None:
        # Sync mode with a request timeout: the I/O thread must be free to cut a
        # client off at T while its handler runs on. One handler thread, so
        # handlers still never overlap.
        return thread_dispatcher(server, max_threads=1)
    return InlineDispatcher(server)


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    """A TCP socket bound to (host, port) and listening, or OSError.

    An IPv6 host (``split_address`` gives it without brackets) gets an
    ``AF_INET6`` socket; any other host, ``AF_INET``, as in yoton.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        if hasattr(socket, "SO_EXCLUSIVEADDRUSE"):  # pragma: no cover - Windows only
            # There SO_REUSEADDR would let a second server bind a port that is taken.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        else:  # a restarted server rebinds its port at once, despite TIME_WAIT
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(backlog)
    except BaseException:
        listener.close()
        raise
    return listener


def _print_hosting(listener: socket.socket) -> None:
    """yoton's ``verbose`` line when serving starts, word for word (SPEC section 4)."""
    host, port = listener.getsockname()[:2]
    _print_verbose("Yoton: hosting at %s, port %i" % (host, port))  # noqa: UP031 - yoton's format


def _print_accept(peer: object) -> None:
    """yoton's ``verbose`` line for an accepted connection (SPEC section 4)."""
    _print_verbose("handling request from: " + str(peer))


def _print_verbose(line: str) -> None:
    """Print a ``verbose`` line. A closed or broken stdout (a daemon's, or a pipe
    whose reader left) costs the line, never the connection or the server."""
    try:
        print(line)
    except (OSError, ValueError) as exc:  # ValueError: I/O operation on closed file
        logger.debug("could not print the verbose line: %s", exc)
