"""Handlers that wait on I/O: why async mode (``--async``) helps.

The handler sleeps, standing in for a database query or an HTTP call. Waiting
uses no CPU and releases the GIL, so in async thread mode requests overlap:
ten requests of 0.1 s are all answered after about 0.1 s, where sync mode,
which runs handlers one after another, needs a whole second::

    mpreqrep serve workers.slow_io:SlowIOServer --async --address localhost:0
    mpreqrep request localhost:PORT 0.25    # prints, after 0.25 s: slept 0.25

Process workers would overlap them too, but a thread costs far less than a
process: use ``--async`` for handlers that wait, ``--workers`` for handlers
that compute.

Request: a delay in seconds such as ``"0.25\\r\\n"``, or an empty line for
:data:`DEFAULT_DELAY_S`. Reply: ``"slept 0.25\\r\\n"``. Anything else, or a
delay outside ``0..MAX_DELAY_S``, raises :class:`ValueError`: the server logs
it and closes that connection without a reply.
"""

from __future__ import annotations

import math
import time

from mpreqrep import RequestServer

DEFAULT_DELAY_S = 0.1
MAX_DELAY_S = 10.0


def parse_delay(request: str) -> float:
    """Read the delay in seconds from a request.

    Args:
        request: a number of seconds, or blank for :data:`DEFAULT_DELAY_S`.

    Returns:
        The delay.

    Raises:
        ValueError: not a number, or outside ``0..MAX_DELAY_S``.
    """
    text = request.strip()
    if not text:
        return DEFAULT_DELAY_S
    try:
        delay = float(text)
    except ValueError:
        raise ValueError(f"expected a delay in seconds, got {text[:40]!r}") from None
    if not (math.isfinite(delay) and 0 <= delay <= MAX_DELAY_S):
        raise ValueError(f"the delay must be from 0 to {MAX_DELAY_S} s, got {text[:40]!r}")
    return delay


class SlowIOServer(RequestServer):
    """Waits for the requested time, as if for I/O, then says how long it slept."""

    def handle_request(self, request: str) -> str:
        """Sleep for the requested delay.

        Args:
            request: seconds to wait, e.g. ``"0.25\\r\\n"``; blank for the default.

        Returns:
            ``"slept <delay>"``, the delay as the client wrote it.

        Raises:
            ValueError: the request is not a delay from 0 to ``MAX_DELAY_S``.
        """
        delay = parse_delay(request)
        time.sleep(delay)
        return f"slept {request.strip() or DEFAULT_DELAY_S}"
