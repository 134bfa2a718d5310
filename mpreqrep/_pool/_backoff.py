"""When to try starting a worker again after starts failed (sans I/O).

A pool whose workers keep failing to start (the handler's module fails to
import, the machine is out of processes) must neither give up nor spawn in a
hot loop. After ``n`` failures in a row the next attempt waits
``min(FIRST_DELAY_S * 2 ** (n - 1), MAX_DELAY_S)`` and only one worker starts
at a time; the first success ends the back-off and every missing worker
starts at once.
"""

from __future__ import annotations

FIRST_DELAY_S = 0.1
"""Wait after the first failed start."""

MAX_DELAY_S = 4.0
"""Longest wait between two attempts, so a pool heals soon after its cause goes away."""


class StartBackoff:
    """Counts failed starts in a row and says how many workers may start now."""

    def __init__(self) -> None:
        self.failures = 0
        self._next_attempt_at = 0.0

    def failed(self, now: float) -> float:
        """Count a failed start; returns the delay before the next attempt."""
        self.failures += 1
        delay: float = min(FIRST_DELAY_S * 2.0 ** (self.failures - 1), MAX_DELAY_S)
        self._next_attempt_at = now + delay
        return delay

    def succeeded(self) -> None:
        """A worker started: no more back-off."""
        self.failures = 0
        self._next_attempt_at = 0.0

    def allowed(self, missing: int, starting: int, now: float) -> int:
        """How many of the ``missing`` workers to start now, with ``starting`` on their way."""
        if not self.failures:
            return missing
        if starting or now < self._next_attempt_at:
            return 0
        return min(missing, 1)

    def wait_s(self, now: float) -> float | None:
        """Seconds until an attempt is allowed again, ``None`` when not backing off."""
        if not self.failures:
            return None
        return max(0.0, self._next_attempt_at - now)
