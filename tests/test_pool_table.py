"""The supervisor's table and counters, and stopping's steps, with fake workers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from mpreqrep._pool._shutdown import SHUTDOWN_GRACE_S, Shutdown
from mpreqrep._pool._table import REMOVED, WorkerTable


@dataclass
class FakeWorker:
    pid: int
    ready: bool = True
    started_at: float = 0.0
    cause: str | None = None
    kills: list[str] = field(default_factory=list)

    def kill(self, cause: str) -> None:
        self.cause = self.cause or cause
        self.kills.append(cause)


def table_of(*workers: FakeWorker) -> WorkerTable:
    table = WorkerTable()
    for worker in workers:
        assert table.add(worker)  # type: ignore[arg-type]
    return table


def test_figures_count_workers_restarts_and_failed_starts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    serving, starting = FakeWorker(1), FakeWorker(2, ready=False)
    table = table_of(serving, starting)
    serving.cause = "odd"
    table.count_end(serving, -9)  # type: ignore[arg-type]
    table.count_end(FakeWorker(3, cause=REMOVED), 0)  # type: ignore[arg-type]
    table.count_end(FakeWorker(4), 1)  # type: ignore[arg-type]
    table.count_start_failure()
    figures = table.figures(2)
    assert (figures["workers_alive"], figures["workers_starting"]) == (1, 1)
    assert (figures["restarts_killed"], figures["restarts_crashed"]) == (1, 1)
    assert figures["start_failures"] == 1
    assert "worker 4 ended (crashed, exit status 1)" in caplog.text


def test_slow_starters_and_named_workers_are_killed() -> None:
    slow, fresh, serving = FakeWorker(1, False, 0.0), FakeWorker(2, False, 9.0), FakeWorker(3)
    table = table_of(slow, fresh, serving)
    table.kill_slow_starters(10.0, 5.0)
    table.kill([3, 99], "timed_out")
    assert (slow.kills, fresh.kills, serving.kills) == (
        ["did not start within 5.0 s"],
        [],
        ["timed_out"],
    )


def test_after_kill_all_a_new_worker_is_killed_not_taken_in() -> None:
    old = FakeWorker(1)
    table = table_of(old)
    table.kill_all()
    late = FakeWorker(2)
    assert not table.add(late)  # type: ignore[arg-type]
    assert table.closed and old.kills == ["killed"] and late.kills == ["killed"]
    assert [worker.pid for worker in table.workers()] == [1]


class FakePool:
    def __init__(self, idle: bool) -> None:
        self.idle = idle
        self.calls: list[str] = []

    def is_idle(self) -> bool:
        return self.idle

    def release(self) -> None:
        self.calls.append("release")

    def abandon(self) -> None:
        self.calls.append("abandon")


def shutdown_of(pool: FakePool, *workers: FakeWorker) -> tuple[Shutdown, WorkerTable]:
    table = table_of(*workers)
    return Shutdown(pool, table), table  # type: ignore[arg-type]


def test_stopping_waits_for_the_requests_then_releases_then_kills_after_the_grace() -> None:
    pool = FakePool(idle=False)
    serving, starting = FakeWorker(1), FakeWorker(2, ready=False)
    shutdown, table = shutdown_of(pool, serving, starting)
    shutdown.request()
    assert shutdown.wind_down(0.0, booting=False)  # requests still wait: keep serving
    pool.idle = True
    assert not shutdown.wind_down(1.0, booting=False)
    assert pool.calls == ["release"] and starting.kills == ["killed"] and not serving.kills
    assert shutdown.ending and shutdown.timeouts(1.5) == [SHUTDOWN_GRACE_S - 0.5, None]
    shutdown.wind_down(1.0 + SHUTDOWN_GRACE_S, booting=False)
    assert serving.kills == ["killed"]
    for worker in table.workers():
        table.remove(worker)  # type: ignore[arg-type]
    assert shutdown.finished()


def test_the_graceful_timeout_abandons_the_requests_and_kills_everyone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = FakePool(idle=False)
    worker = FakeWorker(1)
    shutdown, _ = shutdown_of(pool, worker)
    shutdown.arm(5.0)
    shutdown.arm(99.0)  # the first wins
    shutdown.give_up_if_due(4.9)
    assert not shutdown.given_up and shutdown.timeouts(4.0)[1] == pytest.approx(1.0)
    shutdown.give_up_if_due(5.0)
    assert shutdown.given_up and pool.calls == ["abandon"] and worker.kills == ["killed"]
    assert "graceful timeout" in caplog.text
    shutdown.give_up_if_due(6.0)  # once
    assert pool.calls == ["abandon"]


def test_figures_are_a_copy(caplog: pytest.LogCaptureFixture) -> None:
    table = table_of(FakeWorker(1))
    figures: dict[str, Any] = table.figures(1)
    figures["workers_alive"] = 5
    assert table.figures(1)["workers_alive"] == 1
