"""Handlers on other processes and machines: any ``Executor``, Dask's included.

Owns what the ``executor=`` mode needs beyond a plain ``submit``: choosing a
dispatcher for the executor given, getting the server object to each worker
process once (not with every request), replacing a process pool that a dying
worker broke, and :func:`dask_executor` (the Dask dispatcher itself is
:mod:`mpreqrep._dask`). Knows nothing of sockets, the I/O loop
or the server class. Its imports are stdlib-only; ``loky`` and
``distributed`` are imported only when an executor of theirs is in use.

Delivery, once per worker. A thread pool runs the server object itself, so
:class:`~mpreqrep._dispatch.ExecutorDispatcher` submits it directly. Any other
executor gets a per-process cache keyed by a token that is new for every
served run: a request ships only ``(token, None, text)``; a worker that lacks
the token answers with :class:`CacheMiss`, and only that request is sent again
with the server. A worker thus gets a copy per request that found it without
one: one copy, or as many as a burst of first requests that all reached it
before the first copy did; then none until it restarts::

    I/O thread ──submit──▶ RemoteDispatcher ──(token, None, text)──▶ worker process
                               ▲    │                                  │ cache hit: handle
                               │    │◀──────────── CacheMiss ──────────┘ cache miss
                               │    └─(token, server, text)──▶ worker: cache, handle
                               └──────────── reply text or exception ◀──┘

The same mechanism serves loky and the stdlib process pool; it needs nothing
from the engine but running a function, so new or restarted workers just cost
one more miss. Each process keeps the servers of its last
:data:`MAX_CACHED_SERVERS` tokens. Dask does not use it: its scheduler places
the resent request on whichever worker is free, often one that already holds
a copy, so a worker could miss again and again (:mod:`mpreqrep._dask` sends
the server through a worker plugin instead, once per worker).

Crashes. A loky or stdlib pool whose worker dies is broken for good and fails
every request it holds (``BrokenExecutor``). The dispatcher then replaces it
with a new pool of the same kind (owned, shut down with the server; the
user's broken pool is left alone) and retries those requests one at a time
(beside new traffic), so the one that kills its worker again dies alone and
is given up; the others get their replies. (A request whose retry meets an
unrelated crash is given up too.) Dask keeps its pool, and reruns the tasks of a
dead worker on its own, but fails each task that was assigned to
``distributed.scheduler.allowed-failures`` + 1 dying workers with
``KilledWorker``, bystanders included; such a request is retried alone too.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import (
    BrokenExecutor,
    Executor,
    Future,
    InvalidStateError,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from dataclasses import dataclass
from functools import partial
from typing import Any

from ._dispatch import Dispatcher, ExecutorDispatcher, Handler, run_handler

logger = logging.getLogger("mpreqrep")

MAX_CACHED_SERVERS = 4
CRASHES_BEFORE_GIVING_UP = 2
DASK_CONNECT_TIMEOUT_S = 30.0


# -- the worker side ------------------------------------------------------------------


class CacheMiss:
    """What :func:`run_cached` returns when its process lacks the server."""

    __slots__ = ()


_cached_servers: collections.OrderedDict[str, Handler] = collections.OrderedDict()
_cache_lock = threading.Lock()


def run_cached(token: str, server: Handler | None, request: str) -> str | CacheMiss:
    """Handle a request with this process's copy of the server named by ``token``.

    Module-level, so every executor can pickle it; runs in the worker.

    Args:
        token: names one served run of one server.
        server: the server, sent only after this process answered a miss;
            it is then cached under ``token``.
        request: the request text.

    Returns:
        The reply text, or a :class:`CacheMiss` if ``server`` is ``None`` and
        this process holds no copy under ``token``.

    Raises:
        Exception: whatever :func:`~mpreqrep._dispatch.run_handler` raises.
    """
    with _cache_lock:
        if server is None:
            server = _cached_servers.get(token)
            if server is None:
                return CacheMiss()
        _cached_servers[token] = server
        _cached_servers.move_to_end(token)
        while len(_cached_servers) > MAX_CACHED_SERVERS:
            _cached_servers.popitem(last=False)
    return run_handler(server, request)


# -- the dispatchers ------------------------------------------------------------------


@dataclass(eq=False)
class _Call:
    """One request on its way through the executor, across its attempts."""

    request: str
    reply: Future[str]
    send_server: bool = False
    crashes: int = 0
    quarantined: bool = False
    attempt: Future[Any] | None = None


class RemoteDispatcher(Dispatcher):
    """Runs handlers on an executor's worker processes with a cached server copy.

    Args:
        executor: the user's executor (never shut down by the dispatcher).
        server: the server object whose copies the workers run.
        replace: makes a new executor like a broken one; ``None`` if this
            kind of executor cannot be replaced.

    Thread safety: :meth:`submit` is called from the I/O thread; attempts
    finish in the executor's threads; every follow-up (a resend after a
    miss, a retry after a crash) runs on one helper thread of its own.
    """

    def __init__(
        self,
        executor: Executor,
        server: Handler,
        *,
        replace: Callable[[Executor], Executor] | None,
    ) -> None:
        self._executor = executor
        self._owns_executor = False
        self._server = server
        self._replace = replace
        self._token = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mpreqrep-retry")
        self._closed = False
        self._suspects: collections.deque[_Call] = collections.deque()
        self._quarantined: _Call | None = None
        self._copies_sent = 0
        self._replacements = 0
        self._retries = 0

    def submit(self, request: str) -> Future[str]:
        """Send the request with the server's token; the future is the reply's."""
        call = _Call(request, Future())
        call.reply.add_done_callback(partial(_cancel_attempt, call))
        self._send(call)
        return call.reply

    def shutdown(self) -> None:
        """Stop the helper thread and any replacement executor; the user's stays."""
        self._closed = True
        self._helper.shutdown(wait=True)
        if self._owns_executor:
            self._executor.shutdown(wait=False)

    def stats(self) -> dict[str, Any]:
        """The executor in use, server copies sent, pools replaced, crash retries."""
        kind = type(self._executor)
        return {
            "executor": f"{kind.__module__}.{kind.__qualname__}",
            "server_copies_sent": self._copies_sent,
            "executor_replacements": self._replacements,
            "crash_retries": self._retries,
        }

    # -- sending ----------------------------------------------------------------------

    def _send(self, call: _Call) -> None:
        """Submit one attempt, on a replacement if the executor turns out broken."""
        executor = self._executor
        server = self._server if call.send_server else None
        try:
            attempt = self._submit_call(executor, self._token, server, call.request)
        except BrokenExecutor:
            executor = self._replace_broken(executor)
            attempt = self._submit_call(executor, self._token, server, call.request)
        call.attempt = attempt
        if call.reply.cancelled():
            attempt.cancel()
        attempt.add_done_callback(partial(self._on_attempt_done, call, executor))

    def _submit_call(
        self, executor: Executor, token: str, server: Handler | None, request: str
    ) -> Future[Any]:
        """Submit :func:`run_cached`; engines with submit options override this."""
        return executor.submit(run_cached, token, server, request)

    def _on_attempt_done(self, call: _Call, executor: Executor, attempt: Future[Any]) -> None:
        """Settle the reply, or hand a miss or a crash to the helper thread."""
        if call.reply.done():  # given up by the request timeout
            self._leave_quarantine_soon(call)
            return
        if attempt.cancelled():
            self._settle(call, error=RuntimeError("the executor cancelled the request"))
            return
        error = attempt.exception()
        if error is None and isinstance(attempt.result(), CacheMiss):
            self._follow_up(self._resend_with_server, call)
        elif error is not None and self._is_worker_death(error):
            self._follow_up(self._after_crash, call, executor, error)
        elif error is not None:
            self._settle(call, error=error)
        else:
            self._settle(call, reply=attempt.result())

    def _is_worker_death(self, error: BaseException) -> bool:
        """Whether ``error`` says a worker died while the request was in the pool."""
        return isinstance(error, BrokenExecutor)

    def _settle(
        self, call: _Call, *, reply: str | None = None, error: BaseException | None = None
    ) -> None:
        """Give the reply future its outcome, unless the I/O loop cancelled it."""
        with contextlib.suppress(InvalidStateError):  # the request timed out meanwhile
            if error is not None:
                call.reply.set_exception(error)
            else:
                call.reply.set_result(reply)  # type: ignore[arg-type]
        self._leave_quarantine_soon(call)

    # -- follow-ups, on the helper thread ---------------------------------------------

    def _follow_up(self, step: Callable[..., None], *args: Any) -> None:
        """Run ``step(*args)`` on the helper thread, off the executor's own threads."""
        if self._closed:
            logger.debug("dispatcher closed; dropping a follow-up for an abandoned request")
            return
        self._helper.submit(step, *args)

    def _resend_with_server(self, call: _Call) -> None:
        """The worker had no copy of the server: send the request again with it."""
        self._copies_sent += 1
        call.send_server = True
        self._send_or_fail(call)

    def _after_crash(self, call: _Call, executor: Executor, error: BaseException) -> None:
        """A worker died while the pool held this request: retry it alone, or give up."""
        call.crashes += 1
        call.quarantined = False
        if self._quarantined is call:
            self._quarantined = None
        try:
            if isinstance(error, BrokenExecutor):
                self._replace_broken(executor)
        except BrokenExecutor as exc:
            self._settle(call, error=exc)
        else:
            self._retry_or_give_up(call, error)
        self._retry_next_suspect()

    def _retry_or_give_up(self, call: _Call, error: BaseException) -> None:
        """Queue a request for a retry alone, unless its worker died at every try."""
        if call.crashes < CRASHES_BEFORE_GIVING_UP:
            self._suspects.append(call)
            return
        logger.error("giving up on a request: a worker died at each of its %d tries", call.crashes)
        self._settle(call, error=error)

    def _retry_next_suspect(self) -> None:
        """Send the next request that was in a broken pool, once none is out."""
        while self._quarantined is None and self._suspects:
            call = self._suspects.popleft()
            if call.reply.done():
                continue
            self._quarantined = call
            call.quarantined = True
            call.send_server = True  # the replacement's workers have no copy yet
            self._retries += 1
            self._send_or_fail(call)

    def _leave_quarantine_soon(self, call: _Call) -> None:
        """Let the next suspect go once this one is done (from any thread)."""
        if call.quarantined:
            self._follow_up(self._leave_quarantine, call)

    def _leave_quarantine(self, call: _Call) -> None:
        """Free the single retry slot, which ``call`` held, and use it again."""
        call.quarantined = False
        self._quarantined = None
        self._retry_next_suspect()

    def _send_or_fail(self, call: _Call) -> None:
        """Send from the helper thread, where a failure can only settle the reply."""
        try:
            self._send(call)
        except Exception as exc:
            self._settle(call, error=exc)

    # -- replacing a broken executor --------------------------------------------------

    def _replace_broken(self, broken: Executor) -> Executor:
        """The executor to use instead of ``broken``; replaced once per break.

        Raises:
            BrokenExecutor: this kind of executor cannot be replaced, or
                making the replacement failed.
        """
        with self._lock:
            if broken is self._executor:
                self._executor = self._make_replacement(broken)
                if self._owns_executor:
                    broken.shutdown(wait=False)
                self._owns_executor = True
                self._replacements += 1
            return self._executor

    def _make_replacement(self, broken: Executor) -> Executor:
        """A new executor like ``broken``, or ``BrokenExecutor`` if none can be made."""
        kind = type(broken).__qualname__
        if self._replace is None:
            raise BrokenExecutor(f"the {kind} is broken and mpreqrep cannot replace it")
        logger.warning("a worker died and broke the %s; replacing it with a new one", kind)
        try:
            return self._replace(broken)
        except Exception as exc:
            logger.exception("could not replace the broken %s", kind)
            raise BrokenExecutor(f"the {kind} is broken and its replacement failed") from exc


def _cancel_attempt(call: _Call, reply: Future[str]) -> None:
    """Pass the I/O loop's cancellation (a request timeout) on to the attempt."""
    if reply.cancelled() and call.attempt is not None:
        call.attempt.cancel()


# -- choosing ---------------------------------------------------------------------------


def executor_dispatcher(executor: Executor, server: Handler) -> Dispatcher:
    """The dispatcher for a user's executor (which it never shuts down).

    Args:
        executor: any ``concurrent.futures.Executor``.
        server: the server object.

    Returns:
        A thread pool gets the server itself through an
        :class:`~mpreqrep._dispatch.ExecutorDispatcher`; a Dask executor a
        :class:`~mpreqrep._dask.DaskDispatcher`; any other a :class:`RemoteDispatcher`.
    """
    if isinstance(executor, ThreadPoolExecutor):
        return ExecutorDispatcher(executor, server, owned=False)
    client = _dask_client(executor)
    if client is not None:
        from ._dask import DaskDispatcher

        return DaskDispatcher(executor, server, client=client)
    return RemoteDispatcher(executor, server, replace=_replacer_for(executor))


def _dask_client(executor: Executor) -> Any:
    """The ``distributed.Client`` behind a Dask executor, ``None`` for other executors."""
    if isinstance(executor, DaskExecutor):
        return executor.client
    if type(executor).__module__.startswith("distributed."):
        return getattr(executor, "_client", None)
    return None


def _replacer_for(executor: Executor) -> Callable[[Executor], Executor] | None:
    """How to make a new pool like ``executor``: known for loky and stdlib pools."""
    if isinstance(executor, ProcessPoolExecutor):
        return _new_stdlib_pool
    if type(executor).__module__.startswith("loky."):
        return _new_loky_pool
    return None


def _new_stdlib_pool(broken: Executor) -> Executor:
    """A stdlib process pool with the size, context and initializer of ``broken``."""
    assert isinstance(broken, ProcessPoolExecutor)
    return ProcessPoolExecutor(
        max_workers=getattr(broken, "_max_workers", None),
        mp_context=broken._mp_context,
        initializer=broken._initializer,
        initargs=broken._initargs,
    )


def _new_loky_pool(broken: Executor) -> Executor:
    """A loky pool with the size, context, idle timeout, initializer and env of ``broken``."""
    import loky

    pool: Executor = loky.ProcessPoolExecutor(
        max_workers=broken._max_workers,  # type: ignore[attr-defined]
        context=broken._context,  # type: ignore[attr-defined]
        timeout=broken._timeout,  # type: ignore[attr-defined]
        initializer=broken._initializer,  # type: ignore[attr-defined]
        initargs=broken._initargs,  # type: ignore[attr-defined]
        env=broken._env,  # type: ignore[attr-defined]
    )
    return pool


# -- Dask -------------------------------------------------------------------------------


class DaskExecutor(Executor):
    """An executor on a Dask cluster through a client of its own.

    Made by :func:`dask_executor`. Submits impure tasks (identical requests
    each run); :meth:`shutdown` also closes the client. ``client`` is the
    ``distributed.Client``, for anything else one may want to ask the cluster.

    Args:
        client: a connected ``distributed.Client``, owned from now on.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self._executor: Executor = client.get_executor(pure=False)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Submit ``fn(*args, **kwargs)`` as a Dask task (Dask options allowed in kwargs)."""
        return self._executor.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Wait for the tasks (unless ``wait`` is false or ``cancel_futures`` true, which
        cancel them), then close the client."""
        self._executor.shutdown(wait=wait and not cancel_futures)
        self.client.close()


def dask_executor(
    scheduler_address: str, *, connect_timeout_s: float = DASK_CONNECT_TIMEOUT_S
) -> DaskExecutor:
    """Connect to a Dask scheduler and return an executor on its workers.

    Needs the ``mpreqrep[dask]`` extra on this machine and, on every worker,
    mpreqrep and the module that defines the server class.

    Args:
        scheduler_address: e.g. ``"tcp://scheduler:8786"``.
        connect_timeout_s: how long to wait for the scheduler.

    Returns:
        An executor for ``RequestServer(..., executor=...)``; use it as a
        context manager, or call ``shutdown()``, to close its client.

    Raises:
        ImportError: ``distributed`` is not installed.
        OSError: no scheduler answered within ``connect_timeout_s``.
    """
    try:
        from distributed import Client
    except ImportError as exc:
        raise ImportError("Dask support needs the extra: pip install 'mpreqrep[dask]'") from exc
    client = Client(  # type: ignore[no-untyped-call]
        scheduler_address, timeout=connect_timeout_s, set_as_default=False
    )
    return DaskExecutor(client)
