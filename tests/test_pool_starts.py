"""The boot that start() waits for and the failed starts after it, without processes."""

from __future__ import annotations

import pytest

from mpreqrep._pool._errors import PoolStartError
from mpreqrep._pool._starts import Starts
from mpreqrep._worker import InitFailed


def test_the_boot_ends_once_every_wanted_worker_serves() -> None:
    starts = Starts()
    starts.succeeded(1, 2)
    assert starts.booting
    starts.succeeded(2, 2)
    assert not starts.booting and starts.wait_booted() is None


def test_a_failed_start_while_booting_fails_the_boot_first_reason_wins() -> None:
    starts = Starts()
    assert starts.failed("worker 1 failed to start: ImportError", 0.0)
    starts.fail_boot("later")
    error = starts.wait_booted()
    assert isinstance(error, PoolStartError) and "ImportError" in str(error)


def test_after_the_boot_a_failed_start_backs_off(caplog: pytest.LogCaptureFixture) -> None:
    starts = Starts()
    starts.succeeded(1, 1)
    assert not starts.failed("worker 2 failed to start: ImportError", 10.0)
    assert "trying again in 0.1 s" in caplog.text
    assert starts.backoff.allowed(1, 0, 10.0) == 0
    starts.succeeded(1, 1)
    assert starts.backoff.allowed(1, 0, 10.0) == 1


def test_the_handlers_traceback_is_logged_once_per_streak(
    caplog: pytest.LogCaptureFixture,
) -> None:
    starts = Starts()
    failure = InitFailed(7, "ImportError: no", "Traceback: the details")
    starts.log_init_failure(failure)
    starts.log_init_failure(failure)
    assert caplog.text.count("the details") == 1
    starts.succeeded(1, 1)
    starts.log_init_failure(failure)
    assert caplog.text.count("the details") == 2


def test_ending_releases_a_waiter_with_no_error() -> None:
    starts = Starts()
    starts.end()
    assert starts.wait_booted() is None
