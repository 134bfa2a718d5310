"""Counters and latency figures of one server, kept by its I/O thread.

Only the I/O thread writes; :meth:`ServerStats.snapshot` may be read from any
thread (it copies, and a figure one request stale is fine).
"""

from __future__ import annotations

from collections import deque

TYPE_CHECKING = False  # typing is not imported at run time (import cost, see README)
if TYPE_CHECKING:
    from typing import Any

LATENCY_WINDOW = 10_000


class ServerStats:
    """What happened to the requests a server accepted."""

    __slots__ = ("_latencies_s", "dropped", "failed", "served", "timed_out")

    def __init__(self) -> None:
        self.served = 0
        self.failed = 0
        self.timed_out = 0
        self.dropped = 0
        self._latencies_s: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def record_served(self, latency_s: float) -> None:
        """Count a reply written, ``latency_s`` after its connection was accepted."""
        self.served += 1
        self._latencies_s.append(latency_s)

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
        }


def _percentile(sorted_values: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile of sorted values, ``None`` if there are none."""
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]
