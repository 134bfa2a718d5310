"""The errors of process mode, as a client's future or ``start()`` sees them.

Knows nothing of processes or sockets.
"""

from __future__ import annotations

from .._errors import RequestTimeoutError


class PoolStartError(RuntimeError):
    """The worker processes could not be started with a copy of the handler.

    Its message is one line; the handler's own traceback, if any, was logged.
    """


class PoolFailedError(RuntimeError):
    """The process pool cannot continue: its supervision ended or kept failing.

    Every request it held fails, the server stops by itself and reports this
    error as :attr:`~mpreqrep.RequestServer.failure`; ``__cause__`` is the error
    that ended supervision.
    """


class WorkerCrashError(RuntimeError):
    """The worker process running the request died (or was killed) meanwhile."""


class WorkerStartError(RuntimeError):
    """No worker could take the request: every worker is gone and starting one failed."""


class HandlerTimeoutError(RequestTimeoutError):
    """The handler ran past ``request_timeout_s``; its worker was killed."""


class RemoteTraceback(Exception):
    """The traceback, as text, of an error raised in a worker process."""
