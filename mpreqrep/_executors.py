"""Which dispatcher serves ``executor=``: an executor as it is, or one built from a factory.

Owns telling executors apart (``isinstance`` against the engines' public
classes, and Dask's only once ``distributed`` is imported: an executor of
its kind cannot exist before) and building a factory's executor so that its
worker processes get the server through their initializer. Knows nothing of
sockets or the server class; imports neither loky nor ``distributed``.

What ``executor=`` may be:

- an ``Executor``: a thread pool runs the server object itself; a Dask
  executor goes to :class:`~mpreqrep._dask.DaskDispatcher`; any other (loky,
  the stdlib process pool) to :class:`~mpreqrep._remote.RemoteDispatcher`,
  whose workers ask for the server on their first request. Never shut down
  by the server, nor replaced when broken.
- a factory: a callable returning an ``Executor``, built at start, shut down
  with the server and called again to replace a broken pool. If it takes
  ``initializer`` and ``initargs`` keywords (the pool classes and
  ``functools.partial`` of them), it is given
  :func:`~mpreqrep._remote_worker.install_server`, so each worker process
  receives the server once, as it starts; an initializer of the user's bound
  in a ``partial`` still runs, after it. Otherwise it is called with no
  arguments.
"""

from __future__ import annotations

import functools
import inspect
import sys
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from ._dask import DaskExecutor
from ._dispatch import Dispatcher, ExecutorDispatcher, Handler
from ._remote import RemoteDispatcher
from ._remote_worker import install_server

ExecutorFactory = Callable[..., Executor]


def executor_dispatcher(executor: Executor | ExecutorFactory, server: Handler) -> Dispatcher:
    """The dispatcher for ``executor=``.

    Args:
        executor: an ``Executor``, used as it is; or a factory of one.
        server: the server object.

    Returns:
        The dispatcher; it owns the executor if it built it.

    Raises:
        TypeError: the factory returned no ``Executor``.
        Exception: whatever the factory raised.
    """
    token = uuid.uuid4().hex
    if isinstance(executor, Executor):
        return _dispatcher_for(executor, server, token=token, make_executor=None)
    make_executor = _bind_initializer(executor, token, server)
    return _dispatcher_for(make_executor(), server, token=token, make_executor=make_executor)


def _dispatcher_for(
    executor: Executor,
    server: Handler,
    *,
    token: str,
    make_executor: Callable[[], Executor] | None,
) -> Dispatcher:
    """The dispatcher for this kind of executor; it owns one made by ``make_executor``."""
    owned = make_executor is not None
    if isinstance(executor, ThreadPoolExecutor):
        return ExecutorDispatcher(executor, server, owned=owned)
    if isinstance(executor, (DaskExecutor, *_dask_executor_classes())):
        from ._dask import DaskDispatcher

        return DaskDispatcher(executor, server, token=token, owned=owned)
    return RemoteDispatcher(executor, server, token=token, owned=owned, make_executor=make_executor)


def _dask_executor_classes() -> tuple[type[Executor], ...]:
    """Dask's own executor class, if ``distributed`` is imported (else none can exist)."""
    if "distributed" not in sys.modules:
        return ()
    from distributed.cfexecutor import ClientExecutor

    return (ClientExecutor,)


def _bind_initializer(
    factory: ExecutorFactory, token: str, server: Handler
) -> Callable[[], Executor]:
    """``factory`` made to install the server in each worker, if it takes an initializer."""
    if not _takes_initializer(factory):
        return _checked(factory)
    bound = factory.keywords if isinstance(factory, functools.partial) else {}
    initargs = (token, server, bound.get("initializer"), tuple(bound.get("initargs", ())))
    return _checked(factory, initializer=install_server, initargs=initargs)


def _takes_initializer(factory: ExecutorFactory) -> bool:
    """Whether ``factory`` accepts ``initializer`` and ``initargs`` keywords."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature to read (some builtins)
        return False
    return {"initializer", "initargs"} <= parameters.keys()


def _checked(factory: ExecutorFactory, **keywords: Any) -> Callable[[], Executor]:
    """``factory(**keywords)`` as a zero-argument callable that checks it made an Executor."""

    def make() -> Executor:
        executor = factory(**keywords)
        if not isinstance(executor, Executor):
            raise TypeError(f"the executor factory returned {executor!r}, not an Executor")
        return executor

    return make
