"""mpreqrep: yoton's request-reply over TCP, with handlers on every core.

Public API: :func:`do_request`, :class:`RequestServer`, :func:`split_address`,
:func:`port_hash`, :class:`NoServerError`,
:func:`do_request_async` for asyncio programs and :func:`dask_executor` to run
handlers on a Dask cluster.
"""

from __future__ import annotations

from ._aclient import do_request_async
from ._address import port_hash, split_address
from ._client import do_request
from ._errors import NoServerError
from ._remote import dask_executor
from ._server import RequestServer

__version__ = "0.1.0"

__all__ = [
    "NoServerError",
    "RequestServer",
    "__version__",
    "dask_executor",
    "do_request",
    "do_request_async",
    "port_hash",
    "split_address",
]
