"""Worker starts: the boot that ``start()`` waits for, and failed starts after it.

During ``start()`` the first failed start is the pool's
:class:`~._errors.PoolStartError`. After it, a failed start is logged and
retried with :class:`~._backoff.StartBackoff` (capped exponential), and the
handler's traceback is logged once per streak of failures, so a pool whose
handler cannot load for a while neither gives up nor floods the log. Knows
nothing of processes, sockets or requests.
"""

from __future__ import annotations

import logging
import threading

from .._worker import InitFailed
from ._backoff import StartBackoff
from ._errors import PoolStartError

logger = logging.getLogger("mpreqrep")


class Starts:
    """Whether the pool is still booting, why it failed to, and the back-off after.

    Attributes:
        backoff: when to try a failed start again.
        booting: ``start()`` still waits for every worker.
        error: why the boot failed, ``None`` if it did not.

    Thread safety: :meth:`wait_booted` from the thread in ``start()``; the
    rest from the supervisor thread.
    """

    def __init__(self) -> None:
        self.backoff = StartBackoff()
        self.booting = True
        self.error: PoolStartError | None = None
        self._done = threading.Event()
        self._traceback_logged = False

    def wait_booted(self) -> PoolStartError | None:
        """Wait until the boot ended; why it failed, ``None`` if every worker started."""
        self._done.wait()
        return self.error

    def succeeded(self, ready: int, wanted: int) -> None:
        """A worker loaded the handler; ``ready`` of the ``wanted`` workers now serve."""
        self.backoff.succeeded()
        self._traceback_logged = False
        if self.booting and ready == wanted:
            self.booting = False
            self._done.set()

    def failed(self, reason: str, now: float) -> bool:
        """A start failed: while booting, the boot fails (returns ``True``); later,
        it is logged and retried after the back-off (returns ``False``)."""
        if self.booting:
            self.fail_boot(reason)
            return True
        delay = self.backoff.failed(now)
        logger.error("%s; trying again in %.1f s", reason, delay)
        return False

    def fail_boot(self, reason: str) -> None:
        """The boot fails with ``reason`` (the first reason wins); ``start()`` raises it."""
        if self.error is None:
            self.error = PoolStartError(reason)
        self._done.set()

    def end(self) -> None:
        """Supervision is over: nobody waits for the boot any more."""
        self._done.set()

    def log_init_failure(self, message: InitFailed) -> None:
        """Log the handler's traceback, once per streak of failed starts."""
        if not self._traceback_logged:
            self._traceback_logged = True
            logger.error(
                "worker %d could not load the handler:\n%s", message.pid, message.traceback
            )
