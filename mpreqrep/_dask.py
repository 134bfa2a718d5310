"""Dask: the dispatcher that runs requests as tasks on a cluster's workers.

Owns the client side of Dask delivery (registering the server's plugin,
counting the copies the workers report, unregistering it at shutdown),
submitting requests as impure tasks through a client, failing fast when the
scheduler is gone, and :func:`dask_executor`. The worker side is
:mod:`mpreqrep._dask_worker`. Imports ``distributed`` only inside functions,
so ``import mpreqrep`` stays light.

The client. A :class:`DaskExecutor` exposes its client. Dask's own
``ClientExecutor`` (``Client.get_executor()``) does not, publicly: the
dispatcher then asks one of its workers for the scheduler's address (a task
submitted through that executor) and opens a client of its own there, closed
with the server. Requests never go through a ``ClientExecutor``: its future
stays pending for ever when fetching a finished result fails (see
:func:`_submit_to_dask`), and options given to ``get_executor()`` cannot be
read back, so they do not apply (``dask_executor`` or a factory returning
one serves a cluster with mpreqrep's own options).
"""

from __future__ import annotations

import collections
import gc
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

from ._dispatch import Handler
from ._remote import RemoteDispatcher
from ._threads import DaemonThreadExecutor

logger = logging.getLogger("mpreqrep")

DASK_CONNECT_TIMEOUT_S = 30.0
SUBSCRIPTION_POLL_S = 0.05
FETCH_THREADS = 8
"""Threads that fetch finished tasks' results, off Dask's single callback thread."""


class DaskDispatcher(RemoteDispatcher):
    """Runs requests on a Dask cluster; each worker holds one copy of the server.

    The copy arrives through a worker plugin (see :mod:`mpreqrep._dask_worker`):
    registered in :meth:`start`, on every worker connected then and on each
    that joins or restarts later; unregistered in :meth:`shutdown`. Every
    request is submitted with ``pure=False``, so identical requests each run
    (Dask would merge pure ones). While the client has no scheduler,
    submitting raises at once instead of queueing the request until the
    scheduler is back. A request that fails with ``KilledWorker`` (workers
    died while it was assigned to them) is retried once, alone, as a crash in
    a process pool is. Requests go through the client, not through Dask's
    executor (see :func:`_submit_to_dask`).

    Args:
        executor: a :class:`DaskExecutor` or Dask's ``ClientExecutor``.
        server: the server object whose copies the workers run.
        token: names this served run (the plugin and its event topic).
        owned: shut ``executor`` down with the server (one it built).

    Thread safety: the copy counts are written on the client's event loop
    and read by :meth:`stats` from any thread, under a lock.
    """

    def __init__(self, executor: Executor, server: Handler, *, token: str, owned: bool) -> None:
        from distributed import KilledWorker

        super().__init__(executor, server, token=token, owned=owned, make_executor=None)
        self._client: Any = None
        self._owns_client = False
        self._killed_worker: type[Exception] = KilledWorker
        self._plugin_name = f"mpreqrep-server-{token}"
        self._copies_by_id: dict[str, str] = {}  # copy id -> worker address
        self._copies_lock = threading.Lock()
        self._subscribed = threading.Event()
        self._fetcher = DaemonThreadExecutor(FETCH_THREADS, thread_name_prefix="mpreqrep-fetch")

    def start(self) -> None:
        """Connect, and put a copy of the server on every worker, now and on joining.

        Raises:
            OSError: no scheduler answered (a ``ClientExecutor``'s).
            Exception: a worker could not set the copy up (e.g. it cannot
                import the server's class); the plugin is withdrawn again.
        """
        from ._dask_worker import ServerPlugin

        self._client = self._connect()
        topic = self._plugin_name
        try:
            self._subscribe()
            self._client.register_plugin(ServerPlugin(self._server, topic), name=topic)
        except BaseException:
            self._withdraw_plugin()
            self._close_own_client()
            raise

    def _subscribe(self) -> None:
        """Subscribe to the copies' topic, and wait until the subscription holds.

        The subscription travels on the client's batched stream, which an
        event the workers log may overtake; one logged before the scheduler
        knows the subscription is never forwarded. So the dispatcher logs a
        marker of its own on the topic until it comes back.

        Raises:
            TimeoutError: no marker came back within ``DASK_CONNECT_TIMEOUT_S``.
        """
        self._client.subscribe_topic(self._plugin_name, self._count_copy)
        deadline = time.monotonic() + DASK_CONNECT_TIMEOUT_S
        while not self._subscribed.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError("the Dask scheduler did not confirm the subscription")
            self._client.log_event(self._plugin_name, {"subscribed": True})
            self._subscribed.wait(SUBSCRIPTION_POLL_S)

    def _connect(self) -> Any:
        """The executor's client, or one of our own to its scheduler."""
        if isinstance(self._executor, DaskExecutor):
            return self._executor.client
        from ._dask_worker import scheduler_address

        address = self._executor.submit(scheduler_address).result(DASK_CONNECT_TIMEOUT_S)
        self._owns_client = True
        return _open_client(address, DASK_CONNECT_TIMEOUT_S)

    def shutdown(self) -> None:
        """Withdraw the server from the workers, then close what the server opened."""
        self._withdraw_plugin()
        super().shutdown()
        self._close_own_client()
        self._fetcher.shutdown(wait=False)

    def _close_own_client(self) -> None:
        """Close the client the dispatcher opened itself, if it did."""
        if self._owns_client:
            self._client.close()

    def stats(self) -> dict[str, Any]:
        """Those of :class:`RemoteDispatcher`, with the copies each worker reported."""
        with self._copies_lock:
            per_worker = collections.Counter(self._copies_by_id.values())
        return {
            **super().stats(),
            "server_copies_sent": sum(per_worker.values()),
            "server_copies_per_worker": dict(per_worker),
        }

    def _count_copy(self, event: tuple[float, dict[str, Any]]) -> None:
        """Record one worker's report of its copy, or our marker (on the client's loop)."""
        _, copy = event
        if "copy" not in copy:
            self._subscribed.set()
            return
        with self._copies_lock:
            self._copies_by_id[copy["copy"]] = copy["worker"]

    def _withdraw_plugin(self) -> None:
        """Unregister the plugin and the topic, unless the scheduler is gone."""
        if self._client.status != "running":
            logger.info("no Dask scheduler: the server's copies go with its workers")
            return
        try:
            self._client.unsubscribe_topic(self._plugin_name)
            self._client.unregister_worker_plugin(self._plugin_name)
        except Exception:
            logger.warning("could not withdraw the server from the Dask workers", exc_info=True)

    def _is_worker_death(self, error: BaseException) -> bool:
        """``KilledWorker``: Dask gave up after workers died running the request."""
        return isinstance(error, self._killed_worker)

    def _submit_call(self, executor: Executor, call: Any) -> Future[Any]:
        """Submit as an impure task, or raise if the scheduler is unreachable."""
        from ._dask_worker import run_on_worker

        status = self._client.status
        if status != "running":
            raise ConnectionError(f"the Dask client is {status!r}: no scheduler to submit to")
        task = (run_on_worker, self._plugin_name, call.request)
        return _submit_to_dask(self._client, task, {"pure": False}, self._fetcher)

    def _reply_text(self, result: Any) -> str:
        """The task's result is the reply itself (copies are counted from events)."""
        text: str = result
        return text


def _submit_to_dask(
    client: Any, call: tuple[Any, ...], options: dict[str, Any], fetcher: Executor
) -> Future[Any]:
    """``client.submit(*call, **options)`` as a concurrent future, cancellable both ways.

    Not through Dask's ``ClientExecutor``: its future stays pending for ever
    when fetching a finished result fails (the worker holding it died and the
    recomputation was killed too; distributed 2026.8 raises ``KilledWorker``
    there instead of passing it on). Here any error fails the future.

    The result is fetched on ``fetcher``, not in the done callback: Dask runs
    every future's callbacks on one thread, and fetching from a worker that
    just died can block it for the 30 s of a connection timeout, holding up
    every other request's outcome (a crash's retry started 30 s late).
    """
    task = client.submit(*call, **options)
    attempt: Future[Any] = Future()

    def cancel_task(done: Future[Any]) -> None:
        if done.cancelled() and client.status == "running":  # a closed client raises
            task.cancel()

    def fetch(finished: Any) -> None:  # on a fetcher thread
        if not attempt.set_running_or_notify_cancel():
            return  # cancelled meanwhile
        try:
            attempt.set_result(finished.result())
        except BaseException as exc:
            attempt.set_exception(exc)

    def settle(finished: Any) -> None:  # on Dask's callback thread
        if finished.status == "cancelled":  # e.g. the scheduler went away
            attempt.cancel()
            return
        fetcher.submit(fetch, finished)

    attempt.add_done_callback(cancel_task)
    task.add_done_callback(settle)
    return attempt


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
        context manager, or call ``shutdown()``, to close its client. (Pass
        ``functools.partial(dask_executor, address)`` instead to have the
        server connect at start and close it at stop.)

    Raises:
        ImportError: ``distributed`` is not installed.
        OSError: no scheduler answered within ``connect_timeout_s``.
    """
    try:
        import distributed  # noqa: F401 - only to tell a missing extra apart
    except ImportError as exc:
        raise ImportError("Dask support needs the extra: pip install 'mpreqrep[dask]'") from exc
    return DaskExecutor(_open_client(scheduler_address, connect_timeout_s))


def _open_client(address: str, timeout_s: float) -> Any:
    """A ``distributed.Client`` of mpreqrep's own (never the process's default one).

    A ``Client`` that fails to connect is left in a reference cycle (through its
    error's traceback), and its ``__del__`` closes it by waiting on its event
    loop: met by the collector only as the interpreter exits, that wait never
    ends, and the process hangs after reporting the error. So the error is raised
    afresh, without the chain, once the failed client was collected here.

    Raises:
        OSError: no scheduler answered within ``timeout_s``.
        ValueError: a malformed address (an unknown scheme, say).
    """
    from distributed import Client

    error: Exception
    try:
        return Client(address, timeout=timeout_s, set_as_default=False)  # type: ignore[no-untyped-call]
    except OSError as exc:
        error = OSError(str(exc))
    except ValueError as exc:
        error = ValueError(str(exc))
    gc.collect()  # the failed client, while its event loop still runs
    raise error
