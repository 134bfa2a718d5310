"""Handlers in other processes: the dispatcher for process pools, Dask's base.

Owns what ``executor=`` needs beyond a plain ``submit`` on a pool of worker
processes: requests that carry a token instead of the server, counting the
copies each worker reports, and what a dying worker costs (replacing a
broken pool, retrying its requests). The worker side is
:mod:`mpreqrep._remote_worker`; Dask's specifics are :mod:`mpreqrep._dask`;
which dispatcher serves which executor is :mod:`mpreqrep._executors`. Knows
nothing of sockets, the I/O loop or the server class; stdlib only.

Delivery. A pool the server built from the user's factory got the server
through its initializer, once in each worker process as it started (its
replacements too). A pool passed as it is cannot be given an initializer any
more: a worker without a copy answers its first request with a miss, and
that request is sent again with the server (see :mod:`mpreqrep._remote_worker`)::

    I/O thread ──submit──▶ RemoteDispatcher ──(token, None, text)──▶ worker process
                               ▲    │                                  │ has a copy: handle
                               │    │◀──────────── CacheMiss ──────────┘ none (pool as is)
                               │    └─(token, server, text)──▶ worker: keep it, handle
                               └──── WorkerReply(pid, copies, reply) or exception ◀──┘

There the pool decides which worker runs the resent request, perhaps one
that already holds a copy, so such a pool may carry a few copies more than
it has workers, until each worker has one; then none until one restarts.

Crashes. A loky or stdlib pool whose worker dies is broken for good and fails
every request it holds (``BrokenExecutor``). If the server built the pool
from a factory, it builds a new one the same way (shut down with the
server) and retries those requests one at a time (beside new traffic), so
the one that kills its worker again dies alone and is given up; the others
get their replies. (A request whose retry meets an unrelated crash is given
up too.) A broken pool passed as it is cannot be rebuilt through public
means: its requests fail. Dask keeps its pool, and reruns the tasks of a
dead worker on its own, but fails each task that was assigned to
``distributed.scheduler.allowed-failures`` + 1 dying workers with
``KilledWorker``, bystanders included; such a request is retried alone too.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import (
    BrokenExecutor,
    Executor,
    Future,
    InvalidStateError,
    ThreadPoolExecutor,
)
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ._dispatch import Dispatcher, Handler
from ._remote_worker import CacheMiss, WorkerReply, run_cached

logger = logging.getLogger("mpreqrep")

CRASHES_BEFORE_GIVING_UP = 2


@dataclass(eq=False)
class _Attempt:
    """The attempt in flight for a :class:`_Call`, where the reply's cancellation goes.

    Held apart from the call so that nothing makes a reference cycle once the
    attempt is done: the reply future's callback holds this, not the call (which
    holds the reply). A cycle would keep each finished reply, and its text, alive
    until the garbage collector's next full pass, long after it was sent.
    """

    future: Future[Any] | None = None


@dataclass(eq=False)
class _Call:
    """One request on its way through the executor, across its attempts."""

    request: str
    reply: Future[str]
    send_server: bool = False
    crashes: int = 0
    quarantined: bool = False
    current: _Attempt = field(default_factory=_Attempt)


class RemoteDispatcher(Dispatcher):
    """Runs handlers on an executor's worker processes, each with its copy of the server.

    Args:
        executor: the executor to submit to.
        server: the server object whose copies the workers run.
        token: names this served run in the workers' caches.
        owned: shut ``executor`` down with the server (one the server built).
        make_executor: builds a new executor to replace a broken one (the
            user's factory); ``None`` for an executor passed as it is.

    Thread safety: :meth:`submit` is called from the I/O thread; attempts
    finish in the executor's threads; every follow-up (a resend after a
    miss, a retry after a crash) runs on one helper thread of its own.
    """

    def __init__(
        self,
        executor: Executor,
        server: Handler,
        *,
        token: str,
        owned: bool,
        make_executor: Callable[[], Executor] | None,
    ) -> None:
        self._executor = executor
        self._owns_executor = owned
        self._server = server
        self._token = token
        self._make_executor = make_executor
        self._lock = threading.Lock()
        self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mpreqrep-retry")
        self._closed = False
        self._suspects: collections.deque[_Call] = collections.deque()
        self._quarantined: _Call | None = None
        self._copies: dict[int, int] = {}  # pid -> copies that worker reported
        self._replacements = 0
        self._retries = 0

    def submit(self, request: str) -> Future[str]:
        """Send the request with the server's token; the future is the reply's."""
        call = _Call(request, Future())
        call.reply.add_done_callback(partial(_cancel_attempt, call.current))
        self._send(call)
        return call.reply

    def shutdown(self) -> None:
        """Stop the helper thread and the executor if the server built it."""
        self._closed = True
        self._helper.shutdown(wait=True)
        if self._owns_executor:
            self._executor.shutdown(wait=False)

    def stats(self) -> dict[str, Any]:
        """The executor in use, server copies (by worker pid), pools replaced, retries."""
        kind = type(self._executor)
        per_worker = dict(self._copies)
        return {
            "executor": f"{kind.__module__}.{kind.__qualname__}",
            "server_copies_sent": sum(per_worker.values()),
            "server_copies_per_worker": per_worker,
            "executor_replacements": self._replacements,
            "crash_retries": self._retries,
        }

    # -- sending ----------------------------------------------------------------------

    def _send(self, call: _Call) -> None:
        """Submit one attempt, on a replacement if the executor turns out broken."""
        executor = self._executor
        try:
            attempt = self._submit_call(executor, call)
        except BrokenExecutor:
            executor = self._replace_broken(executor)
            attempt = self._submit_call(executor, call)
        call.current.future = attempt
        if call.reply.cancelled():
            attempt.cancel()
        attempt.add_done_callback(partial(self._on_attempt_done, call, executor))

    def _submit_call(self, executor: Executor, call: _Call) -> Future[Any]:
        """Submit :func:`~mpreqrep._remote_worker.run_cached` (Dask overrides this)."""
        server = self._server if call.send_server else None
        return executor.submit(run_cached, self._token, server, call.request)

    def _reply_text(self, result: WorkerReply) -> str:
        """Note the copies the replying worker holds; the reply (Dask overrides this)."""
        self._copies[result.pid] = result.copies
        return result.text

    def _on_attempt_done(self, call: _Call, executor: Executor, attempt: Future[Any]) -> None:
        """Settle the reply, or hand a miss or a crash to the helper thread."""
        if call.current.future is attempt:  # done: nothing left to cancel, no cycle left
            call.current.future = None
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
            self._settle(call, reply=self._reply_text(attempt.result()))

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
            call.send_server = False  # a new pool's workers hold copies, or ask
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
            BrokenExecutor: the executor was passed as it is, or building
                its replacement failed.
        """
        with self._lock:
            if broken is self._executor:
                self._executor = self._build_replacement(broken)
                if self._owns_executor:
                    broken.shutdown(wait=False)
                self._owns_executor = True
                self._replacements += 1
            return self._executor

    def _build_replacement(self, broken: Executor) -> Executor:
        """A new executor from the user's factory, or ``BrokenExecutor`` if none can be built."""
        kind = type(broken).__qualname__
        if self._make_executor is None:
            raise BrokenExecutor(
                f"the {kind} is broken and mpreqrep cannot replace it: pass a factory"
                " as executor= (e.g. functools.partial(ProcessPoolExecutor, 4))"
            )
        logger.warning("a worker died and broke the %s; replacing it with a new one", kind)
        try:
            return self._make_executor()
        except Exception as exc:
            logger.exception("could not replace the broken %s", kind)
            raise BrokenExecutor(f"the {kind} is broken and its replacement failed") from exc


def _cancel_attempt(current: _Attempt, reply: Future[str]) -> None:
    """Pass the I/O loop's cancellation (a request timeout) on to the attempt."""
    attempt = current.future
    if reply.cancelled() and attempt is not None:
        attempt.cancel()
