"""One worker process as the parent sees it: spawn, handshake, kill, describe.

loky's process context starts the process (its start method on every
platform: a fresh interpreter, so nothing of the parent's threads or sockets
leaks in, and macOS's fork-safety rules do not apply), with
:func:`~mpreqrep._worker.worker_main` as its target; psutil watches and
kills it. The parent learns the pid at once and the process's end from its
``sentinel`` (both documented ``multiprocessing.Process`` API): a selector
watches the sentinel itself where it is a file descriptor (POSIX); where it
is not (Windows: a process handle, and ``select()`` takes sockets only), a
thread waits on it and then ends a socket the selector watches
(:func:`end_socket`). Either way a worker that dies at once, before it
connected anything, is seen at once. The worker then connects twice
(:mod:`mpreqrep._worker`); :mod:`._greeter` reads those connections' first
frames.

Which mechanisms a pool uses is :data:`mechanisms`, read when the pool is
made; tests set it to :data:`WINDOWS_SHAPE` to run Windows' paths on Linux.

Knows nothing of requests or of the other workers.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
from loky.backend import get_context

from .._channel import UNIX_SOCKETS, Address, Channel
from .._worker import InitFailed, worker_main


@dataclass(frozen=True)
class Mechanisms:
    """The platform-dependent means of a pool.

    Attributes:
        unix_channels: workers connect to a Unix socket; else to loopback TCP.
        selectable_sentinels: the supervisor's selector watches each process's
            sentinel; else a thread per worker waits on it (:func:`end_socket`).
    """

    unix_channels: bool
    selectable_sentinels: bool


NATIVE = Mechanisms(unix_channels=UNIX_SOCKETS, selectable_sentinels=os.name == "posix")
"""What this platform offers: both on Linux and macOS, neither on Windows."""

WINDOWS_SHAPE = Mechanisms(unix_channels=False, selectable_sentinels=False)
"""Windows' means, which also run on Linux (how the tests run them)."""

mechanisms = NATIVE
"""The means of the pools made from now on (an internal seam, for the tests)."""

CPU_SAMPLE_INTERVAL_S = 0.5
"""Shortest window over which a worker's CPU use is measured; readers in between get the
last measurement."""


def kill_process_tree(process: psutil.Process) -> None:
    """SIGKILL a process and its descendants, deepest first; gone ones are skipped."""
    try:
        family = [*reversed(process.children(recursive=True)), process]
    except psutil.NoSuchProcess:  # already gone
        return
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()


def end_socket(process: Any) -> socket.socket:
    """A socket that reaches its end of stream once ``process`` has ended.

    For a selector that cannot watch the process's sentinel: a daemon thread
    waits on it with ``multiprocessing.connection.wait`` (documented for
    sentinels on every platform), then closes the socket's other end. The
    thread holds the process, so its sentinel stays open while it waits.
    """
    reader, writer = socket.socketpair()
    threading.Thread(
        target=_close_at_end, args=(process, writer), name="mpreqrep-worker-end", daemon=True
    ).start()
    return reader


def _close_at_end(process: Any, writer: socket.socket) -> None:
    try:
        multiprocessing.connection.wait([process.sentinel])
    finally:
        writer.close()


class CpuSampler:
    """Owns psutil's CPU measurement of one process; every reader gets its last value.

    ``psutil.Process.cpu_percent(interval=None)`` measures since its previous
    call, so callers that each call it skew one another: two calls a
    millisecond apart divide a tick of CPU time by a millisecond (10,312 % was
    seen on 2 CPUs). Here one measurement is taken at most every
    :data:`CPU_SAMPLE_INTERVAL_S`, over at least that window, whoever asks and
    however often. Thread-safe. The clock is read under the lock, next to psutil's
    own reading: a time taken before waiting for the lock could be stale and let a
    later reader measure over a window much shorter than the interval.

    Args:
        process: the process to measure.
        interval_s: the shortest window.
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(
        self,
        process: psutil.Process,
        interval_s: float = CPU_SAMPLE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._process = process
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._percent = 0.0
        with contextlib.suppress(psutil.NoSuchProcess):
            process.cpu_percent(interval=None)  # starts the first window
        self._sampled_at = clock()

    def read(self) -> float:
        """The CPU use in percent of one CPU over the last finished window (0.0 before one).

        Raises:
            psutil.NoSuchProcess: the process is gone.
        """
        with self._lock:
            now = self._clock()
            if now - self._sampled_at >= self._interval_s:
                self._percent = float(self._process.cpu_percent(interval=None))
                self._sampled_at = now
            return self._percent


class WorkerProcess:
    """A spawned worker, from its start until it is reaped.

    ``cause`` says why it is being replaced once the supervisor knows
    (``"timed_out"``, ``"recycled"``, ...); ``retired`` once it takes no
    more requests (it drains, then exits); ``channel`` is set when it said
    hello, ``lifeline`` when it connected its lifeline; ``ended`` is what a
    selector watches for the process's end (its sentinel, or an
    :func:`end_socket`). Used by the supervisor thread only, except
    :meth:`describe` (any thread).

    Args:
        payload: the pickled handler.
        address: the parent's channel listener.
        token: the pool's secret.
        max_rss: the memory cap in bytes, or ``None``.
        now: the monotonic time of the spawn (for the start deadline).
        selectable_sentinel: whether a selector can watch the sentinel itself.

    Raises:
        OSError: the process could not be started.
    """

    def __init__(
        self,
        payload: bytes,
        address: Address,
        token: str,
        max_rss: int | None,
        now: float,
        *,
        selectable_sentinel: bool,
    ) -> None:
        self._process: Any = get_context("loky").Process(
            target=worker_main,
            args=(payload, address, token, max_rss),
            name="mpreqrep-worker",
        )
        self._process.start()
        self.pid: int = self._process.pid
        self._end_socket: socket.socket | None = None
        self.ended: int | socket.socket = self._process.sentinel
        if not selectable_sentinel:
            self.ended = self._end_socket = end_socket(self._process)
        self.started_at = now
        self.cause: str | None = None
        self.channel: Channel | None = None
        self.lifeline: Channel | None = None
        self.init_failure: InitFailed | None = None
        self.retired = False
        try:
            self._psutil: psutil.Process | None = psutil.Process(self.pid)
        except psutil.NoSuchProcess:  # died already; its end shows next
            self._psutil = None
        else:
            self._cpu = CpuSampler(self._psutil)

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
        """Collect the exit status of the ended process; release its sockets."""
        self._process.join(timeout=timeout)
        for sock in (self.lifeline, self._end_socket):
            if sock is not None:
                sock.close()
        return self._process.exitcode  # type: ignore[no-any-return]

    def describe(self, served: int) -> dict[str, Any] | None:
        """``{pid, rss, cpu_percent, served}``, ``None`` if the process is gone."""
        process = self._psutil
        if process is None:
            return None
        try:
            with process.oneshot():
                rss = int(process.memory_info().rss)
                cpu_percent = self._cpu.read()
        except psutil.NoSuchProcess:
            return None
        return {"pid": self.pid, "rss": rss, "cpu_percent": cpu_percent, "served": served}
