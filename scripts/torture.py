"""Torture a RequestServer over loopback and check that it keeps its promises.

Each scenario starts a fresh server in a child process (see
``tests/torture_handlers.py``) in one of the modes of :data:`MODES`: sync
thread mode, thread mode (``async_val=True``), process mode (``workers=2``)
or executor mode (a loky pool of two), attacks it from this process, and
turns what it saw into one row of a table: the load, the faults injected,
the requests lost and whether every figure met its bar (SPEC section 5)::

    this process                                  server child process
    ────────────                                  ────────────────────
    load threads ── do_request ─────────────────▶ I/O thread ──▶ workers
    bad clients ─── raw sockets ────────────────▶      │           ▲
    killer thread ─ SIGKILL by pid (chaos) ─────────────┼───────────┘
    psutil ──────── RSS, fds, threads, children ◀──────┘
    stdin/stdout ── "stop" / final stats ◀──────▶ control loop

Scenarios: ``chaos`` (workers SIGKILLed under load), ``flood`` (a thousand
simultaneous connections), ``slow`` (silent and trickling clients beside a
latency probe), ``garbage`` (bad bytes and bad socket manners beside good
clients), ``stuck`` (handlers that never return), ``leak`` (handlers that
leak memory) and ``soak`` (tens of thousands of requests, then the
footprint must return to its baseline) run in thread and process mode. The
hostile part runs in every mode: ``faults`` (handlers that raise anything,
``BaseException`` included, or return what cannot be sent), ``lifecycle``
(a second ``start()``, ``run()`` while serving, a failed ``start()``...),
``slowread`` (big replies read slowly but steadily, for several read
timeouts, and at full speed) and ``noread`` (clients that ask for big
replies and never read them: the buffer stays bounded).

Every loop is capped in count and in time; everything is a multiple of one
time unit (``--unit``, default ``$MPREQREP_TEST_TIMEOUT_UNIT`` or 1). The
exit status is 1 when any figure falls short. ``tests/test_torture.py`` runs
the same scenarios with small numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, TypeVar

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # for tests.torture_handlers

import mpreqrep  # noqa: E402
from tests.torture_handlers import ANSWERED_FAULTS, CRLF, FAULTS, MIB, reply_pid  # noqa: E402

HOST = "127.0.0.1"
MODES: dict[str, dict[str, Any]] = {
    "sync": {},
    "thread": {"async_val": True},
    "process": {"workers": 2},
    "executor": {"executor": "loky"},  # built in the server child, see torture_handlers
}
CLASSIC_MODES = ("thread", "process")
SERVER_BOOT = "import sys; from tests.torture_handlers import main; sys.exit(main(sys.argv[1:]))"
RECV_CHUNK_SIZE = 65536

# Server settings of the scenarios, in seconds (times the unit) or bytes.
SLOW_READ_TIMEOUT_S = 2.0
GARBAGE_READ_TIMEOUT_S = 1.0
GARBAGE_MAX_REQUEST_SIZE = 65536
STUCK_REQUEST_TIMEOUT_S = 1.0
GOOD_CONCURRENCY = 4  # the good clients beside stuck, leaking or bad ones
SMALL_RECEIVE_BUFFER = 65536  # slow and stalled readers: the server, not the kernel, holds
NOREAD_GAP_S = 0.02  # between two clients that never read
# A reply in flight may exist three times at once: as the pool's or executor's
# bytes, as the handler's str, and as its encoding.
COPIES_PER_REPLY = 3
TCP_ENDED = frozenset({6, 7})  # TCP_INFO states TIME_WAIT and CLOSE
# noread measures what the server holds through its RSS. glibc's default, a
# dynamic mmap threshold, keeps freed multi-MiB blocks cached in every thread's
# arena (RSS 2-3x the live bytes); a fixed threshold returns them to the system.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}

# Client settings, in seconds (times the unit, except the trickle period).
CLIENT_TIMEOUT_S = 30.0
START_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 15.0
TRICKLE_PERIOD_S = 1.0
PROBE_PERIOD_S = 0.01
CPU_WINDOW_S = 0.3
POLL_INTERVAL_S = 0.05
BUSY_CPU_PERCENT = 50.0

# Bars a figure must meet.
P99_FACTOR = 4.0  # slow clients may cost the probe this factor of its p99 ...
P99_SLACK_S = 0.25  # ... or this much (times the unit), whichever is more: far below
# the read timeout a blocked acceptor would cost, far above scheduling noise
RSS_GROWTH_FACTOR = 1.10  # soak: RSS may end this factor above its baseline ...
RSS_SLACK = 8 * MIB  # ... plus this many bytes


@dataclass(frozen=True)
class Scale:
    """How hard the scenarios push: every count that bounds a loop.

    Attributes:
        unit: every time limit is a multiple of this many seconds.
        phase_cap_s: no load phase runs longer than this (times the unit).
        seed: seeds the random choices (kills, garbage), for reproducible runs.
    """

    unit: float = 1.0
    phase_cap_s: float = 60.0
    seed: int = 1
    chaos_requests: int = 3000
    chaos_concurrency: int = 32
    chaos_work_ms: float = 2.0
    chaos_kill_every_s: tuple[float, float] = (0.2, 0.6)
    flood_connections: int = 1000
    slow_clients: int = 300
    slow_probes: int = 300
    garbage_rounds: int = 40
    garbage_good_requests: int = 2000
    stuck_spinners: int = 2
    stuck_good_requests: int = 600
    leak_requests: int = 12
    leak_good_requests: int = 600
    leak_mib: int = 64
    max_worker_mib: int = 256
    soak_requests: int = 20000
    soak_concurrency: int = 32
    fault_rounds: int = 5
    fault_good_requests: int = 600
    lifecycle_rounds: int = 3
    lifecycle_good_requests: int = 600
    slowread_readers: int = 4
    slowread_mib: int = 8
    slowread_mib_per_s: float = 2.0
    slowread_read_timeout_s: float = 2.0
    slowread_fast_requests: int = 8
    slowread_good_requests: int = 600
    noread_clients: int = 40
    noread_mib: int = 20
    noread_max_buffered_mib: int = 64
    noread_read_timeout_s: float = 1.0
    noread_good_requests: int = 200


FULL = Scale()
QUICK = Scale(
    phase_cap_s=30.0,
    chaos_requests=800,
    flood_connections=1000,
    slow_clients=100,
    slow_probes=150,
    garbage_rounds=10,
    garbage_good_requests=500,
    stuck_good_requests=300,
    leak_requests=8,
    leak_good_requests=300,
    soak_requests=4000,
    fault_rounds=2,
    fault_good_requests=300,
    lifecycle_rounds=2,
    lifecycle_good_requests=300,
    slowread_readers=2,
    slowread_fast_requests=4,
    slowread_good_requests=300,
    noread_clients=20,
    noread_mib=8,
    noread_max_buffered_mib=16,
    noread_good_requests=100,
)


# -- results ----------------------------------------------------------------------------


@dataclass
class Result:
    """One row of the table: a scenario against one mode.

    Attributes:
        lost: requests that should have been answered and were not;
            ``None`` when the scenario did not run to the end (or at all).
        passed: every figure met its bar (or the scenario does not apply).
        notes: the figures behind the verdict.
    """

    scenario: str
    mode: str
    load: str
    faults: str
    lost: int | None
    passed: bool
    notes: str
    seconds: float = 0.0

    @property
    def verdict(self) -> str:
        """PASS, SKIP (does not apply to the mode; the notes say why), FAIL (a
        figure fell short) or ERROR (the scenario broke off)."""
        if self.passed:
            return "PASS" if self.lost is not None else "SKIP"
        return "ERROR" if self.lost is None else "FAIL"


def reproduce_command(result: Result, quick: bool) -> str:
    """The command line that runs just this row again."""
    command = f"scripts/torture --scenarios {result.scenario} --modes {result.mode}"
    return command + " --quick" if quick else command


def format_table(results: Sequence[Result]) -> str:
    """A plain-text table, one row per result."""
    header = ("scenario", "mode", "load", "faults injected", "lost", "result", "time", "notes")
    rows = [header] + [
        (
            r.scenario,
            r.mode,
            r.load,
            r.faults,
            "-" if r.lost is None else str(r.lost),
            r.verdict,
            f"{r.seconds:.0f}s",
            r.notes,
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  "
        + row[-1]
        for row in rows
    )


def format_markdown(results: Sequence[Result], *, quick: bool, seconds: float) -> str:
    """The README "Reliability" table, with the command that reproduces each row."""
    lines = [
        f"Measured by `scripts/torture{' --quick' if quick else ''}` in {seconds:.0f} s "
        f"on {os.cpu_count()} cores; loopback only.",
        "",
        "| Scenario | Mode | Load | Faults injected | Requests lost | Result | Figures "
        "| Reproduce |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lost = "-" if r.lost is None else str(r.lost)
        cells = (r.scenario, r.mode, r.load, r.faults, lost, r.verdict, r.notes)
        row = " | ".join(cell.replace("|", "\\|") for cell in cells)
        lines.append(f"| {row} | `{reproduce_command(r, quick)}` |")
    return "\n".join(lines) + "\n"


# -- the server under torture -----------------------------------------------------------


class ServerError(RuntimeError):
    """The server child did not start, answer its control line or stop in time."""


@dataclass(frozen=True)
class Footprint:
    """What the server process holds: memory, descriptors, threads, children."""

    rss: int
    fds: int
    threads: int
    children: int

    def within(self, baseline: Footprint, *, idle_threads: int) -> bool:
        """Whether this is back at ``baseline``, within the allowances.

        Args:
            baseline: the footprint to return to.
            idle_threads: threads the handler pool may have added and keeps
                idle (a thread pool grows to the requests in flight at once,
                at most one per concurrent client, and never shrinks).
        """
        return (
            self.fds <= baseline.fds
            and self.threads <= baseline.threads + idle_threads
            and self.children == baseline.children
            and self.rss <= baseline.rss * RSS_GROWTH_FACTOR + RSS_SLACK
        )


class ServerProcess:
    """A :class:`~tests.torture_handlers.TortureServer` in a child process.

    Args:
        mode: one of :data:`MODES`.
        unit: the time unit, for the start and stop timeouts.
        environment: variables to add to the child's environment.
        options: further keyword arguments for the server.

    Raises:
        ServerError: the child did not report its port in time.

    Use it as a context manager: leaving it stops the server, and kills the
    child and its descendants (by pid) if they do not stop in time.
    """

    def __init__(
        self, mode: str, unit: float, *, environment: dict[str, str] | None = None, **options: Any
    ) -> None:
        self._unit = unit
        self._log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - see close()
        python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        self._popen = subprocess.Popen(
            [sys.executable, "-c", SERVER_BOOT, json.dumps({**MODES[mode], **options})],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=REPO_ROOT,
            env={**os.environ, **(environment or {}), "PYTHONPATH": python_path},
            text=True,
        )
        try:
            hello = self._read_line(START_TIMEOUT_S * unit)
        except ServerError:
            self.close()
            raise
        self.port: int = hello["port"]
        self.address = f"{HOST}:{self.port}"
        self.process = psutil.Process(hello["pid"])

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def ask(self, line: str) -> dict[str, Any]:
        """Send one control line (say ``"misuse"``) and read the child's answer.

        Raises:
            ServerError: no answer in time.
        """
        assert self._popen.stdin is not None
        try:
            self._popen.stdin.write(line + "\n")
            self._popen.stdin.flush()
        except BrokenPipeError:
            raise ServerError(f"the server child is gone:\n{self.log_tail()}") from None
        return self._read_line(SETTLE_TIMEOUT_S * self._unit)

    def stop(self) -> dict[str, Any]:
        """Stop the server and wait for the child to exit.

        Returns:
            The server's last :meth:`~mpreqrep.RequestServer.stats`.

        Raises:
            ServerError: it did not stop in time (it is killed).
        """
        assert self._popen.stdin is not None
        try:
            self._popen.stdin.write("stop\n")
            self._popen.stdin.flush()
        except BrokenPipeError:
            raise ServerError(f"the server child is gone:\n{self.log_tail()}") from None
        final_stats = self._read_line(SETTLE_TIMEOUT_S * 2 * self._unit)
        try:
            self._popen.wait(SETTLE_TIMEOUT_S * self._unit)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ServerError("the server child did not exit after stopping") from None
        if not final_stats.get("stopped"):
            raise ServerError(f"the server did not stop in time:\n{self.log_tail()}")
        return final_stats

    def close(self) -> None:
        """Kill the child if it still runs; release its pipes and log."""
        if self._popen.poll() is None:
            self.kill()
        for stream in (self._popen.stdin, self._popen.stdout, self._log):
            with contextlib.suppress(OSError):  # a broken pipe to a dead child
                stream.close()  # type: ignore[union-attr]

    def kill(self) -> None:
        """SIGKILL the child and its descendants, by pid, and reap the child."""
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self._popen.pid)
            for process in [*root.children(recursive=True), root]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
        self._popen.wait()

    def children(self) -> list[psutil.Process]:
        """The server's live child processes: workers and loky's helpers, no zombies."""
        live = []
        for child in self.process.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.status() != psutil.STATUS_ZOMBIE:
                    live.append(child)
        return live

    def footprint(self) -> Footprint:
        """The server process's RSS, open descriptors, threads and children now."""
        with self.process.oneshot():
            return Footprint(
                rss=self.process.memory_info().rss,
                fds=self.process.num_fds(),
                threads=self.process.num_threads(),
                children=len(self.children()),
            )

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the child wrote to stderr (its log)."""
        self._log.seek(0)
        return "\n".join(self._log.read().decode(errors="replace").splitlines()[-lines:])

    def _read_line(self, timeout_s: float) -> dict[str, Any]:
        """Read one JSON line from the child within ``timeout_s``."""
        stdout = self._popen.stdout
        assert stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            ready = selector.select(timeout_s)
        line = stdout.readline() if ready else ""
        if not line:
            raise ServerError(f"no answer from the server child:\n{self.log_tail()}")
        answer: dict[str, Any] = json.loads(line)
        return answer


# -- clients ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One request sent with ``do_request`` and what came back.

    Attributes:
        reply: the reply; ``""`` if the server closed without one; ``None``
            if none came in time, or the request was never sent.
        started, ended: ``time.monotonic()`` around the exchange.
        error: why the request failed on the client side, if it did.
    """

    request: str
    reply: str | None
    started: float
    ended: float
    error: str | None = None

    @property
    def pid(self) -> int | None:
        """The pid that served the request if the reply is right, else ``None``."""
        return reply_pid(self.request + CRLF, self.reply)

    @property
    def latency_s(self) -> float:
        """Seconds the exchange took."""
        return self.ended - self.started


def send_one(address: str, request: str, timeout_s: float) -> Outcome:
    """Send one request with ``do_request`` and record what happened."""
    started = time.monotonic()
    try:
        reply, error = mpreqrep.do_request(address, request, timeout_s), None
    except OSError as exc:  # NoServerError included: refused, reset, no ports
        reply, error = None, f"{type(exc).__name__}: {exc}"
    return Outcome(request, reply, started, time.monotonic(), error)


def run_load(
    address: str,
    requests: Sequence[str],
    *,
    concurrency: int,
    timeout_s: float,
    cap_s: float,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Send every request from ``concurrency`` threads, each waiting for its reply.

    Args:
        address: the server.
        requests: the requests, sent in order (each thread takes the next).
        concurrency: threads sending at once.
        timeout_s: the ``do_request`` timeout of each request.
        cap_s: no request is started after this many seconds.
        on_outcome: called (in a load thread) with each outcome as it comes.

    Returns:
        One outcome per request, in the order of ``requests``; a request
        never started has the reply ``None`` and an error saying so.
    """
    deadline = time.monotonic() + cap_s
    outcomes: list[Outcome | None] = [None] * len(requests)
    pending = iter(range(len(requests)))
    lock = threading.Lock()

    def send_until_done() -> None:
        while time.monotonic() < deadline:
            with lock:
                index = next(pending, None)
            if index is None:
                return
            outcome = outcomes[index] = send_one(address, requests[index], timeout_s)
            if on_outcome is not None:
                on_outcome(outcome)

    with ThreadPoolExecutor(concurrency, thread_name_prefix="torture-load") as pool:
        for _ in range(concurrency):
            pool.submit(send_until_done)
    now = time.monotonic()
    return [
        outcome or Outcome(request, None, now, now, "not sent within the time cap")
        for outcome, request in zip(outcomes, requests, strict=True)
    ]


def probe(address: str, count: int, *, tag: str, unit: float, cap_s: float) -> list[Outcome]:
    """A normal client: one request at a time, one every few milliseconds."""
    deadline = time.monotonic() + cap_s
    outcomes = []
    for index in range(count):
        if time.monotonic() >= deadline:
            break
        outcomes.append(send_one(address, f"{tag}{index}", CLIENT_TIMEOUT_S * unit))
        time.sleep(PROBE_PERIOD_S)  # the client's pace, not a synchronisation
    return outcomes


def count_lost(outcomes: Sequence[Outcome]) -> int:
    """Requests without their right reply."""
    return sum(1 for outcome in outcomes if outcome.pid is None)


def loss_kinds(outcomes: Sequence[Outcome]) -> str:
    """How the lost requests failed ("" if none was lost), for the notes."""
    kinds = Counter(
        "closed without a reply"
        if outcome.reply == ""
        else "wrong reply"
        if outcome.reply is not None
        else outcome.error or "no reply in time"
        for outcome in outcomes
        if outcome.pid is None
    )
    return ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())


def p99(outcomes: Sequence[Outcome]) -> float:
    """The nearest-rank 99th percentile latency, in seconds (NaN if none)."""
    latencies = sorted(outcome.latency_s for outcome in outcomes)
    if not latencies:
        return math.nan
    return latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]


def wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``predicate`` until it is true (``True``) or ``timeout_s`` ran out (``False``)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL_S)
    return True


def connect(port: int, unit: float) -> socket.socket:
    """A blocking connection to the server with the client timeout."""
    return socket.create_connection((HOST, port), timeout=CLIENT_TIMEOUT_S * unit)


def read_until_closed(sock: socket.socket, timeout_s: float) -> bytes | None:
    """Everything the server sends until it closes; ``None`` if it never does."""
    sock.settimeout(timeout_s)
    chunks = []
    try:
        while chunk := sock.recv(RECV_CHUNK_SIZE):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    except TimeoutError:
        return None
    return b"".join(chunks)


def first_line(data: bytes) -> bytes:
    """The bytes up to and including the first CRLF, or all of them (SPEC 1)."""
    end = data.find(b"\r\n")
    return data if end < 0 else data[: end + 2]


def decode(data: bytes) -> str:
    """Decode as the SPEC says: UTF-8 with invalid sequences dropped."""
    return data.decode("utf-8", errors="ignore")


# -- chaos: workers killed under load ------------------------------------------------------


PeriodicT = TypeVar("PeriodicT", bound="Periodic")


class Periodic:
    """A daemon thread that calls :meth:`_tick` every :meth:`_interval_s` while a
    ``with`` block runs; it is stopped and joined when the block ends."""

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self: PeriodicT) -> PeriodicT:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _interval_s(self) -> float:
        raise NotImplementedError

    def _tick(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s()):
            self._tick()


class WorkerKiller(Periodic):
    """SIGKILLs one of the server's worker processes, by pid, every few hundred ms.

    Only processes that are children of the server *and* have served a reply
    (their pid came back in one) are candidates, so loky's helper processes
    are never hit. Use it as a context manager around the load.
    """

    def __init__(self, server: ServerProcess, every_s: tuple[float, float], seed: int) -> None:
        super().__init__("torture-killer")
        self._server = server
        self._every_s = every_s
        self._rng = random.Random(seed)
        self._served_by: set[int] = set()
        self._lock = threading.Lock()
        self.kill_times: list[float] = []

    def note(self, outcome: Outcome) -> None:
        """Learn which process served a reply (called from the load threads)."""
        pid = outcome.pid
        if pid is not None:
            with self._lock:
                self._served_by.add(pid)

    def _interval_s(self) -> float:
        return self._rng.uniform(*self._every_s)

    def _tick(self) -> None:
        """Kill one worker that has served, if there is one now."""
        with self._lock:
            served_by = set(self._served_by)
        candidates = sorted(
            child.pid for child in self._server.children() if child.pid in served_by
        )
        if not candidates:
            return  # the pool is still being rebuilt: its new workers have not served yet
        killed_at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._rng.choice(candidates), signal.SIGKILL)
            self.kill_times.append(killed_at)


@dataclass(frozen=True)
class ChaosTally:
    """How the chaos requests fared.

    Attributes:
        answered: right replies.
        excused: ``""`` while a kill was in flight: maybe its own worker died.
        lost: anything else: a wrong reply, a timeout, ``""`` with no kill.
    """

    answered: int
    excused: int
    lost: int


def excused(outcome: Outcome, kill_times: Sequence[float]) -> bool:
    """``""`` while a kill was in flight: maybe the request's own worker was killed."""
    return outcome.reply == "" and any(
        outcome.started <= killed_at <= outcome.ended for killed_at in kill_times
    )


def tally_chaos(outcomes: Sequence[Outcome], kill_times: Sequence[float]) -> ChaosTally:
    """Sort the outcomes into answered, excused and lost (see :class:`ChaosTally`)."""
    answered = sum(1 for outcome in outcomes if outcome.pid is not None)
    excused_count = sum(1 for outcome in outcomes if excused(outcome, kill_times))
    return ChaosTally(answered, excused_count, len(outcomes) - answered - excused_count)


def chaos(mode: str, scale: Scale) -> Result:
    """Thousands of requests at 32+ concurrency while workers are SIGKILLed.

    Each kill may cost the one request its worker was running (``""``), and
    no other: a request that got ``""`` with no kill during its exchange is
    lost, and more excused requests than kills means bystanders were lost.
    """
    requests = [f"work {scale.chaos_work_ms:g} c{i}" for i in range(scale.chaos_requests)]
    load = f"{len(requests)} requests ({scale.chaos_work_ms:g} ms CPU each), "
    load += f"{scale.chaos_concurrency} concurrent"
    with ServerProcess(mode, scale.unit) as server:
        killer = WorkerKiller(server, scale.chaos_kill_every_s, scale.seed)
        with killer if mode == "process" else contextlib.nullcontext():
            outcomes = run_load(
                server.address,
                requests,
                concurrency=scale.chaos_concurrency,
                timeout_s=CLIENT_TIMEOUT_S * scale.unit,
                cap_s=scale.phase_cap_s * scale.unit,
                on_outcome=killer.note,
            )
        server.stop()
    tally = tally_chaos(outcomes, killer.kill_times)
    kills = len(killer.kill_times)
    notes = f"{tally.answered} answered"
    if mode == "process":
        low, high = scale.chaos_kill_every_s
        faults = f"{kills} worker SIGKILLs, one every {low:g}-{high:g} s"
        notes += f"; {tally.excused} got '' while a kill was in flight (at most 1 per kill)"
    else:
        faults = "none: thread mode has no worker to kill (plain load)"
    if tally.lost:
        lost = [o for o in outcomes if o.pid is None and not excused(o, killer.kill_times)]
        notes += f"; lost: {loss_kinds(lost)}"
    return Result(
        "chaos",
        mode,
        load,
        faults,
        tally.lost,
        passed=tally.lost == 0 and tally.excused <= kills,
        notes=notes,
    )


# -- flood: a thousand simultaneous connections ---------------------------------------------


def raise_fd_limit(needed: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit if ``needed`` exceeds it.

    Children (the server) inherit the raised limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def collect_replies(socks: Sequence[socket.socket], timeout_s: float) -> list[bytes | None]:
    """Read every socket until the server closes it; ``None`` for those it never closed."""
    received = [bytearray() for _ in socks]
    done: list[bool] = [False] * len(socks)
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        for index, sock in enumerate(socks):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, index)
        while selector.get_map() and (remaining := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(remaining):
                index = key.data
                try:
                    chunk = socks[index].recv(RECV_CHUNK_SIZE)
                except ConnectionResetError:
                    chunk = b""
                received[index] += chunk
                if not chunk:
                    done[index] = True
                    selector.unregister(socks[index])
    return [
        bytes(data) if finished else None for data, finished in zip(received, done, strict=True)
    ]


def flood(mode: str, scale: Scale) -> Result:
    """Open every connection first, then send every request at once: all answered."""
    count = scale.flood_connections
    raise_fd_limit(3 * count + 256)  # ours, the server's, and some to spare
    with ServerProcess(mode, scale.unit) as server, contextlib.ExitStack() as stack:
        socks = [stack.enter_context(connect(server.port, scale.unit)) for _ in range(count)]
        for index, sock in enumerate(socks):
            sock.sendall(f"f{index}\r\n".encode())
            sock.shutdown(socket.SHUT_WR)
        replies = collect_replies(socks, CLIENT_TIMEOUT_S * scale.unit)
        stack.close()
        server.stop()
    answered = sum(
        1
        for index, reply in enumerate(replies)
        if reply is not None and reply_pid(f"f{index}\r\n", decode(reply)) is not None
    )
    hung = replies.count(None)
    return Result(
        "flood",
        mode,
        f"{count} connections open at once, then {count} requests",
        "connection burst",
        count - answered,
        passed=answered == count,
        notes=f"{answered} answered, {hung} hung",
    )


# -- slow and silent clients ------------------------------------------------------------


class SlowClients:
    """Keeps ``count`` connections open: half send nothing, half a byte a second.

    Connections the server drops (its read timeout) are replaced, so the
    pressure stays on. Use it as a context manager: entering opens them all.
    """

    def __init__(self, port: int, count: int, unit: float) -> None:
        self._port = port
        self._unit = unit
        self._socks: list[socket.socket] = []
        self._count = count
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="torture-slow", daemon=True)
        self.opened = 0
        self.dropped = 0

    def __enter__(self) -> SlowClients:
        self._socks = [self._open() for _ in range(self._count)]
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self._socks:
            sock.close()

    def _open(self) -> socket.socket:
        sock = connect(self._port, self._unit)
        sock.setblocking(False)
        self.opened += 1
        return sock

    def _run(self) -> None:
        while not self._stop.wait(TRICKLE_PERIOD_S):
            for index in range(len(self._socks)):
                self._tend(index, trickles=index % 2 == 1)

    def _tend(self, index: int, *, trickles: bool) -> None:
        """Trickle a byte if asked; replace the connection if the server dropped it."""
        sock = self._socks[index]
        if not _closed_by_server(sock):
            try:
                if trickles:
                    sock.send(b"s")
                return
            except OSError:
                pass  # closed since: replace it
        sock.close()
        self.dropped += 1
        self._socks[index] = self._open()


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed this non-blocking socket (it never answers slow clients)."""
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def slow(mode: str, scale: Scale) -> Result:
    """A normal client's p99 latency alone, then beside hundreds of slow clients."""
    unit = scale.unit
    cap_s = scale.phase_cap_s * unit
    with ServerProcess(mode, unit, read_timeout=SLOW_READ_TIMEOUT_S * unit) as server:
        alone = probe(server.address, scale.slow_probes, tag="alone", unit=unit, cap_s=cap_s)
        with SlowClients(server.port, scale.slow_clients, unit) as slow_clients:
            beside = probe(server.address, scale.slow_probes, tag="beside", unit=unit, cap_s=cap_s)
        server.stop()
    lost = count_lost(alone) + count_lost(beside) + scale.slow_probes * 2 - len(alone + beside)
    bar = max(P99_FACTOR * p99(alone), p99(alone) + P99_SLACK_S * unit)
    return Result(
        "slow",
        mode,
        f"{scale.slow_probes} probe requests, one at a time, twice",
        f"{scale.slow_clients} slow clients (half silent, half 1 byte/s); "
        f"{slow_clients.opened} opened, {slow_clients.dropped} dropped by the server",
        lost,
        passed=lost == 0 and p99(beside) <= bar,
        notes=f"probe p99 {p99(alone) * 1000:.1f} ms alone, {p99(beside) * 1000:.1f} ms beside "
        f"them (bar {bar * 1000:.0f} ms)"
        + (f"; lost: {loss_kinds(alone + beside)}" if lost else ""),
    )


# -- garbage: bad bytes and bad manners -----------------------------------------------------


def _expect_echo(port: int, payload: bytes, unit: float) -> str | None:
    """Send ``payload``, half-close; the reply must echo its first line, decoded."""
    with connect(port, unit) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        reply = read_until_closed(sock, CLIENT_TIMEOUT_S * unit)
    if reply is None:
        return "hung"
    if reply_pid(decode(first_line(payload)), decode(first_line(reply))) is None:
        return f"wrong reply {reply[:60]!r} to {payload[:60]!r}"
    return None


def _expect_no_reply(sock: socket.socket, unit: float) -> str | None:
    """The server must close ``sock`` without sending a byte."""
    reply = read_until_closed(sock, CLIENT_TIMEOUT_S * unit)
    if reply is None:
        return "never closed"
    return f"unexpected reply {reply[:60]!r}" if reply else None


def garbage_random(port: int, rng: random.Random, unit: float) -> str | None:
    """Random bytes (CRLF only by chance): echoed up to the first CRLF, as decoded."""
    return _expect_echo(port, rng.randbytes(rng.randint(1, 2048)), unit)


def garbage_no_crlf(port: int, rng: random.Random, unit: float) -> str | None:
    """A request without CRLF, ended by EOF: still a request (SPEC 1)."""
    return _expect_echo(port, f"no crlf {rng.random()}".encode(), unit)


def garbage_bad_utf8(port: int, rng: random.Random, unit: float) -> str | None:
    """Invalid UTF-8: decoded with the bad sequences dropped (SPEC 1)."""
    return _expect_echo(port, b"bad \xff\xfe\xc3( \xed\xa0\x80utf8 \xf0\x9f\r\n", unit)


def garbage_huge(port: int, rng: random.Random, unit: float) -> str | None:
    """A line longer than max_request_size: closed, never handled (SPEC 5)."""
    with connect(port, unit) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"h" * (GARBAGE_MAX_REQUEST_SIZE * 4))
        return _expect_no_reply(sock, unit)


def garbage_reset(port: int, rng: random.Random, unit: float) -> str | None:
    """Half a request, then a reset (SO_LINGER 0): nothing to check but survival."""
    with connect(port, unit) as sock:
        sock.sendall(b"reset me")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return None


def garbage_silent(port: int, rng: random.Random, unit: float) -> str | None:
    """Connect and send nothing, never half-close: dropped after the read timeout."""
    with connect(port, unit) as sock:
        return _expect_no_reply(sock, unit)


def garbage_partial(port: int, rng: random.Random, unit: float) -> str | None:
    """Half a line, then silence with the socket open: dropped after the read timeout."""
    with connect(port, unit) as sock:
        sock.sendall(b"half a line")
        return _expect_no_reply(sock, unit)


def garbage_empty(port: int, rng: random.Random, unit: float) -> str | None:
    """Half-close at once without a byte: closed without a reply."""
    with connect(port, unit) as sock:
        sock.shutdown(socket.SHUT_WR)
        return _expect_no_reply(sock, unit)


def garbage_abandon(port: int, rng: random.Random, unit: float) -> str | None:
    """A whole request, then close before the reply comes: its write must not hurt."""
    with connect(port, unit) as sock:
        sock.sendall(b"abandoned\r\n")
    return None


GARBAGE: dict[str, Callable[[int, random.Random, float], str | None]] = {
    "random bytes": garbage_random,
    "no CRLF": garbage_no_crlf,
    "invalid UTF-8": garbage_bad_utf8,
    "oversize line": garbage_huge,
    "reset mid-request": garbage_reset,
    "silent": garbage_silent,
    "half a line": garbage_partial,
    "empty EOF": garbage_empty,
    "abandoned": garbage_abandon,
}


def run_garbage(port: int, scale: Scale) -> list[str]:
    """Every kind of garbage, ``garbage_rounds`` times, shuffled; returns misbehaviours."""
    rng = random.Random(scale.seed)
    kinds = list(GARBAGE) * scale.garbage_rounds
    rng.shuffle(kinds)
    seeds = [rng.randrange(2**32) for _ in kinds]
    with ThreadPoolExecutor(16, thread_name_prefix="torture-garbage") as pool:
        verdicts = pool.map(
            lambda kind, seed: GARBAGE[kind](port, random.Random(seed), scale.unit), kinds, seeds
        )
        return [
            f"{kind}: {verdict}" for kind, verdict in zip(kinds, verdicts, strict=True) if verdict
        ]


def garbage(mode: str, scale: Scale) -> Result:
    """Good clients, interleaved with every kind of bad one, all get right replies."""
    unit = scale.unit
    options: dict[str, Any] = {
        "read_timeout": GARBAGE_READ_TIMEOUT_S * unit,
        "max_request_size": GARBAGE_MAX_REQUEST_SIZE,
    }
    good = [f"g{i}" for i in range(scale.garbage_good_requests)]
    with ServerProcess(mode, unit, **options) as server, ThreadPoolExecutor(1) as side:
        bad = side.submit(run_garbage, server.port, scale)
        outcomes = run_load(
            server.address,
            good,
            concurrency=GOOD_CONCURRENCY,
            timeout_s=CLIENT_TIMEOUT_S * unit,
            cap_s=scale.phase_cap_s * unit,
        )
        misbehaved = bad.result()
        dropped = server.stop()["dropped"]
    lost = count_lost(outcomes)
    bad_count = len(GARBAGE) * scale.garbage_rounds
    return Result(
        "garbage",
        mode,
        f"{len(good)} good requests, {GOOD_CONCURRENCY} concurrent",
        f"{bad_count} bad connections: {', '.join(GARBAGE)}",
        lost,
        passed=lost == 0 and not misbehaved,
        notes=f"{len(misbehaved)} bad connections not handled as the SPEC says"
        + (f" (first: {misbehaved[0]})" if misbehaved else "")
        + f"; the server dropped {dropped}"
        + (f"; lost: {loss_kinds(outcomes)}" if lost else ""),
    )


# -- stuck and leaking handlers -------------------------------------------------------------


def beside_good_load(
    server: ServerProcess, bad: Sequence[str], good_count: int, unit: float, cap_s: float
) -> tuple[list[Outcome], list[Outcome]]:
    """Send the ``bad`` requests (all at once) and ``good_count`` good ones together."""
    with ThreadPoolExecutor(1) as side:
        bad_outcomes = side.submit(
            run_load,
            server.address,
            bad,
            concurrency=len(bad),
            timeout_s=CLIENT_TIMEOUT_S * unit,
            cap_s=cap_s,
        )
        good = run_load(
            server.address,
            [f"s{i}" for i in range(good_count)],
            concurrency=GOOD_CONCURRENCY,
            timeout_s=CLIENT_TIMEOUT_S * unit,
            cap_s=cap_s,
        )
        return bad_outcomes.result(), good


def timed_out_as_promised(outcome: Outcome, unit: float) -> bool:
    """No reply, and not before the request timeout ran out."""
    return outcome.reply == "" and outcome.latency_s >= 0.9 * STUCK_REQUEST_TIMEOUT_S * unit


def busy_processes(processes: Sequence[psutil.Process]) -> list[psutil.Process]:
    """Those of ``processes`` using more than half a core, measured over a short window."""
    busy = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.cpu_percent(CPU_WINDOW_S) > BUSY_CPU_PERCENT:
                busy.append(process)
    return busy


def stuck_aftermath(server: ServerProcess, mode: str, unit: float) -> tuple[str, str]:
    """What became of the stuck handlers: (a problem or "", a note).

    Process mode: every spinning worker must have been killed. Thread mode
    cannot kill a thread: its spinning threads are reported, not failed.
    """
    if mode == "thread":
        percent = server.process.cpu_percent(CPU_WINDOW_S)
        return "", f"the stuck threads cannot be killed: they spin on ({percent:.0f}% CPU)"
    if wait_until(lambda: not busy_processes(server.children()), SETTLE_TIMEOUT_S * unit):
        return "", "the stuck workers were killed"
    return "a spinning worker was never killed", ""


def stuck(mode: str, scale: Scale) -> Result:
    """Handlers that never return, beside good clients: the server serves on.

    Each stuck client gets no reply once ``request_timeout`` has run out, and
    no other client may lose its reply. Process mode kills the stuck
    workers; thread mode cannot kill a thread, and the table says so.
    """
    unit = scale.unit
    timeout_s = STUCK_REQUEST_TIMEOUT_S * unit
    cap_s = scale.phase_cap_s * unit
    with ServerProcess(mode, unit, request_timeout=timeout_s) as server:
        spins, good = beside_good_load(
            server, ["spin"] * scale.stuck_spinners, scale.stuck_good_requests, unit, cap_s
        )
        problem, note = stuck_aftermath(server, mode, unit)
        timed_out = server.stop()["timed_out"]
    problems = [problem] if problem else []
    untimely = sum(1 for outcome in spins if not timed_out_as_promised(outcome, unit))
    if untimely:
        problems.append(f"{untimely} stuck requests not closed at their timeout")
    lost = count_lost(good)
    if lost:
        problems.append(f"lost: {loss_kinds(good)}")
    return Result(
        "stuck",
        mode,
        f"{len(good)} good requests, {GOOD_CONCURRENCY} concurrent",
        f"{len(spins)} never-ending handlers (request_timeout {timeout_s:g} s)",
        lost,
        passed=not problems,
        notes="; ".join(problems)
        or f"{note}; good p99 {p99(good) * 1000:.0f} ms; the server counted {timed_out} timeouts",
    )


def recycling_problem(server: ServerProcess, leaks: Sequence[Outcome], scale: Scale) -> str:
    """A worker that served leaks must be replaced, and none may hold much past the cap."""
    served_by = {outcome.pid for outcome in leaks} - {None}

    def recycled() -> int:
        return len(served_by - {child.pid for child in server.children()})

    if not wait_until(lambda: recycled() > 0, SETTLE_TIMEOUT_S * scale.unit):
        return "no leaking worker was recycled"
    largest = max((child.memory_info().rss for child in server.children()), default=0)
    bar = (scale.max_worker_mib + scale.leak_mib) * MIB
    if largest > bar:
        return f"a worker holds {largest // MIB} MiB, over {bar // MIB} MiB"
    return ""


def leak(mode: str, scale: Scale) -> Result:
    """Handlers that leak memory, beside good clients: workers are recycled, nobody loses.

    Thread mode has no worker to recycle (``max_worker_memory`` is a
    process-mode option): the row is skipped.
    """
    faults = f"{scale.leak_requests} requests leaking {scale.leak_mib} MiB each "
    faults += f"(max_worker_memory {scale.max_worker_mib} MiB)"
    if mode == "thread":
        return Result("leak", mode, "-", faults, None, True, "max_worker_memory needs workers")
    unit = scale.unit
    leaks = [f"leak {scale.leak_mib}"] * scale.leak_requests
    with ServerProcess(mode, unit, max_worker_memory=scale.max_worker_mib * MIB) as server:
        cap_s = scale.phase_cap_s * unit
        leaked, good = beside_good_load(server, leaks, scale.leak_good_requests, unit, cap_s)
        problem = recycling_problem(server, leaked, scale)
        recycled = server.stop().get("recycled", "?")
    lost = count_lost(leaked + good)
    problems = [problem] if problem else []
    if lost:
        problems.append(f"lost: {loss_kinds(leaked + good)}")
    return Result(
        "leak",
        mode,
        f"{len(good)} good requests, {GOOD_CONCURRENCY} concurrent",
        faults,
        lost,
        passed=not problems,
        notes="; ".join(problems) or f"the pool counted {recycled} workers recycled",
    )


# -- soak: the footprint returns to its baseline --------------------------------------------


def soak(mode: str, scale: Scale) -> Result:
    """Tens of thousands of requests; RSS, fds, threads and children return to baseline."""
    unit = scale.unit
    warm_up = [f"w{i}" for i in range(max(scale.soak_requests // 10, scale.soak_concurrency))]
    requests = [f"k{i}" for i in range(scale.soak_requests)]
    with ServerProcess(mode, unit) as server:

        def send(batch: Sequence[str]) -> list[Outcome]:
            return run_load(
                server.address,
                batch,
                concurrency=scale.soak_concurrency,
                timeout_s=CLIENT_TIMEOUT_S * unit,
                cap_s=scale.phase_cap_s * unit,
            )

        outcomes = send(warm_up)
        baseline = server.footprint()
        outcomes += send(requests)
        loaded = server.footprint()
        settled = wait_until(
            lambda: server.footprint().within(baseline, idle_threads=scale.soak_concurrency),
            SETTLE_TIMEOUT_S * unit,
        )
        after = server.footprint()
        server.stop()
    lost = count_lost(outcomes)
    return Result(
        "soak",
        mode,
        f"{len(outcomes)} requests, {scale.soak_concurrency} concurrent",
        "none",
        lost,
        passed=lost == 0 and settled,
        notes=f"RSS {baseline.rss / MIB:.0f} MiB, {loaded.rss / MIB:.0f} after the load, "
        f"{after.rss / MIB:.0f} after {'settling' if settled else 'waiting'} "
        f"(bar {(baseline.rss * RSS_GROWTH_FACTOR + RSS_SLACK) / MIB:.0f}); fds "
        f"{baseline.fds}->{after.fds}, threads {baseline.threads}->{after.threads}, children "
        f"{baseline.children}->{after.children}"
        + (f"; lost: {loss_kinds(outcomes)}" if lost else ""),
    )


# -- hostile handlers: faults in every mode -------------------------------------------------


def fault_kept_its_promise(outcome: Outcome) -> bool:
    """A faulty handler's client gets ``""``; a str subclass is a valid reply."""
    if outcome.request.split()[1] in ANSWERED_FAULTS:
        return outcome.pid is not None
    return outcome.reply == ""


def faults(mode: str, scale: Scale) -> Result:
    """Handlers that raise anything (``BaseException`` included) or return what
    cannot be sent, beside good clients: each costs only its own reply."""
    unit = scale.unit
    kinds = list(FAULTS) * scale.fault_rounds
    bad = [f"fault {kind}" for kind in kinds]
    with ServerProcess(mode, unit) as server:
        faulty, good = beside_good_load(
            server, bad, scale.fault_good_requests, unit, scale.phase_cap_s * unit
        )
        after = send_one(server.address, "after", CLIENT_TIMEOUT_S * unit)
        failed = server.stop()["failed"]
    wrong = [outcome.request for outcome in faulty if not fault_kept_its_promise(outcome)]
    expected_failed = sum(1 for kind in kinds if kind not in ANSWERED_FAULTS)
    lost = count_lost([*good, after]) + len(wrong)
    problems = [f"{len(wrong)} faulty requests not answered as promised"] if wrong else []
    if failed != expected_failed:
        problems.append(f"the server counted {failed} failures, not {expected_failed}")
    if lost:
        problems.append(f"lost: {loss_kinds([*good, after])}")
    return Result(
        "faults",
        mode,
        f"{len(good)} good requests, {GOOD_CONCURRENCY} concurrent",
        f"{len(bad)} faulty handlers: {', '.join(FAULTS)}",
        lost,
        passed=not problems,
        notes="; ".join(problems)
        or f"{expected_failed} got '' and were counted failed, the str subclasses were "
        f"answered; good p99 {p99(good) * 1000:.0f} ms; the next request answered",
    )


# -- life-cycle misuse ----------------------------------------------------------------------

LIFECYCLE_EXPECTED = {
    "second start()": "RuntimeError",
    "run() while serving": "RuntimeError",
    "second server on the port": "OSError",
    "stats() from another thread": "ok",
    "start() after run() returned": "RuntimeError",
}
FAILED_START_EXPECTED = {
    "start() that fails": "PoolStartError",
    "client after a failed start()": "NoServerError",
}


def lifecycle(mode: str, scale: Scale) -> Result:
    """Misuse the server's life cycle while good clients are served: every misuse
    raises what ``threading.Thread`` would, and no good request is lost."""
    unit = scale.unit
    expected = {**LIFECYCLE_EXPECTED, **(FAILED_START_EXPECTED if mode == "process" else {})}
    good = [f"l{i}" for i in range(scale.lifecycle_good_requests)]
    with ServerProcess(mode, unit) as server, ThreadPoolExecutor(1) as side:
        load = side.submit(
            run_load,
            server.address,
            good,
            concurrency=GOOD_CONCURRENCY,
            timeout_s=CLIENT_TIMEOUT_S * unit,
            cap_s=scale.phase_cap_s * unit,
        )
        seen = [server.ask("misuse")["misuse"] for _ in range(scale.lifecycle_rounds)]
        outcomes = load.result()
        outcomes.append(send_one(server.address, "after", CLIENT_TIMEOUT_S * unit))
        server.stop()
    wrong = sorted(
        {f"{name}: {got}" for run in seen for name, got in run.items() if expected.get(name) != got}
        | {f"{name}: not tried" for run in seen for name in expected if name not in run}
    )
    lost = count_lost(outcomes)
    problems = [f"misuse not refused as promised: {', '.join(wrong)}"] if wrong else []
    if lost:
        problems.append(f"lost: {loss_kinds(outcomes)}")
    return Result(
        "lifecycle",
        mode,
        f"{len(outcomes)} good requests, {GOOD_CONCURRENCY} concurrent",
        f"{scale.lifecycle_rounds} rounds of: {', '.join(expected)}",
        lost,
        passed=not problems,
        notes="; ".join(problems)
        or "each misuse refused as threading.Thread would ("
        + ", ".join(sorted(set(expected.values()) - {"ok"}))
        + "); the server served on",
    )


# -- slow steady readers and big replies ----------------------------------------------------


def small_window_connection(port: int, unit: float) -> socket.socket:
    """A connection with a small receive buffer, so that the server holds the reply."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RECEIVE_BUFFER)  # before connect
    sock.settimeout(CLIENT_TIMEOUT_S * unit)
    sock.connect((HOST, port))
    return sock


def read_paced(port: int, request: bytes, bytes_per_s: float, unit: float) -> tuple[bytes, float]:
    """Send ``request``, then read until the server closes, at about ``bytes_per_s``.

    Returns:
        What came (``b""`` if the server reset the connection: a reply cut
        short is no reply) and the seconds the reading took.
    """
    with small_window_connection(port, unit) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        started = time.monotonic()
        try:
            while chunk := sock.recv(RECV_CHUNK_SIZE):
                received += chunk
                ahead_s = started + len(received) / bytes_per_s - time.monotonic()
                if ahead_s > 0:
                    time.sleep(ahead_s)  # the reader's pace, not a synchronisation
        except (ConnectionResetError, TimeoutError):
            received = bytearray()
        return bytes(received), time.monotonic() - started


def is_big_reply(data: bytes | str, size: int) -> bool:
    """Whether ``data`` is a whole ``big <size>`` reply: pid, space, size b's, CRLF."""
    raw = data.encode() if isinstance(data, str) else data
    head, _, body = raw.partition(b" ")
    return head.isdigit() and body == b"b" * size + b"\r\n"


def slowread(mode: str, scale: Scale) -> Result:
    """Clients that read big replies slowly but steadily, for several read
    timeouts each, and clients that read big replies at full speed, beside
    good clients: every reply arrives whole."""
    unit = scale.unit
    size = scale.slowread_mib * MIB
    rate = scale.slowread_mib_per_s * MIB / unit
    read_timeout = scale.slowread_read_timeout_s * unit
    request = f"big {size}\r\n".encode()
    readers = scale.slowread_readers
    with (
        ServerProcess(mode, unit, read_timeout=read_timeout) as server,
        ThreadPoolExecutor(readers + 1) as side,
    ):
        slow = [side.submit(read_paced, server.port, request, rate, unit) for _ in range(readers)]
        fast = side.submit(
            run_load,
            server.address,
            [f"big {size}"] * scale.slowread_fast_requests,
            concurrency=2,
            timeout_s=CLIENT_TIMEOUT_S * unit,
            cap_s=scale.phase_cap_s * unit,
        )
        good = run_load(
            server.address,
            [f"r{i}" for i in range(scale.slowread_good_requests)],
            concurrency=GOOD_CONCURRENCY,
            timeout_s=CLIENT_TIMEOUT_S * unit,
            cap_s=scale.phase_cap_s * unit,
        )
        readings = [future.result() for future in slow]
        fast_outcomes = fast.result()
        server.stop()
    seconds = [took for _, took in readings]
    cut = sum(1 for data, _ in readings if not is_big_reply(data, size))
    fast_cut = sum(1 for outcome in fast_outcomes if not is_big_reply(outcome.reply or "", size))
    lost = cut + fast_cut + count_lost(good)
    return Result(
        "slowread",
        mode,
        f"{len(good)} good requests, {GOOD_CONCURRENCY} concurrent; "
        f"{len(fast_outcomes)} {scale.slowread_mib} MiB replies read at full speed",
        f"{readers} clients reading {scale.slowread_mib} MiB replies at "
        f"{scale.slowread_mib_per_s:g} MiB/s (read_timeout {read_timeout:g} s)",
        lost,
        passed=lost == 0 and min(seconds) > read_timeout,
        notes=f"{readers - cut}/{readers} slow replies whole, in {min(seconds):.1f}-"
        f"{max(seconds):.1f} s each; {len(fast_outcomes) - fast_cut}/{len(fast_outcomes)} "
        "fast ones whole" + (f"; lost: {loss_kinds(good)}" if count_lost(good) else ""),
    )


# -- clients that never read ----------------------------------------------------------------


def ask_and_never_read(port: int, size: int, unit: float) -> socket.socket:
    """Ask for a ``size``-byte reply through a small window, and never read it."""
    sock = small_window_connection(port, unit)
    sock.sendall(f"big {size}\r\n".encode())
    sock.shutdown(socket.SHUT_WR)
    return sock


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of ``sock`` (Linux ``TCP_INFO``), see ``TCP_ENDED``."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def ends_with_reset(sock: socket.socket, unit: float) -> bool:
    """Read what the kernel holds: a dropped reply must end in a reset, not an EOF."""
    sock.settimeout(CLIENT_TIMEOUT_S * unit)
    try:
        while sock.recv(RECV_CHUNK_SIZE):
            pass
    except ConnectionResetError:
        return True
    return False


class PeakRss(Periodic):
    """Samples a process's RSS in a thread until the block ends; keeps the largest."""

    def __init__(self, process: psutil.Process) -> None:
        super().__init__("torture-rss")
        self._process = process
        self.peak = 0

    def _interval_s(self) -> float:
        return POLL_INTERVAL_S

    def _tick(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            self.peak = max(self.peak, self._process.memory_info().rss)


def noread(mode: str, scale: Scale) -> Result:
    """Clients that ask for big replies and never read them, beside good clients:
    the server's buffer stays bounded, each such client is dropped with a reset
    once it made no progress for the read timeout, and good clients are served."""
    unit = scale.unit
    size = scale.noread_mib * MIB
    bound = scale.noread_max_buffered_mib * MIB
    read_timeout = scale.noread_read_timeout_s * unit
    options: dict[str, Any] = {"read_timeout": read_timeout, "max_buffered_bytes": bound}
    with (
        ServerProcess(mode, unit, environment=FIXED_MMAP_THRESHOLD, **options) as server,
        ThreadPoolExecutor(1) as side,
    ):
        # One big reply read as usual first: the server sizes the replies in
        # flight by the largest recent one (before any, only max_pending bounds them).
        warm_up = send_one(server.address, f"big {size}", CLIENT_TIMEOUT_S * unit)
        baseline = server.footprint().rss
        stalled: list[socket.socket] = []
        try:
            with PeakRss(server.process) as rss:
                load = side.submit(
                    run_load,
                    server.address,
                    [f"n{i}" for i in range(scale.noread_good_requests)],
                    concurrency=GOOD_CONCURRENCY,
                    timeout_s=CLIENT_TIMEOUT_S * unit,
                    cap_s=scale.phase_cap_s * unit,
                )
                for _ in range(scale.noread_clients):
                    stalled.append(ask_and_never_read(server.port, size, unit))
                    time.sleep(NOREAD_GAP_S)  # the clients' pace, not a synchronisation
                good = load.result()
                all_dropped = wait_until(
                    lambda: all(tcp_state(sock) in TCP_ENDED for sock in stalled),
                    scale.phase_cap_s * unit,
                )
            resets = sum(1 for sock in stalled if ends_with_reset(sock, unit))
        finally:
            for sock in stalled:
                sock.close()
        server.stop()
    # The bound, plus the replies let in flight under it (the server counts each
    # as large as the last big one), each in all its copies: but not one more
    # reply per client, whatever the number of clients.
    in_flight = bound // size + 1
    bar = baseline + bound + COPIES_PER_REPLY * in_flight * size + RSS_SLACK
    grown = (rss.peak - baseline) / MIB
    lost = count_lost(good) + (0 if is_big_reply(warm_up.reply or "", size) else 1)
    problems = [] if all_dropped else ["a client that never read was never dropped"]
    if resets < len(stalled):
        problems.append(f"{len(stalled) - resets} dropped replies ended in a clean EOF")
    bar_note = f"bar {(bar - baseline) / MIB:.0f}"
    if rss.peak > bar:
        problems.append(f"the server's RSS grew {grown:.0f} MiB ({bar_note})")
    if lost:
        problems.append(f"lost: {loss_kinds(good)}")
    return Result(
        "noread",
        mode,
        f"{len(good)} good requests, {GOOD_CONCURRENCY} concurrent",
        f"{len(stalled)} clients asking for {scale.noread_mib} MiB replies and never reading "
        f"(max_buffered_bytes {scale.noread_max_buffered_mib} MiB, "
        f"read_timeout {read_timeout:g} s)",
        lost,
        passed=not problems,
        notes="; ".join(problems)
        or f"peak RSS {grown:.0f} MiB over its baseline ({bar_note}; "
        f"unbounded it would hold {len(stalled) * scale.noread_mib} MiB); {resets}/{len(stalled)} "
        f"dropped with a reset; good p99 {p99(good) * 1000:.0f} ms",
    )


# -- running --------------------------------------------------------------------------------

SCENARIOS: dict[str, Callable[[str, Scale], Result]] = {
    "chaos": chaos,
    "flood": flood,
    "slow": slow,
    "garbage": garbage,
    "stuck": stuck,
    "leak": leak,
    "soak": soak,
    "faults": faults,
    "lifecycle": lifecycle,
    "slowread": slowread,
    "noread": noread,
}
# The modes each scenario runs in: the hostile ones in every mode.
SCENARIO_MODES: dict[str, tuple[str, ...]] = {
    name: CLASSIC_MODES for name in ("chaos", "flood", "slow", "garbage", "stuck", "leak", "soak")
} | {name: tuple(MODES) for name in ("faults", "lifecycle", "slowread", "noread")}


def run_scenario(name: str, mode: str, scale: Scale) -> Result:
    """Run one scenario against one mode; an exception becomes an ERROR row."""
    started = time.monotonic()
    try:
        result = SCENARIOS[name](mode, scale)
    except Exception as exc:  # reported in the table, never hidden
        result = Result(name, mode, "-", "-", None, False, f"{type(exc).__name__}: {exc}")
    result.seconds = time.monotonic() - started
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="scripts/torture",
        description="Torture mpreqrep servers over loopback; exit 1 if a figure falls short.",
    )
    parser.add_argument("--quick", action="store_true", help="smaller counts (about half a minute)")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=list(SCENARIOS),
        default=list(SCENARIOS),
        metavar="NAME",
        help=f"scenarios to run (default: all of {', '.join(SCENARIOS)})",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=list(MODES),
        default=list(MODES),
        help="server modes: sync, thread (async_val=True), process (workers=2) and executor "
        "(a loky pool); default all, each scenario in the modes it applies to",
    )
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="write the table here")
    parser.add_argument("--seed", type=int, default=FULL.seed, help="seed of the random faults")
    parser.add_argument(
        "--unit",
        type=float,
        default=float(os.environ.get("MPREQREP_TEST_TIMEOUT_UNIT", "1.0")),
        help="time unit: every timeout is a multiple of it (raise it on slow machines)",
    )
    return parser.parse_args(argv)


def run_all(names: Sequence[str], modes: Sequence[str], scale: Scale) -> Iterator[Result]:
    """Run each scenario against each mode, saying on stderr what runs now."""
    for name in names:
        for mode in (mode for mode in modes if mode in SCENARIO_MODES[name]):
            print(f"torture: {name} / {mode} ...", file=sys.stderr, flush=True)
            result = run_scenario(name, mode, scale)
            print(f"torture: {name} / {mode}: {result.verdict}", file=sys.stderr, flush=True)
            yield result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen scenarios, print the table, optionally write it as Markdown.

    Returns:
        0 if every row passed, else 1.
    """
    args = parse_args(argv)
    scale = replace(QUICK if args.quick else FULL, unit=args.unit, seed=args.seed)
    started = time.monotonic()
    results = list(run_all(args.scenarios, args.modes, scale))
    seconds = time.monotonic() - started
    print(format_table(results))
    failed = sum(1 for result in results if not result.passed)
    print(f"\n{len(results)} runs in {seconds:.0f} s; {failed} fell short")
    if args.markdown is not None:
        args.markdown.write_text(format_markdown(results, quick=args.quick, seconds=seconds))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
