"""``executor=`` on a real Dask ``LocalCluster``: two worker processes on loopback.

The cluster starts once for the module. Its scheduler fails a task with
``KilledWorker`` as soon as one worker dies with it (``allowed-failures: 0``,
as the README recommends; Dask's default is 3), which keeps the crash test short.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import dask
import distributed
import pytest

import mpreqrep
from mpreqrep import _remote
from mpreqrep._remote import dask_executor, run_cached
from workers.echo import EchoServer
from workers.primes import PrimeServer

from .conftest import UNIT, running, wait_until
from .executor_handlers import ProbeServer
from .test_executors import (
    ECHOES,
    PRIME_LIMITS,
    ask,
    ask_all,
    check_crash_costs_only_its_own_request,
    check_server_reaches_each_worker_once,
    thread_mode_replies,
)

pytestmark = pytest.mark.timeout(60)

CLUSTER_OPTIONS: dict[str, Any] = {
    "processes": True,
    "threads_per_worker": 1,
    "host": "127.0.0.1",
    "dashboard_address": ":0",
    "silence_logs": logging.CRITICAL,
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        distributed.LocalCluster(n_workers=2, **CLUSTER_OPTIONS) as local_cluster,
    ):
        yield local_cluster


@pytest.fixture(scope="module")
def client(cluster: Any) -> Iterator[Any]:
    with distributed.Client(cluster, set_as_default=False) as dask_client:
        yield dask_client


@pytest.fixture
def executor(client: Any) -> Executor:
    """Dask's own executor, with its default ``pure=True``."""
    dask_executor: Executor = client.get_executor()
    return dask_executor


@pytest.mark.parametrize(
    ("server_class", "texts"), [(PrimeServer, PRIME_LIMITS), (EchoServer, ECHOES)]
)
def test_replies_match_thread_mode(
    executor: Executor, server_class: type[mpreqrep.RequestServer], texts: list[str]
) -> None:
    expected = thread_mode_replies(server_class, texts)
    with running(server_class, executor=executor) as server:
        assert ask_all(server.address, texts) == expected


def test_identical_requests_each_run_although_dask_would_merge_them(
    executor: Executor, client: Any
) -> None:
    with running(ProbeServer, executor=executor) as server:
        assert ask(server.address, "warm") == "echo:warm\r\n"
        first, second = ask_all(server.address, ["unique 0.3", "unique 0.3"])
    assert first and second and first != second
    merged = [client.submit(run_cached, "t", None, "x", pure=True) for _ in range(2)]
    assert merged[0].key == merged[1].key  # what pure=True would have done to them


def test_workers_get_the_server_once_then_only_requests(executor: Executor) -> None:
    check_server_reaches_each_worker_once(executor, steady_requests=10)


def test_remote_exception_logs_a_traceback_and_closes_without_reply(
    executor: Executor, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="mpreqrep"),
        running(ProbeServer, executor=executor) as server,
    ):
        assert ask(server.address, "raise") == ""
        assert ask(server.address, "next") == "echo:next\r\n"
    failures = [r for r in caplog.records if "handle_request failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None
    assert "handler exploded remotely" in caplog.text


def test_a_worker_dying_mid_request_costs_only_that_request(
    executor: Executor, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="mpreqrep"),
        running(ProbeServer, executor=executor) as server,
    ):
        check_crash_costs_only_its_own_request(server)
    assert "KilledWorker" in caplog.text
    assert "giving up on a request" in caplog.text
    client.wait_for_workers(2, timeout=30 * UNIT)


def test_a_lost_scheduler_costs_replies_not_the_server(caplog: pytest.LogCaptureFixture) -> None:
    cluster = distributed.LocalCluster(n_workers=1, **CLUSTER_OPTIONS)
    lone_client = distributed.Client(cluster, set_as_default=False)
    try:
        with (
            caplog.at_level(logging.ERROR, logger="mpreqrep"),
            running(ProbeServer, executor=lone_client.get_executor()) as server,
        ):
            assert ask(server.address, "before") == "echo:before\r\n"
            in_flight: list[str | None] = []
            sender = threading.Thread(
                target=lambda: in_flight.append(ask(server.address, "sleep 1"))
            )
            sender.start()
            assert wait_until(lambda: server.stats()["in_flight"] == 1, 10 * UNIT)
            cluster.close()
            sender.join(30 * UNIT)
            assert in_flight == [""]
            assert ask(server.address, "offline") == ""
            assert server.stats()["failed"] == 2
    finally:
        lone_client.close()
        cluster.close()
    assert "the executor cancelled the request" in caplog.text
    assert "no scheduler to submit to" in caplog.text


def test_dask_executor_connects_serves_and_closes_its_client(cluster: Any) -> None:
    with (
        dask_executor(cluster.scheduler_address) as executor,
        running(EchoServer, executor=executor) as server,
    ):
        assert ask_all(server.address, ["same", "same"]) == ["same\r\n", "same\r\n"]
    assert executor.client.status == "closed"


def test_dask_executor_without_a_scheduler_raises_oserror() -> None:
    with pytest.raises(OSError):
        dask_executor("tcp://127.0.0.1:9", connect_timeout_s=0.5 * UNIT)


def test_dask_executor_without_distributed_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ImportError, match=r"mpreqrep\[dask\]"):
        dask_executor("tcp://127.0.0.1:9")


def test_cli_serves_on_the_cluster_with_dask_option(cluster: Any) -> None:
    command = [sys.executable, "-m", "mpreqrep", "serve", "workers.primes:PrimeServer"]
    command += ["--dask", cluster.scheduler_address, "--address", "localhost:0"]
    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        address = process.stdout.readline().rsplit(" ", 1)[-1].strip()
        assert mpreqrep.do_request(address, "1000", 60 * UNIT) == "168\r\n"
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60 * UNIT) == 0


class FakeTask:
    """Stands in for a ``distributed.Future`` whose result fetch fails."""

    def __init__(self, status: str, error: BaseException | None = None) -> None:
        self.status = status
        self.error = error
        self.cancelled = False
        self.callbacks: list[Any] = []

    def add_done_callback(self, callback: Any) -> None:
        self.callbacks.append(callback)

    def result(self) -> str:
        if self.error is not None:
            raise self.error
        return "reply"

    def cancel(self) -> None:
        self.cancelled = True


class FakeClient:
    def __init__(self, task: FakeTask) -> None:
        self.task = task
        self.submitted: list[tuple[Any, ...]] = []

    def submit(self, *call: Any, **options: Any) -> FakeTask:
        self.submitted.append((call, options))
        return self.task


def test_a_result_that_cannot_be_fetched_fails_the_attempt_instead_of_hanging() -> None:
    """distributed 2026.8's ClientExecutor left such a future pending for ever."""
    lost = FakeTask("finished", distributed.KilledWorker("task", None, 1))
    client = FakeClient(lost)
    attempt = _remote._submit_to_dask(client, (len, "x"), {"pure": False})
    assert client.submitted == [((len, "x"), {"pure": False})]
    (settle,) = lost.callbacks
    settle(lost)
    assert isinstance(attempt.exception(timeout=0), distributed.KilledWorker)

    finished = FakeTask("finished")
    attempt = _remote._submit_to_dask(FakeClient(finished), (len,), {})
    finished.callbacks[0](finished)
    assert attempt.result(timeout=0) == "reply"


def test_cancelling_passes_both_ways_between_the_attempt_and_the_dask_task() -> None:
    task = FakeTask("pending")
    attempt = _remote._submit_to_dask(FakeClient(task), (len,), {})
    assert attempt.cancel() and task.cancelled
    task.callbacks[0](task)  # the task ends later: nothing more happens
    dropped = FakeTask("cancelled")
    attempt = _remote._submit_to_dask(FakeClient(dropped), (len,), {})
    dropped.callbacks[0](dropped)
    assert attempt.cancelled()
