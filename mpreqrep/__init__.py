"""mpreqrep: yoton's request-reply over TCP, with handlers on every core.

Public API: :func:`do_request`, :class:`RequestServer`, :func:`split_address`,
:func:`port_hash`, :class:`NoServerError`, :class:`ReplyTooLargeError`,
:func:`do_request_async` for asyncio programs and :func:`dask_executor` to run
handlers on a Dask cluster, :class:`ServerCollector` for Prometheus metrics
(``mpreqrep[metrics]``).

``import mpreqrep`` loads only the client (socket, time): the server, the
asyncio client and the Dask helper are imported when first used (module
``__getattr__``, PEP 562), so that a client-only program such as pyzo's
second-instance hand-over pays no more than ``import yoton`` (see README,
"Coming from yoton"). Process mode's loky and psutil load only with a
``workers=`` server.
"""

from __future__ import annotations

from ._address import port_hash, split_address
from ._client import do_request
from ._errors import NoServerError, ReplyTooLargeError

TYPE_CHECKING = False  # typing itself is not imported at run time
if TYPE_CHECKING:
    from ._aclient import do_request_async
    from ._dask import dask_executor
    from ._metrics import ServerCollector
    from ._server import RequestServer
del TYPE_CHECKING

__version__ = "0.1.0"

__all__ = [
    "NoServerError",
    "ReplyTooLargeError",
    "RequestServer",
    "ServerCollector",
    "__version__",
    "dask_executor",
    "do_request",
    "do_request_async",
    "port_hash",
    "split_address",
]

_LAZY = {
    "RequestServer": "._server",
    "do_request_async": "._aclient",
    "dask_executor": "._dask",
    "ServerCollector": "._metrics",
}


def __getattr__(name: str) -> object:
    """Import a lazily loaded public name on first use, then keep it here."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, the lazily loaded ones included."""
    return sorted(set(globals()) | set(__all__))
