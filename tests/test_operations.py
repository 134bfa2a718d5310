"""Operating process mode like gunicorn, through the Python API: bounded shutdown,
recycling by count, resizing and rolling restarts, with real workers and sockets."""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

import mpreqrep

from .client_load import Load
from .conftest import UNIT, running, wait_until
from .ops_handlers import OpsServer

pytestmark = pytest.mark.timeout(90 * UNIT)


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def worker_pids(server: mpreqrep.RequestServer) -> set[int]:
    return {worker["pid"] for worker in server.stats()["workers"]}


@contextmanager
def load(address: str, clients: int, limit: int = 10_000, text: str = "pid") -> Iterator[Load]:
    """Client threads sending ``text`` while the block runs; stopped and joined after."""
    running_load = Load(address, clients, limit=limit, text=text, timeout_s=30 * UNIT)
    try:
        yield running_load
    finally:
        running_load.finish(60 * UNIT)


def request_in_thread(address: str, text: str) -> tuple[threading.Thread, list[str | None]]:
    replies: list[str | None] = []
    thread = threading.Thread(
        target=lambda: replies.append(mpreqrep.do_request(address, text, timeout=90 * UNIT))
    )
    thread.start()
    return thread, replies


# -- bounded shutdown ----------------------------------------------------------------------


@pytest.mark.parametrize("frozen", [False, True], ids=["running", "frozen"])
def test_stop_kills_what_runs_past_the_graceful_timeout(frozen: bool, tmp_path: Path) -> None:
    server = OpsServer("127.0.0.1:0", workers=2, graceful_timeout=1.0 * UNIT)
    server.start()
    pids = worker_pids(server)
    marker = tmp_path / "held"
    thread, replies = request_in_thread(server.address, f"hold:{marker}")
    assert wait_until(marker.exists, 30 * UNIT)
    holder = int(marker.read_text())
    if frozen:
        os.kill(holder, signal.SIGSTOP)  # a worker this test's server started
    started = time.monotonic()
    server.stop()
    server.join(30 * UNIT)
    elapsed = time.monotonic() - started
    assert not server.is_alive()
    assert 1.0 * UNIT <= elapsed < 4.0 * UNIT, elapsed
    thread.join(30 * UNIT)
    assert replies == [""]  # killed: no reply
    assert wait_until(lambda: not any(alive(pid) for pid in pids), 10 * UNIT)


def test_requests_queued_behind_an_abandoned_one_get_no_reply_either(tmp_path: Path) -> None:
    server = OpsServer("127.0.0.1:0", workers=2, graceful_timeout=0.5 * UNIT)
    server.start()
    markers = [tmp_path / f"held{index}" for index in range(2)]
    held = [request_in_thread(server.address, f"hold:{marker}") for marker in markers]
    assert wait_until(lambda: all(marker.exists() for marker in markers), 30 * UNIT)
    queued = [request_in_thread(server.address, "pid") for _ in range(4)]
    assert wait_until(lambda: server.stats()["in_flight"] == 6, 30 * UNIT)
    server.stop()
    server.join(30 * UNIT)
    assert not server.is_alive()
    for thread, replies in held + queued:
        thread.join(30 * UNIT)
        assert replies == [""]


def test_requests_that_finish_within_the_graceful_timeout_are_answered() -> None:
    server = OpsServer("127.0.0.1:0", workers=1, graceful_timeout=30 * UNIT)
    server.start()
    thread, replies = request_in_thread(server.address, f"sleep:{0.3 * UNIT}")
    assert wait_until(lambda: server.stats()["in_flight"] == 1, 30 * UNIT)
    server.stop()
    server.join(30 * UNIT)
    thread.join(30 * UNIT)
    assert replies and replies[0] and replies[0].strip().isdigit()


# -- recycling by count ----------------------------------------------------------------


def test_max_requests_recycles_workers_without_losing_a_request() -> None:
    with running(OpsServer, workers=2, max_requests=10, max_requests_jitter=3) as server:
        with load(server.address, clients=4) as clients:
            assert wait_until(lambda: server.stats()["restarts_recycled"] >= 3, 60 * UNIT)
        assert clients.failures() == 0, clients.errors
        assert len(clients.pids()) >= 4  # workers rotated
        stats = server.stats()
        assert stats["restarts_crashed"] == 0 and stats["failed"] == 0
        assert wait_until(lambda: server.stats()["workers_alive"] == 2, 30 * UNIT)


def serving_counts(log: str, initial: int) -> list[int]:
    """How many workers served after each retirement or arrival the supervisor logged."""
    serving, counts = initial, []
    for line in log.splitlines():
        if re.search(r"worker \d+ retires", line):
            serving -= 1
        elif re.search(r"worker \d+ is ready", line):
            serving += 1
        else:
            continue
        counts.append(serving)
    return counts


def test_workers_all_past_the_memory_cap_retire_one_at_a_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Memory recycling takes the turnover's path, as max_requests does: with every
    worker past the cap (1 byte), they rotate, never all retired at once, none lost."""
    caplog.set_level(logging.INFO, logger="mpreqrep")
    with running(OpsServer, workers=2, max_worker_memory=1) as server:
        with load(server.address, clients=4) as clients:
            assert wait_until(lambda: server.stats()["restarts_recycled"] >= 4, 60 * UNIT)
        assert clients.failures() == 0
        assert len(clients.pids()) >= 4  # workers rotated
        assert server.stats()["restarts_crashed"] == 0
    counts = serving_counts(caplog.text, initial=2)
    assert len([line for line in caplog.text.splitlines() if "retires (recycled)" in line]) >= 4
    assert min(counts) >= 1, counts


def test_stopping_while_a_recycled_worker_drains_is_clean(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its channel is closed before its process ends: stopping then must not watch it."""
    with (
        running(OpsServer, workers=2, max_requests=5) as server,
        load(server.address, clients=4) as clients,
    ):
        assert wait_until(lambda: server.stats()["restarts_recycled"] >= 1, 60 * UNIT)
    assert clients.failures() == 0, clients.errors
    assert "supervision failed" not in caplog.text


# -- resizing --------------------------------------------------------------------------


def test_resize_adds_workers_and_removes_them_after_they_drain(tmp_path: Path) -> None:
    with running(OpsServer, workers=2) as server:
        server.resize(3)
        assert wait_until(lambda: server.stats()["workers_alive"] == 3, 30 * UNIT)
        marker = tmp_path / "held"
        thread, replies = request_in_thread(server.address, f"hold:{marker}")
        assert wait_until(marker.exists, 30 * UNIT)
        server.resize(1)
        assert wait_until(lambda: server.stats()["workers_wanted"] == 1, 10 * UNIT)
        Path(f"{marker}.release").touch()
        thread.join(30 * UNIT)
        assert replies and replies[0] and replies[0].strip().isdigit()  # drained, answered
        # The worker list leaves out a process that has exited; the table counts it
        # until the supervisor has reaped it, a moment later: wait for both.
        assert wait_until(
            lambda: len(worker_pids(server)) == 1 and server.stats()["workers_alive"] == 1,
            30 * UNIT,
        )
        stats = server.stats()
        assert stats["failed"] == 0
        assert sum(stats[f"restarts_{cause}"] for cause in ("crashed", "killed")) == 0


def test_resize_and_restart_need_process_mode_and_sane_counts() -> None:
    with running() as server:
        with pytest.raises(RuntimeError, match="process mode"):
            server.resize(2)
        with pytest.raises(RuntimeError, match="process mode"):
            server.restart_workers()
    with running(OpsServer, workers=1) as server:
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ValueError, match="at least 1"):
                server.resize(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "options",
    [
        {"max_requests": 0},
        {"max_requests": 2.5},
        {"max_requests": 5, "max_requests_jitter": -1},
        {"graceful_timeout": 0},
        {"graceful_timeout": float("nan")},
    ],
)
def test_bad_operation_options_are_value_errors(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        OpsServer("127.0.0.1:0", workers=1, **options)  # type: ignore[arg-type]


# -- rolling restart -----------------------------------------------------------------------


def test_restart_workers_replaces_every_worker_without_a_failed_request() -> None:
    with running(OpsServer, workers=2) as server:
        old = worker_pids(server)
        with load(server.address, clients=4) as clients:
            assert wait_until(lambda: len(clients.replies) >= 20, 30 * UNIT)
            server.restart_workers()
            assert wait_until(
                lambda: not worker_pids(server) & old and len(worker_pids(server)) == 2, 60 * UNIT
            )
            seen = len(clients.replies)
            assert wait_until(lambda: len(clients.replies) >= seen + 20, 30 * UNIT)
        assert clients.failures() == 0, clients.errors
        assert not {int(pid) for pid in clients.pids()} - old - worker_pids(server)
        assert wait_until(lambda: server.stats()["restarts_reloaded"] == 2, 30 * UNIT)
        assert not any(alive(pid) for pid in old)


def test_the_whoami_worker_replies_its_pid_after_an_optional_sleep() -> None:
    from workers.whoami import WhoAmIServer

    server = WhoAmIServer("127.0.0.1:0")
    try:
        assert server.handle_request("\r\n") == str(os.getpid())
        assert server.handle_request("0.01\r\n") == str(os.getpid())
        with pytest.raises(ValueError):
            server.handle_request("-1")
    finally:
        server.stop()
