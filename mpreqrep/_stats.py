"""Counters and latency figures of one server, kept by its I/O thread.

Only the I/O thread writes; :meth:`ServerStats.snapshot` may be read from any
thread (it copies, and a figure one request stale is fine).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque

TYPE_CHECKING = False  # typing is not imported at run time (import cost, see README)
if TYPE_CHECKING:
    from typing import Any

LATENCY_WINDOW = 10_000

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds of the latency histogram's buckets (the last, implicit one is +Inf)."""


class ServerStats:
    """What happened to the requests a server accepted."""

    __slots__ = (
        "_bucket_counts",
        "_latencies_s",
        "dropped",
        "failed",
        "latency_sum_s",
        "served",
        "timed_out",
    )

    def __init__(self) -> None:
        self.served = 0
        self.failed = 0
        self.timed_out = 0
        self.dropped = 0
        self._latencies_s: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._bucket_counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.latency_sum_s = 0.0

    def record_served(self, latency_s: float) -> None:
        """Count a reply written, ``latency_s`` after its connection was accepted."""
        self.served += 1
        self._latencies_s.append(latency_s)
        self._bucket_counts[bisect_left(LATENCY_BUCKETS_S, latency_s)] += 1
        self.latency_sum_s += latency_s

    def snapshot(self, *, in_flight: int, queued: int, reading: int) -> dict[str, Any]:
        """The figures as a plain dict (latencies over the last replies)."""
        latencies = sorted(self._latencies_s)
        return {
            "served": self.served,
            "failed": self.failed,
            "timed_out": self.timed_out,
            "dropped": self.dropped,
            "in_flight": in_flight,
            "queued": queued,
            "reading": reading,
            "latency_p50_s": _percentile(latencies, 0.50),
            "latency_p99_s": _percentile(latencies, 0.99),
            "latency_histogram": self.histogram(),
            "latency_sum_s": self.latency_sum_s,
        }

    def histogram(self) -> list[tuple[float, int]]:
        """Every reply's latency so far, as ``(upper bound in s, cumulative count)``
        pairs, Prometheus-style: the last bound is ``inf`` and its count is ``served``."""
        pairs: list[tuple[float, int]] = []
        total = 0
        bounds = (*LATENCY_BUCKETS_S, float("inf"))
        for bound, count in zip(bounds, self._bucket_counts, strict=True):
            total += count
            pairs.append((bound, total))
        return pairs


def _percentile(sorted_values: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile of sorted values, ``None`` if there are none."""
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]
