"""Ready-made handler servers: small, documented examples to copy.

Each module defines module-level :class:`mpreqrep.RequestServer` subclasses
(so they pickle for process workers) and uses only the public API. Serve one
from the repository root with, for example::

    mpreqrep serve workers.primes:PrimeServer --workers auto

- :mod:`workers.echo`: the smallest handler; replies with the request.
- :mod:`workers.primes`: CPU-bound pure Python; what process mode is for.
- :mod:`workers.jsonrpc`: structured requests, with errors as replies.
- :mod:`workers.slow_io`: handlers that wait on I/O; what ``--async`` is for.
"""
