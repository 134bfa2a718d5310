"""When a pool tries to start workers again after failures (sans I/O)."""

from __future__ import annotations

from mpreqrep._pool._backoff import FIRST_DELAY_S, MAX_DELAY_S, StartBackoff


def test_without_failures_every_missing_worker_starts_at_once() -> None:
    backoff = StartBackoff()
    assert backoff.allowed(3, 0, 0.0) == 3
    assert backoff.wait_s(0.0) is None


def test_failures_double_the_wait_up_to_the_cap_one_start_at_a_time() -> None:
    backoff = StartBackoff()
    delays = [backoff.failed(0.0) for _ in range(10)]
    assert delays[:3] == [FIRST_DELAY_S, 2 * FIRST_DELAY_S, 4 * FIRST_DELAY_S]
    assert max(delays) == MAX_DELAY_S == delays[-1]
    assert backoff.allowed(3, 0, MAX_DELAY_S - 0.01) == 0
    assert backoff.wait_s(1.0) == MAX_DELAY_S - 1.0
    assert backoff.allowed(3, 0, MAX_DELAY_S) == 1
    assert backoff.allowed(3, 1, MAX_DELAY_S) == 0  # one probe at a time


def test_a_success_ends_the_back_off() -> None:
    backoff = StartBackoff()
    backoff.failed(0.0)
    backoff.succeeded()
    assert backoff.allowed(2, 1, 0.0) == 2
    assert backoff.failures == 0
