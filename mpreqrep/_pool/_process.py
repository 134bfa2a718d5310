"""One worker process as the parent sees it: spawn, handshake, kill, describe.

loky's process context starts the process (its start method: a fresh
interpreter, so nothing of the parent's threads or sockets leaks in), with
:func:`~mpreqrep._worker.worker_main` as its target; psutil watches and
kills it. The parent learns the pid at once and the process's end from its
``sentinel`` (both documented ``multiprocessing.Process`` API). The worker
then connects twice (:mod:`mpreqrep._worker`); :mod:`._greeter` reads
those connections' first frames.

Knows nothing of requests or of the other workers.
"""

from __future__ import annotations

import contextlib
from typing import Any

import psutil
from loky.backend import get_context

from .._channel import Address, Channel
from .._worker import InitFailed, worker_main


def kill_process_tree(process: psutil.Process) -> None:
    """SIGKILL a process and its descendants, deepest first; gone ones are skipped."""
    try:
        family = [*reversed(process.children(recursive=True)), process]
    except psutil.NoSuchProcess:  # already gone
        return
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()


class WorkerProcess:
    """A spawned worker, from its start until it is reaped.

    ``cause`` says why it is being replaced once the supervisor knows
    (``"timed_out"``, ``"recycled"``, ...); ``channel`` is set when it said
    hello, ``lifeline`` when it connected its lifeline. Used by the
    supervisor thread only, except :meth:`describe` (any thread).

    Args:
        payload: the pickled handler.
        address: the parent's channel listener.
        token: the pool's secret.
        max_rss: the memory cap in bytes, or ``None``.
        now: the monotonic time of the spawn (for the start deadline).

    Raises:
        OSError: the process could not be started.
    """

    def __init__(
        self, payload: bytes, address: Address, token: str, max_rss: int | None, now: float
    ) -> None:
        self._process: Any = get_context("loky").Process(
            target=worker_main,
            args=(payload, address, token, max_rss),
            name="mpreqrep-worker",
        )
        self._process.start()
        self.pid: int = self._process.pid
        self.sentinel: int = self._process.sentinel
        self.started_at = now
        self.cause: str | None = None
        self.channel: Channel | None = None
        self.lifeline: Channel | None = None
        self.init_failure: InitFailed | None = None
        try:
            self._psutil: psutil.Process | None = psutil.Process(self.pid)
        except psutil.NoSuchProcess:  # died already; its sentinel says so next
            self._psutil = None

    @property
    def ready(self) -> bool:
        """Whether it loaded the handler and serves its channel."""
        return self.channel is not None

    def kill(self, cause: str) -> None:
        """Kill it and its descendants (SIGKILL), recording why, unless a cause is known."""
        self.cause = self.cause or cause
        if self._psutil is not None:
            kill_process_tree(self._psutil)

    def reap(self, timeout: float = 0.0) -> int | None:
        """Collect the exit status of the ended process; release the lifeline."""
        self._process.join(timeout=timeout)
        if self.lifeline is not None:
            self.lifeline.close()
        return self._process.exitcode  # type: ignore[no-any-return]

    def describe(self, served: int) -> dict[str, Any] | None:
        """``{pid, rss, cpu_percent, served}``, ``None`` if the process is gone."""
        process = self._psutil
        if process is None:
            return None
        try:
            with process.oneshot():
                rss = int(process.memory_info().rss)
                cpu_percent = float(process.cpu_percent(interval=None))
        except psutil.NoSuchProcess:
            return None
        return {"pid": self.pid, "rss": rss, "cpu_percent": cpu_percent, "served": served}
