"""What runs on Dask workers: the plugin that carries the server, and the task.

Imports ``distributed`` at module level, so only :mod:`mpreqrep._dask` (once a
Dask executor is in use) and the workers themselves import it. Knows nothing
of sockets, the server class or the dispatcher's retries.

The server reaches each worker once, through Dask's own mechanism for "this
object on every worker": a :class:`ServerPlugin` registered with
``Client.register_plugin``. The scheduler keeps the pickled plugin and hands
it to every worker that is connected then, and to every worker that registers
later (a new one, or one its nanny restarted) before that worker is given any
task. Each worker unpickles it, so holds one copy of the server, and logs an
event that the dispatcher counts per worker. A request is then a task that
carries only the plugin's name and the request text::

    dispatcher ──register_plugin(ServerPlugin)──▶ scheduler ──plugin──▶ each worker, once
        │                                                       (now and on joining)
        └──submit(run_on_worker, name, text)──▶ scheduler ──▶ any worker: its copy handles it
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from ._dispatch import Handler, run_handler


class ServerPlugin(WorkerPlugin):
    """Carries one copy of the server to each Dask worker.

    Args:
        server: the server object; pickled once by the client, unpickled
            once by each worker.
        topic: the event topic on which each worker reports its copy.
    """

    def __init__(self, server: Handler, topic: str) -> None:
        self.server = server
        self.topic = topic

    def setup(self, worker: Any) -> None:
        """Report this worker's copy: ``{"worker", "pid", "copy"}`` on the topic."""
        copy = {"worker": worker.address, "pid": os.getpid(), "copy": uuid.uuid4().hex}
        worker.log_event(self.topic, copy)


def run_on_worker(name: str, request: str) -> str:
    """Handle a request with the server of this worker's plugin ``name``.

    Module-level, so Dask pickles it by reference; runs on a worker.

    Raises:
        LookupError: this worker has no such plugin (the server stopped).
        Exception: whatever :func:`~mpreqrep._dispatch.run_handler` raises.
    """
    plugin = get_worker().plugins.get(name)
    if not isinstance(plugin, ServerPlugin):
        raise LookupError(f"this Dask worker holds no server under {name!r}")
    return run_handler(plugin.server, request)


def scheduler_address() -> str:
    """The address of this worker's scheduler; a task, run through a ``ClientExecutor``."""
    address: str = get_worker().scheduler.address
    return address
