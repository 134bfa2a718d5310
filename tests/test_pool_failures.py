"""Supervision's own errors, sans I/O: survived with a pause, fatal after a streak."""

from __future__ import annotations

import pytest

from mpreqrep._pool._errors import PoolFailedError
from mpreqrep._pool._failures import (
    ERROR_PAUSE_S,
    FAILING_PASSES_LIMIT_S,
    PassFailures,
    as_failure,
)


def test_a_failed_pass_is_logged_and_owes_a_pause(caplog: pytest.LogCaptureFixture) -> None:
    failures = PassFailures()
    assert failures.pause_s(0.0) is None
    failures.failed(KeyError("bug"), 10.0)
    assert "supervision failed; it goes on" in caplog.text
    assert failures.pause_s(10.0 + ERROR_PAUSE_S / 2) == ERROR_PAUSE_S
    assert failures.pause_s(10.0 + 2 * ERROR_PAUSE_S) is None


def test_only_an_unbroken_streak_of_failures_is_fatal() -> None:
    failures = PassFailures()
    failures.failed(OSError("EINVAL"), 0.0)
    failures.succeeded(callback_failed=False, now=FAILING_PASSES_LIMIT_S - 1)
    failures.failed(OSError("EINVAL"), FAILING_PASSES_LIMIT_S + 1)  # a new streak
    with pytest.raises(PoolFailedError, match="every pass") as raised:
        failures.failed(OSError("EINVAL"), 2 * FAILING_PASSES_LIMIT_S + 1)
    assert isinstance(raised.value.__cause__, OSError)


def test_a_failed_callback_owes_a_pause_but_is_no_failed_pass() -> None:
    failures = PassFailures()
    failures.succeeded(callback_failed=True, now=5.0)
    assert failures.pause_s(5.0) == ERROR_PAUSE_S
    failures.failed(KeyError("bug"), 5.0 + FAILING_PASSES_LIMIT_S)  # not fatal: first one


def test_as_failure_wraps_anything_but_a_pool_failure() -> None:
    exit_ = SystemExit(3)
    wrapped = as_failure(exit_)
    assert isinstance(wrapped, PoolFailedError) and wrapped.__cause__ is exit_
    assert str(wrapped) == "SystemExit: 3"
    assert as_failure(wrapped) is wrapped
