"""``executor=`` with stdlib thread and process pools and loky (Dask: test_dask.py).

Real servers on loopback sockets; small fakes for executors that break,
cancel or never finish.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import (
    BrokenExecutor,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from typing import Any

import loky
import pytest

import mpreqrep
from mpreqrep import _remote
from mpreqrep._remote import CacheMiss, RemoteDispatcher, run_cached
from workers.echo import EchoServer
from workers.primes import PrimeServer

from .conftest import UNIT, ask_all, running, wait_until
from .executor_handlers import ProbeServer

pytestmark = pytest.mark.timeout(60)

KINDS = ["thread", "process", "loky"]
PROCESS_KINDS = ["process", "loky"]
PRIME_LIMITS = ["0", "2", "100", "20000"]
ECHOES = ["hello", "", "with spaces  ", "ünïcode ✓"]


def make_pool(kind: str) -> Executor:
    """A two-worker pool of the given kind (spawned processes: no fork under threads)."""
    if kind == "thread":
        return ThreadPoolExecutor(max_workers=2, thread_name_prefix="user-pool")
    if kind == "process":
        return ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))
    pool: Executor = loky.ProcessPoolExecutor(max_workers=2)
    return pool


@pytest.fixture(scope="module")
def pools() -> Iterator[dict[str, Executor]]:
    """One healthy pool per kind, shared by the tests that do not break them."""
    made = {kind: make_pool(kind) for kind in KINDS}
    yield made
    for pool in made.values():
        pool.shutdown(wait=True)


@pytest.fixture
def fresh_pool(request: pytest.FixtureRequest) -> Iterator[Executor]:
    """A pool of its own for a test that breaks it (``request.param`` is the kind)."""
    pool = make_pool(request.param)
    yield pool
    pool.shutdown(wait=True)


def ask(address: str, request: str) -> str | None:
    return mpreqrep.do_request(address, request, timeout=30 * UNIT)


def warm_up(address: str, workers: int = 2) -> list[str | None]:
    """Ask ``copies`` in bursts until each worker answered one, and so holds a copy."""
    replies: list[str | None] = []
    for _ in range(20):
        replies += ask_all(address, ["copies"] * 4)
        if len({reply.split()[0] for reply in replies if reply}) == workers:
            break
    return replies


def ask_from_clients(address: str, request: str, *, rounds: int, clients: int = 8) -> list[str]:
    """Send ``request`` from ``clients`` concurrent clients, ``rounds`` times; all replies."""
    replies: list[str | None] = []
    for _ in range(rounds):
        replies += ask_all(address, [request] * clients)
    assert None not in replies and "" not in replies
    return [reply for reply in replies if reply]


def thread_mode_replies(server_class: type[mpreqrep.RequestServer], texts: list[str]) -> list[Any]:
    with running(server_class) as server:
        return [ask(server.address, text) for text in texts]


# -- same replies everywhere -----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("server_class", "texts"), [(PrimeServer, PRIME_LIMITS), (EchoServer, ECHOES)]
)
def test_replies_match_thread_mode(
    pools: dict[str, Executor],
    kind: str,
    server_class: type[mpreqrep.RequestServer],
    texts: list[str],
) -> None:
    expected = thread_mode_replies(server_class, texts)
    with running(server_class, executor=pools[kind]) as server:
        assert ask_all(server.address, texts) == expected
    assert None not in expected


def test_thread_pool_runs_the_server_itself(pools: dict[str, Executor]) -> None:
    with running(ProbeServer, executor=pools["thread"]) as server:
        reply = ask(server.address, "identity")
        assert "server_copies_sent" not in server.stats()
    assert reply is not None
    pid, identity, thread_name = reply.split()
    assert (int(pid), int(identity)) == (os.getpid(), id(server))
    assert thread_name.startswith("user-pool")


def check_server_reaches_each_worker_once(executor: Executor, steady_requests: int) -> set[str]:
    """Warm two workers up, then check no further copies of the server are sent.

    Returns:
        The pids of the workers that answered.
    """
    with running(ProbeServer, executor=executor) as server:
        warm = warm_up(server.address)
        copies_after_warmup = server.stats()["server_copies_sent"]
        steady = ask_all(server.address, ["copies"] * steady_requests)
        assert server.stats()["server_copies_sent"] == copies_after_warmup
    replies = [reply.split() for reply in warm + steady if reply is not None]
    assert len(replies) == len(warm) + steady_requests
    copies_per_pid = {pid: int(copies) for pid, copies in replies}
    assert len(copies_per_pid) == 2
    assert 2 <= copies_after_warmup <= len(warm)
    assert sum(copies_per_pid.values()) <= copies_after_warmup
    return set(copies_per_pid)


@pytest.mark.parametrize("kind", PROCESS_KINDS)
def test_workers_get_the_server_once_then_only_requests(
    pools: dict[str, Executor], kind: str
) -> None:
    pids = check_server_reaches_each_worker_once(pools[kind], steady_requests=30)
    assert str(os.getpid()) not in pids


@pytest.mark.parametrize("kind", PROCESS_KINDS)
def test_users_executor_keeps_running_after_the_server_stops(
    pools: dict[str, Executor], kind: str
) -> None:
    with running(EchoServer, executor=pools[kind]) as server:
        assert ask(server.address, "x") == "x\r\n"
    assert pools[kind].submit(os.getpid).result(timeout=30 * UNIT) != os.getpid()


# -- faults ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_remote_exception_logs_a_traceback_and_closes_without_reply(
    pools: dict[str, Executor], kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="mpreqrep"),
        running(ProbeServer, executor=pools[kind]) as server,
    ):
        assert ask(server.address, "raise") == ""
        assert ask(server.address, "next") == "echo:next\r\n"
        assert server.stats()["failed"] == 1
    failures = [r for r in caplog.records if "handle_request failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None
    assert "handler exploded remotely" in caplog.text


def check_crash_costs_only_its_own_request(server: mpreqrep.RequestServer) -> None:
    """Three requests in flight beside one that kills its worker all get their replies,
    and the server serves on."""
    replies: list[str | None] = []
    sender = threading.Thread(
        target=lambda: replies.extend(ask_all(server.address, ["sleep 0.5"] * 3))
    )
    sender.start()
    assert wait_until(lambda: server.stats()["in_flight"] == 3, 10 * UNIT)
    assert ask(server.address, "crash") == ""
    sender.join(60 * UNIT)
    assert replies == ["slept 0.5\r\n"] * 3
    assert ask_all(server.address, ["after"] * 4) == ["echo:after\r\n"] * 4


@pytest.mark.parametrize("fresh_pool", PROCESS_KINDS, indirect=True)
def test_a_crashing_worker_costs_only_its_own_request(
    fresh_pool: Executor, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="mpreqrep"),
        running(ProbeServer, executor=fresh_pool) as server,
    ):
        ask_all(server.address, ["warm"] * 4)
        check_crash_costs_only_its_own_request(server)
        assert wait_until(lambda: server.stats()["served"] == 11, 5 * UNIT)
        stats = server.stats()
    assert stats["executor_replacements"] >= 1 and stats["crash_retries"] >= 2
    assert stats["failed"] == 1
    assert "replacing it with a new one" in caplog.text
    assert "giving up on a request" in caplog.text


class FakeExecutor(Executor):
    """Handles each call as its mode says (the last mode repeats): run it at once
    in the caller, fail it as broken, cancel it, hold it forever, or refuse it
    (``BrokenExecutor`` or ``RuntimeError`` from ``submit``)."""

    def __init__(self, *modes: str) -> None:
        self.modes = modes or ("run",)
        self.futures: list[Future[Any]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        mode = self.modes[min(len(self.futures), len(self.modes) - 1)]
        future: Future[Any] = Future()
        self.futures.append(future)
        if mode == "refuse":
            raise BrokenExecutor("broken before this call")
        if mode == "raise":
            raise RuntimeError("cannot schedule new futures after shutdown")
        if mode == "run":
            future.set_result(fn(*args, **kwargs))
        elif mode == "broken":
            future.set_exception(BrokenExecutor("a worker died"))
        elif mode == "cancel":
            future.cancel()
        return future


def test_an_in_process_executor_of_unknown_kind_gets_the_server_on_its_first_miss() -> None:
    with running(EchoServer, executor=FakeExecutor()) as server:
        assert [ask(server.address, "a"), ask(server.address, "b")] == ["a\r\n", "b\r\n"]
        assert server.stats()["server_copies_sent"] == 1


@pytest.mark.parametrize(
    ("mode", "message"),
    [("broken", "mpreqrep cannot replace it"), ("cancel", "the executor cancelled")],
)
def test_an_executor_that_fails_every_call_costs_replies_not_the_server(
    mode: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="mpreqrep"),
        running(EchoServer, executor=FakeExecutor(mode)) as server,
    ):
        assert ask_all(server.address, ["a", "b"]) == ["", ""]
        assert ask(server.address, "c") == ""
        assert server.stats()["failed"] == 3
    assert message in caplog.text


def test_request_timeout_cancels_the_pending_call() -> None:
    executor = FakeExecutor("hold")
    with running(EchoServer, executor=executor, request_timeout=0.2 * UNIT) as server:
        assert ask(server.address, "never") == ""
        assert server.stats()["timed_out"] == 1
    assert executor.futures[0].cancelled()


# -- the dispatcher and the cache, without sockets ---------------------------------------


class Echo:
    def handle_request(self, request: str) -> str:
        return request


@pytest.mark.parametrize("mode", ["broken", "refuse"])
def test_a_broken_executor_is_replaced_once_and_the_request_retried(mode: str) -> None:
    broken = FakeExecutor(mode)
    replacements: list[Executor] = []

    def replace(executor: Executor) -> Executor:
        replacements.append(FakeExecutor())
        return replacements[-1]

    dispatcher = RemoteDispatcher(broken, Echo(), replace=replace)
    assert dispatcher.submit("again").result(timeout=10 * UNIT) == "again"
    assert dispatcher.submit("more").result(timeout=10 * UNIT) == "more"
    dispatcher.shutdown()
    assert len(replacements) == 1
    assert dispatcher.stats()["executor_replacements"] == 1


def test_a_failing_replacement_fails_the_request_with_a_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def replace(executor: Executor) -> Executor:
        raise OSError("no more processes")

    dispatcher = RemoteDispatcher(FakeExecutor("broken"), Echo(), replace=replace)
    with caplog.at_level(logging.ERROR, logger="mpreqrep"):
        error = dispatcher.submit("x").exception(timeout=10 * UNIT)
    dispatcher.shutdown()
    assert isinstance(error, BrokenExecutor) and "replacement failed" in str(error)
    assert "could not replace" in caplog.text


def test_each_process_caches_the_servers_of_its_latest_tokens() -> None:
    server = Echo()
    tokens = [f"token-{i}" for i in range(_remote.MAX_CACHED_SERVERS + 1)]
    assert isinstance(run_cached(tokens[0], None, "x"), CacheMiss)
    for token in tokens:
        assert run_cached(token, server, "x") == "x"
    assert isinstance(run_cached(tokens[0], None, "x"), CacheMiss)
    assert run_cached(tokens[-1], None, "y") == "y"


def test_a_resend_that_cannot_be_submitted_fails_its_request() -> None:
    dispatcher = RemoteDispatcher(FakeExecutor("run", "raise"), Echo(), replace=None)
    error = dispatcher.submit("x").exception(timeout=10 * UNIT)
    dispatcher.shutdown()
    assert isinstance(error, RuntimeError) and "after shutdown" in str(error)


def test_requests_that_time_out_while_waiting_for_their_retry_are_not_sent() -> None:
    replacement = FakeExecutor("hold")
    both_failed = threading.Event()

    def replace(executor: Executor) -> Executor:
        both_failed.wait(10 * UNIT)
        return replacement

    dispatcher = RemoteDispatcher(FakeExecutor("broken"), Echo(), replace=replace)
    first, second = dispatcher.submit("first"), dispatcher.submit("second")
    both_failed.set()
    assert wait_until(lambda: len(replacement.futures) == 1, 10 * UNIT)
    second.cancel()
    first.cancel()
    assert replacement.futures[0].cancelled()
    dispatcher.shutdown()
    assert len(replacement.futures) == 1
    assert dispatcher.stats()["crash_retries"] == 1
