"""The I/O thread's counters: the cumulative latency histogram behind the metrics."""

from __future__ import annotations

import math

from mpreqrep._stats import LATENCY_BUCKETS_S, ServerStats


def test_histogram_is_cumulative_with_inclusive_upper_bounds() -> None:
    stats = ServerStats()
    for latency_s in (0.0005, 0.001, 0.003, 20.0):
        stats.record_served(latency_s)
    histogram = dict(stats.histogram())
    assert list(histogram) == [*LATENCY_BUCKETS_S, math.inf]
    assert histogram[0.001] == 2  # 0.001 falls in the bucket "le 0.001"
    assert histogram[0.0025] == 2
    assert histogram[0.005] == 3
    assert histogram[10.0] == 3
    assert histogram[math.inf] == stats.served == 4
    snapshot = stats.snapshot(in_flight=0, queued=0, reading=0)
    assert math.isclose(snapshot["latency_sum_s"], 20.0045)
    assert snapshot["latency_histogram"] == stats.histogram()


def test_an_idle_server_has_an_empty_histogram() -> None:
    assert {count for _, count in ServerStats().histogram()} == {0}
