"""Dask: the dispatcher that runs requests as tasks on a cluster's workers.

Owns the client side of Dask delivery (registering the server's plugin,
counting the copies the workers report, unregistering it at shutdown),
submitting requests as impure tasks through the client, and failing fast
when the scheduler is gone. The worker side is :mod:`mpreqrep._dask_worker`.
Imports ``distributed`` only inside functions: this module is imported only
once a Dask executor is in use, but stays cheap to import even then.
"""

from __future__ import annotations

import collections
import logging
import threading
import uuid
from concurrent.futures import Executor, Future
from typing import Any

from ._dispatch import Handler
from ._remote import RemoteDispatcher

logger = logging.getLogger("mpreqrep")


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
        executor: a Dask ``ClientExecutor`` or a :class:`~mpreqrep._remote.DaskExecutor`.
        server: the server object whose copies the workers run.
        client: the ``distributed.Client`` behind ``executor``.

    Thread safety: the copy counts are written on the client's event loop
    and read by :meth:`stats` from any thread, under a lock.
    """

    def __init__(self, executor: Executor, server: Handler, *, client: Any) -> None:
        from distributed import KilledWorker

        super().__init__(executor, server, replace=None)
        self._client = client
        self._killed_worker: type[Exception] = KilledWorker
        self._plugin_name = f"mpreqrep-server-{uuid.uuid4().hex}"
        self._copies: dict[str, str] = {}  # copy id -> worker address
        self._copies_lock = threading.Lock()

    def start(self) -> None:
        """Put a copy of the server on every worker, now and on each joining later.

        Raises:
            Exception: a worker could not set the copy up (e.g. it cannot
                import the server's class); the plugin is withdrawn again.
        """
        from ._dask_worker import ServerPlugin

        topic = self._plugin_name
        self._client.subscribe_topic(topic, self._count_copy)
        try:
            self._client.register_plugin(ServerPlugin(self._server, topic), name=topic)
        except BaseException:
            self._withdraw_plugin()
            raise
        for event in self._client.get_events(topic):  # those logged before subscribing
            self._count_copy(event)

    def shutdown(self) -> None:
        """Withdraw the server from the workers; the client stays the user's."""
        super().shutdown()
        self._withdraw_plugin()

    def stats(self) -> dict[str, Any]:
        """Those of :class:`RemoteDispatcher`, with the copies each worker reported."""
        with self._copies_lock:
            per_worker = collections.Counter(self._copies.values())
        return {
            **super().stats(),
            "server_copies_sent": sum(per_worker.values()),
            "server_copies_per_worker": dict(per_worker),
        }

    def _count_copy(self, event: tuple[float, dict[str, Any]]) -> None:
        """Record one worker's report of its copy (on the client's event loop)."""
        _, copy = event
        with self._copies_lock:
            self._copies[copy["copy"]] = copy["worker"]

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

    def _submit_call(
        self, executor: Executor, token: str, server: Handler | None, request: str
    ) -> Future[Any]:
        """Submit as an impure task, or raise if the scheduler is unreachable."""
        from ._dask_worker import run_on_worker

        status = self._client.status
        if status != "running":
            raise ConnectionError(f"the Dask client is {status!r}: no scheduler to submit to")
        inner = getattr(executor, "_executor", executor)  # a DaskExecutor's ClientExecutor
        options = {**getattr(inner, "_kwargs", {}), "pure": False}  # get_executor(**options)
        return _submit_to_dask(self._client, (run_on_worker, self._plugin_name, request), options)


def _submit_to_dask(client: Any, call: tuple[Any, ...], options: dict[str, Any]) -> Future[Any]:
    """``client.submit(*call, **options)`` as a concurrent future, cancellable both ways.

    Not through Dask's ``ClientExecutor``: its future stays pending for ever
    when fetching a finished result fails (the worker holding it died and the
    recomputation was killed too; distributed 2026.8 raises ``KilledWorker``
    there instead of passing it on). Here any error fails the future.
    """
    task = client.submit(*call, **options)
    attempt: Future[Any] = Future()

    def cancel_task(done: Future[Any]) -> None:
        if done.cancelled():
            task.cancel()

    def settle(finished: Any) -> None:  # on a thread of the Dask client
        if finished.status == "cancelled":  # e.g. the scheduler went away
            attempt.cancel()
            return
        if not attempt.set_running_or_notify_cancel():
            return  # cancelled meanwhile
        try:
            attempt.set_result(finished.result())
        except BaseException as exc:
            attempt.set_exception(exc)

    attempt.add_done_callback(cancel_task)
    task.add_done_callback(settle)
    return attempt
