"""What runs in a process pool's workers: each process's servers, by token.

Stdlib only, so any pool can pickle these functions by reference and run
them; knows nothing of the dispatcher, sockets or the server class.

A worker process keeps the servers of its last :data:`MAX_CACHED_SERVERS`
tokens (a token names one served run of one server). A server gets there in
one of two ways: the pool's initializer, :func:`install_server`, ran it in
as the process started (pools the server builds from a factory); or a
request that found none answered :class:`CacheMiss`, and was sent again with
the server (pools passed as they are). Every reply says which process made
it and how many copies of its server that process has received, so the
dispatcher can count copies per worker from what the workers say::

    pool start ──initializer: install_server(token, server)──▶ each worker, once
    request ──run_cached(token, None, text)──▶ a worker ──▶ WorkerReply(pid, copies, reply)
                                                       └──▶ CacheMiss: sent again with the server
"""

from __future__ import annotations

import collections
import os
import pickle
import threading
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

from ._dispatch import Handler, run_handler

MAX_CACHED_SERVERS = 4


class CacheMiss:
    """What :func:`run_cached` returns when its process lacks the server."""

    __slots__ = ()


class UnpicklableHandlerError(Exception):
    """Stands in for a handler's exception that cannot travel back to the server.

    A pool pickles what a call raised in the worker and unpickles it in the
    server. One that cannot be unpickled (its ``__init__`` takes other
    arguments than its ``args``, and unpickling calls it) broke a loky or
    stdlib pool for every request after it; one that cannot be pickled (an
    attribute such as a lock) lost its traceback. This carries its type,
    message and traceback as text instead.
    """


class WorkerReply(NamedTuple):
    """A reply, with the process that made it and the copies that process holds."""

    pid: int
    copies: int
    text: str


_cached_servers: collections.OrderedDict[str, Handler] = collections.OrderedDict()
_copies_received: collections.Counter[str] = collections.Counter()
_cache_lock = threading.Lock()


def install_server(
    token: str,
    server: Handler,
    then: Callable[..., object] | None = None,
    then_args: tuple[Any, ...] = (),
) -> None:
    """Keep ``server`` in this process under ``token``: a pool's initializer.

    Args:
        token: names one served run of one server.
        server: this process's copy, unpickled from the initializer's arguments.
        then: the user's own initializer, called next with ``then_args``.
    """
    with _cache_lock:
        _store(token, server)
    if then is not None:
        then(*then_args)


def run_cached(token: str, server: Handler | None, request: str) -> WorkerReply | CacheMiss:
    """Handle a request with this process's copy of the server named by ``token``.

    Args:
        token: names one served run of one server.
        server: the server, sent only after this process answered a miss;
            it is then kept under ``token``.
        request: the request text.

    Returns:
        The reply, or a :class:`CacheMiss` if ``server`` is ``None`` and this
        process holds no copy under ``token``.

    Raises:
        BaseException: whatever :func:`~mpreqrep._dispatch.run_handler` raises,
            or :class:`UnpicklableHandlerError` in its place if that cannot be
            pickled and unpickled.
    """
    with _cache_lock:
        if server is None:
            server = _cached_servers.get(token)
            if server is None:
                return CacheMiss()
            _cached_servers.move_to_end(token)
        else:
            _store(token, server)
        copies = _copies_received[token]
    try:
        reply = run_handler(server, request)
    except BaseException as exc:
        if _survives_pickling(exc):
            raise
        raise UnpicklableHandlerError(_describe(exc)) from None
    return WorkerReply(os.getpid(), copies, reply)


def _survives_pickling(exc: BaseException) -> bool:
    """Whether ``exc`` can be pickled and unpickled again, as a pool will do."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return False
    return True


def _describe(exc: BaseException) -> str:
    """``exc`` as text: what it is, why it cannot travel, and its traceback."""
    kind = type(exc)
    lines = traceback.format_exception(exc)
    return (
        f"handle_request raised {kind.__module__}.{kind.__qualname__}, which cannot be"
        f" pickled back to the server; its traceback in the worker:\n{''.join(lines)}"
    )


def _store(token: str, server: Handler) -> None:
    """Keep a copy received under ``token``, forgetting the oldest tokens (lock held)."""
    _cached_servers[token] = server
    _cached_servers.move_to_end(token)
    _copies_received[token] += 1
    while len(_cached_servers) > MAX_CACHED_SERVERS:
        forgotten, _ = _cached_servers.popitem(last=False)
        del _copies_received[forgotten]
