"""CPU-bound work in pure Python: count the primes up to a limit.

Demonstrates what process mode is for. Trial division holds the GIL for the
whole request, so in thread mode requests run one at a time however many
threads there are; with ``--workers N`` they run on N cores at once::

    mpreqrep serve workers.primes:PrimeServer --workers auto --address localhost:0
    mpreqrep request localhost:PORT 20000    # prints: 2262

Request: a limit as decimal text, e.g. ``"20000\\r\\n"``. Reply: how many
primes are at most that limit, e.g. ``"2262\\r\\n"``. A request that is not an
integer from 0 to :data:`MAX_LIMIT` (an empty line included) raises
:class:`ValueError`: the server logs it with its traceback and closes that
connection without a reply, so the client gets ``""``.

:data:`DEFAULT_LIMIT` costs about 10 ms of pure Python per request (measured
on an AMD EPYC core with CPython 3.11); benchmarks use it as a unit of work.
"""

from __future__ import annotations

import math

from mpreqrep import RequestServer

DEFAULT_LIMIT = 20_000
MAX_LIMIT = 1_000_000


def count_primes(limit: int) -> int:
    """Count the primes that are at most ``limit``, slowly on purpose.

    Trial division by odd numbers, in pure Python: the cost grows a little
    faster than ``limit ** 1.5`` and never releases the GIL.

    Args:
        limit: the upper bound, included; below 2 there are no primes.

    Returns:
        The number of primes ``p <= limit``.
    """
    if limit < 2:
        return 0
    return 1 + sum(1 for candidate in range(3, limit + 1, 2) if _is_odd_prime(candidate))


def _is_odd_prime(number: int) -> bool:
    """Whether an odd number of at least 3 has no odd divisor up to its square root."""
    return all(number % divisor for divisor in range(3, math.isqrt(number) + 1, 2))


def parse_limit(request: str) -> int:
    """Read the limit from a request.

    Args:
        request: decimal text, surrounding whitespace and CRLF allowed.

    Returns:
        The limit.

    Raises:
        ValueError: not an integer, or outside ``0..MAX_LIMIT``.
    """
    text = request.strip()
    try:
        limit = int(text)
    except ValueError:
        raise ValueError(
            f"expected an integer limit such as {DEFAULT_LIMIT}, got {text[:40]!r}"
        ) from None
    if not 0 <= limit <= MAX_LIMIT:
        raise ValueError(f"the limit must be from 0 to {MAX_LIMIT}, got {limit}")
    return limit


class PrimeServer(RequestServer):
    """Replies to a limit with the number of primes up to it (CPU-bound)."""

    def handle_request(self, request: str) -> str:
        """Count the primes up to the requested limit.

        Args:
            request: a limit such as ``"20000\\r\\n"``.

        Returns:
            The count as decimal text.

        Raises:
            ValueError: the request is not a limit from 0 to ``MAX_LIMIT``.
        """
        return str(count_primes(parse_limit(request)))
