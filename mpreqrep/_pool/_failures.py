"""Supervision's own errors: which ones it survives, and when it must give up.

An unexpected error in a pass of the supervisor is logged and the next pass
runs, at least :data:`ERROR_PAUSE_S` later so a recurring error cannot spin.
Passes that fail every time, none succeeding, for :data:`FAILING_PASSES_LIMIT_S`
mean that supervision has stopped in all but name (a broken selector, a bug):
that, like an exception that escapes the supervisor thread, is a
:class:`~._errors.PoolFailedError`. Sans I/O: the caller passes the time.
"""

from __future__ import annotations

import logging

from ._errors import PoolFailedError

logger = logging.getLogger("mpreqrep")

ERROR_PAUSE_S = 0.1
"""Least wait after an unexpected error in a pass, so a recurring one cannot spin."""

FAILING_PASSES_LIMIT_S = 10.0
"""How long every pass may fail, none succeeding, before supervision counts as broken."""


class PassFailures:
    """The streak of failing passes, and the pause owed after an error."""

    def __init__(self) -> None:
        self._since: float | None = None
        self._error_at: float | None = None

    def failed(self, exc: Exception, now: float) -> None:
        """A pass raised ``exc``: log it, or give up once the streak is too long.

        Raises:
            PoolFailedError: every pass failed for :data:`FAILING_PASSES_LIMIT_S`.
        """
        if self._since is None:
            self._since = now
        if now - self._since >= FAILING_PASSES_LIMIT_S:
            raise PoolFailedError(
                f"process pool supervision failed in every pass for {now - self._since:.1f} s"
            ) from exc
        logger.exception("process pool supervision failed; it goes on")
        self._error_at = now

    def succeeded(self, *, callback_failed: bool, now: float) -> None:
        """A pass ran through; one of its callbacks may have failed (logged already)."""
        self._since = None
        if callback_failed:
            self._error_at = now

    def pause_s(self, now: float) -> float | None:
        """The least wait before the next pass, ``None`` if no error was recent."""
        if self._error_at is None or now - self._error_at >= ERROR_PAUSE_S:
            return None
        return ERROR_PAUSE_S


def as_failure(exc: BaseException) -> PoolFailedError:
    """``exc`` as the pool's failure: itself if it is one, else one caused by it."""
    if isinstance(exc, PoolFailedError):
        return exc
    failure = PoolFailedError(" ".join(f"{type(exc).__name__}: {exc}".split()))
    failure.__cause__ = exc
    return failure
