"""``executor=`` on a real Dask ``LocalCluster``: two worker processes on loopback.

The cluster starts once for the module. Its scheduler fails a task with
``KilledWorker`` as soon as one worker dies with it (``allowed-failures: 0``,
as the README recommends; Dask's default is 3), which keeps the crash test short.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dask
import distributed
import pytest

import mpreqrep
from mpreqrep import _dask
from mpreqrep._dask import dask_executor
from mpreqrep._dask_worker import run_on_worker
from workers.echo import EchoServer
from workers.primes import PrimeServer

from .conftest import UNIT, running, wait_until
from .executor_handlers import ProbeServer, UncopyableServer, copies_on_this_dask_worker
from .test_executors import (
    ECHOES,
    PRIME_LIMITS,
    ask,
    ask_all,
    ask_from_clients,
    check_crash_costs_only_its_own_request,
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
    merged = [client.submit(run_on_worker, "name", "x", pure=True) for _ in range(2)]
    assert merged[0].key == merged[1].key  # what pure=True would have done to them


def copies_per_worker(server: mpreqrep.RequestServer, dask_client: Any) -> dict[str, int]:
    """The copies each worker reported, once every connected worker has reported."""
    workers = set(dask_client.scheduler_info()["workers"])
    assert wait_until(lambda: workers <= set(server.stats()["server_copies_per_worker"]), 10 * UNIT)
    copies: dict[str, int] = server.stats()["server_copies_per_worker"]
    return copies


def check_each_worker_holds_one_copy(dask_client: Any) -> None:
    """Every connected worker unpickled exactly one copy of the server."""
    held = dask_client.run(copies_on_this_dask_worker)
    assert [len(replies) for replies in held.values()] == [1] * len(held)
    assert {replies[0].split()[1] for replies in held.values()} == {"1"}


def test_workers_get_the_server_once_then_only_requests(executor: Executor, client: Any) -> None:
    with running(ProbeServer, executor=executor) as server:
        workers = set(client.scheduler_info()["workers"])
        assert copies_per_worker(server, client) == dict.fromkeys(workers, 1)
        replies = ask_from_clients(server.address, "copies", rounds=4)
        assert copies_per_worker(server, client) == dict.fromkeys(workers, 1)
        assert server.stats()["server_copies_sent"] == len(workers)
        check_each_worker_holds_one_copy(client)
    assert {reply.split()[1] for reply in replies} == {"1"}
    assert client.run(copies_on_this_dask_worker) == {worker: [] for worker in workers}


def test_a_restarted_and_a_joining_worker_each_get_exactly_one_copy() -> None:
    with (
        distributed.LocalCluster(n_workers=2, **CLUSTER_OPTIONS) as own_cluster,
        distributed.Client(own_cluster, set_as_default=False) as own_client,
        running(ProbeServer, executor=own_client.get_executor()) as server,
    ):
        first = set(copies_per_worker(server, own_client))
        own_client.restart_workers([sorted(first)[0]])
        own_cluster.scale(3)
        own_client.wait_for_workers(3, timeout=30 * UNIT)
        now = set(own_client.scheduler_info()["workers"])
        copies = copies_per_worker(server, own_client)
        assert copies == dict.fromkeys(first | now, 1) and len(copies) == 4
        replies = ask_from_clients(server.address, "copies", rounds=2)
        assert server.stats()["server_copies_per_worker"] == copies
        check_each_worker_holds_one_copy(own_client)
    assert {reply.split()[1] for reply in replies} == {"1"}


@pytest.fixture(scope="module")
def threads_client() -> Iterator[Any]:
    """A client of a cluster whose two workers run in this process (measured by coverage)."""
    options = {**CLUSTER_OPTIONS, "processes": False}
    del options["host"]  # in-process workers talk over inproc://, not TCP
    with (
        distributed.LocalCluster(n_workers=2, **options) as local_cluster,
        distributed.Client(local_cluster, set_as_default=False) as dask_client,
    ):
        yield dask_client


def test_workers_in_this_process_each_set_a_copy_up(threads_client: Any) -> None:
    with running(ProbeServer, executor=threads_client.get_executor()) as server:
        assert ask(server.address, "pid") == f"{os.getpid()}\r\n"
        assert copies_per_worker(server, threads_client) == dict.fromkeys(
            threads_client.scheduler_info()["workers"], 1
        )


def test_a_server_the_workers_cannot_copy_fails_to_start_and_is_withdrawn(
    threads_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = UncopyableServer("127.0.0.1:0", executor=threads_client.get_executor())
    with pytest.raises(Exception, match="this server cannot be copied"):
        server.start()
    assert set(threads_client.run(plugin_names).values()) == {()}
    assert "could not withdraw the server" in caplog.text  # no worker had it


def plugin_names(dask_worker: Any) -> tuple[str, ...]:
    return tuple(name for name in dask_worker.plugins if name.startswith("mpreqrep"))


def test_a_task_for_a_server_no_longer_served_fails_with_lookuperror(
    threads_client: Any,
) -> None:
    task = threads_client.submit(run_on_worker, "mpreqrep-server-gone", "x", pure=False)
    with pytest.raises(LookupError, match="holds no server"):
        task.result(timeout=30 * UNIT)


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


def ask_one_in_flight(
    server: mpreqrep.RequestServer, request: str
) -> tuple[threading.Thread, list[str | None]]:
    """Send ``request`` from a thread of its own and wait until the server holds it."""
    replies: list[str | None] = []
    sender = threading.Thread(target=lambda: replies.append(ask(server.address, request)))
    sender.start()
    assert wait_until(lambda: server.stats()["in_flight"] == 1, 10 * UNIT)
    return sender, replies


def test_a_lost_scheduler_costs_replies_not_the_server(caplog: pytest.LogCaptureFixture) -> None:
    cluster = distributed.LocalCluster(n_workers=1, **CLUSTER_OPTIONS)
    lone_client = distributed.Client(cluster, set_as_default=False)
    try:
        with (
            caplog.at_level(logging.ERROR, logger="mpreqrep"),
            running(ProbeServer, executor=lone_client.get_executor()) as server,
        ):
            assert ask(server.address, "before") == "echo:before\r\n"
            sender, in_flight = ask_one_in_flight(server, "sleep 1")
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


def test_a_dask_client_closed_under_the_server_costs_replies_and_logs_no_stray_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Cancelling the task of a request in flight raised ClosedClientError in the
    attempt's done callback: concurrent.futures logged "exception calling callback".
    (A cluster of its own: with its client closed, the server cannot withdraw its plugin.)
    """
    with distributed.LocalCluster(n_workers=1, **CLUSTER_OPTIONS) as own_cluster:
        executor = dask_executor(own_cluster.scheduler_address)
        with caplog.at_level(logging.ERROR), running(ProbeServer, executor=executor) as server:
            assert ask(server.address, "before") == "echo:before\r\n"
            sender, in_flight = ask_one_in_flight(server, "sleep 1")
            executor.client.close()
            sender.join(30 * UNIT)
            assert in_flight == [""]
            assert ask(server.address, "after") == ""
    assert "no scheduler to submit to" in caplog.text
    assert not [r for r in caplog.records if r.name == "concurrent.futures"], caplog.text


def test_dask_executor_connects_serves_and_closes_its_client(cluster: Any) -> None:
    with (
        dask_executor(cluster.scheduler_address) as executor,
        running(EchoServer, executor=executor) as server,
    ):
        assert ask_all(server.address, ["same", "same"]) == ["same\r\n", "same\r\n"]
        assert executor.client.status == "running"
    assert executor.client.status == "closed"


def test_a_dask_executor_factory_is_connected_at_start_and_closed_at_stop(
    cluster: Any, client: Any
) -> None:
    made: list[Any] = []

    def factory() -> Executor:
        made.append(dask_executor(cluster.scheduler_address))
        return made[-1]

    with running(EchoServer, executor=factory) as server:
        assert ask(server.address, "x") == "x\r\n"
        assert wait_until(lambda: server.stats()["server_copies_sent"] == 2, 10 * UNIT)
    assert made[0].client.status == "closed"
    assert set(client.run(plugin_names).values()) == {()}


def test_dask_executor_without_a_scheduler_raises_oserror() -> None:
    with pytest.raises(OSError):
        dask_executor("tcp://127.0.0.1:9", connect_timeout_s=0.5 * UNIT)


def test_serve_with_a_scheduler_it_cannot_use_exits_after_its_error_line() -> None:
    """The failed Client's __del__, run by the collector at interpreter exit, waited
    for ever on its event loop: serve printed its error and never exited."""
    argv = ["serve", "workers.echo:EchoServer", "--address", "127.0.0.1:0", "--dask", "bad://x"]
    result = subprocess.run(
        [sys.executable, "-m", "mpreqrep", *argv],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60 * UNIT,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("mpreqrep: error: cannot use the Dask scheduler at bad://x")
    assert result.stderr.count("\n") == 1


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


class InlineExecutor(Executor):
    """Runs each call at once, in the caller's thread."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


INLINE = InlineExecutor()


class FakeTask:
    """Stands in for a ``distributed.Future``; its result fetch may fail or wait."""

    def __init__(
        self,
        status: str,
        error: BaseException | None = None,
        fetched: threading.Event | None = None,
    ) -> None:
        self.status = status
        self.error = error
        self.fetched = fetched
        self.cancelled = False
        self.callbacks: list[Any] = []

    def add_done_callback(self, callback: Any) -> None:
        self.callbacks.append(callback)

    def result(self) -> str:
        if self.fetched is not None:
            assert self.fetched.wait(30 * UNIT)
        if self.error is not None:
            raise self.error
        return "reply"

    def cancel(self) -> None:
        self.cancelled = True


class FakeClient:
    status = "running"

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
    attempt = _dask._submit_to_dask(client, (len, "x"), {"pure": False}, INLINE)
    assert client.submitted == [((len, "x"), {"pure": False})]
    (settle,) = lost.callbacks
    settle(lost)
    assert isinstance(attempt.exception(timeout=0), distributed.KilledWorker)

    finished = FakeTask("finished")
    attempt = _dask._submit_to_dask(FakeClient(finished), (len,), {}, INLINE)
    finished.callbacks[0](finished)
    assert attempt.result(timeout=0) == "reply"


def test_a_slow_fetch_does_not_hold_up_dask_s_callback_thread() -> None:
    """Dask runs every future's callbacks on one thread: a fetch from a worker that
    just died blocked it for 30 s, and another request's crash retry waited as long."""
    fetched = threading.Event()
    slow = FakeTask("finished", fetched=fetched)
    fetcher = ThreadPoolExecutor(1)
    try:
        attempt = _dask._submit_to_dask(FakeClient(slow), (len,), {}, fetcher)
        slow.callbacks[0](slow)  # returns at once: the fetch waits on the fetcher
        assert not attempt.done()
        fetched.set()
        assert attempt.result(timeout=30 * UNIT) == "reply"
    finally:
        fetcher.shutdown()


def test_cancelling_passes_both_ways_between_the_attempt_and_the_dask_task() -> None:
    task = FakeTask("pending")
    attempt = _dask._submit_to_dask(FakeClient(task), (len,), {}, INLINE)
    assert attempt.cancel() and task.cancelled
    task.callbacks[0](task)  # the task ends later: nothing more happens
    dropped = FakeTask("cancelled")
    attempt = _dask._submit_to_dask(FakeClient(dropped), (len,), {}, INLINE)
    dropped.callbacks[0](dropped)
    assert attempt.cancelled()


class SilentScheduler:
    """A client whose scheduler never forwards an event: the subscription never holds."""

    status = "running"

    def __init__(self) -> None:
        self.markers = 0
        self.withdrawn: list[str] = []

    def get_executor(self, **options: Any) -> Executor:
        return ThreadPoolExecutor(1)

    def subscribe_topic(self, topic: str, handler: Any) -> None:
        self.topic = topic

    def log_event(self, topic: str, message: Any) -> None:
        self.markers += 1

    def unsubscribe_topic(self, topic: str) -> None:
        self.withdrawn.append(topic)

    def unregister_worker_plugin(self, name: str) -> None:
        raise KeyError(name)


def test_a_subscription_the_scheduler_never_confirms_fails_the_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_dask, "DASK_CONNECT_TIMEOUT_S", 0.2 * UNIT)
    client = SilentScheduler()
    executor = _dask.DaskExecutor(client)
    server = EchoServer("127.0.0.1:0", executor=executor)
    with pytest.raises(TimeoutError, match="did not confirm the subscription"):
        server.start()
    assert client.markers >= 2 and client.withdrawn == [client.topic]
