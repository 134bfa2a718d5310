"""``executor=`` with stdlib thread and process pools and loky (Dask: test_dask.py).

Real servers on loopback sockets, with pools passed as they are and pools the
server builds from a factory; small fakes for executors that break, cancel
or never finish.
"""

from __future__ import annotations

import functools
import gc
import logging
import multiprocessing
import os
import threading
import time
import weakref
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
import psutil
import pytest

import mpreqrep
from mpreqrep import _remote_worker
from mpreqrep._remote import RemoteDispatcher
from mpreqrep._remote_worker import CacheMiss, WorkerReply, install_server, run_cached
from workers.echo import EchoServer
from workers.primes import PrimeServer

from .conftest import UNIT, ask_all, running, wait_until
from .executor_handlers import ProbeServer, record_initializer_call

pytestmark = pytest.mark.timeout(60)

KINDS = ["thread", "process", "loky"]
PROCESS_KINDS = ["process", "loky"]
PRIME_LIMITS = ["0", "2", "100", "20000"]
ECHOES = ["hello", "", "with spaces  ", "ünïcode ✓"]
SPAWN = multiprocessing.get_context("spawn")  # no fork under threads


def pool_factory(kind: str, **options: Any) -> Callable[..., Executor]:
    """A two-worker pool class of the given kind, options bound (a factory)."""
    if kind == "thread":
        return functools.partial(ThreadPoolExecutor, 2, thread_name_prefix="user-pool", **options)
    if kind == "process":
        return functools.partial(ProcessPoolExecutor, 2, mp_context=SPAWN, **options)
    return functools.partial(loky.ProcessPoolExecutor, 2, **options)


@pytest.fixture(scope="module")
def pools() -> Iterator[dict[str, Executor]]:
    """One healthy pool per kind, passed as is by the tests that do not break them."""
    made = {kind: pool_factory(kind)() for kind in KINDS}
    yield made
    for pool in made.values():
        pool.shutdown(wait=True)


def ask(address: str, request: str) -> str | None:
    return mpreqrep.do_request(address, request, timeout=30 * UNIT)


def ask_from_clients(address: str, request: str, *, rounds: int, clients: int = 8) -> list[str]:
    """Send ``request`` from ``clients`` concurrent clients, ``rounds`` times; all replies."""
    replies: list[str | None] = []
    for _ in range(rounds):
        replies += ask_all(address, [request] * clients)
    assert None not in replies and "" not in replies
    return [reply for reply in replies if reply]


def copies_by_pid(replies: list[str]) -> dict[int, int]:
    """What ``copies`` replies say: each answering pid and the copies it held."""
    return {int(pid): int(copies) for pid, copies in (reply.split() for reply in replies)}


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


@pytest.mark.parametrize("kind", KINDS)
def test_a_pool_built_from_a_factory_replies_as_thread_mode_and_is_shut_down(kind: str) -> None:
    built: list[Executor] = []

    def factory(**initializer: Any) -> Executor:
        built.append(pool_factory(kind)(**initializer))
        return built[-1]

    expected = thread_mode_replies(PrimeServer, PRIME_LIMITS)
    with running(PrimeServer, executor=factory) as server:
        assert ask_all(server.address, PRIME_LIMITS) == expected
    (pool,) = built
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.submit(os.getpid)


def test_thread_pool_runs_the_server_itself(pools: dict[str, Executor]) -> None:
    with running(ProbeServer, executor=pools["thread"]) as server:
        reply = ask(server.address, "identity")
        assert "server_copies_sent" not in server.stats()
    assert reply is not None
    pid, identity, thread_name = reply.split()
    assert (int(pid), int(identity)) == (os.getpid(), id(server))
    assert thread_name.startswith("user-pool")


# -- the server reaches each worker once ---------------------------------------------


def check_one_copy_per_worker(server: mpreqrep.RequestServer, replies: list[str]) -> dict[int, int]:
    """Every worker that answered held exactly one copy, as it and the stats say."""
    held = copies_by_pid(replies)
    assert set(held.values()) == {1} and os.getpid() not in held
    stats = server.stats()
    assert stats["server_copies_per_worker"] == held
    assert stats["server_copies_sent"] == len(held)
    return held


@pytest.mark.parametrize("kind", PROCESS_KINDS)
def test_a_factory_pool_gets_the_server_once_per_worker_under_eight_clients(kind: str) -> None:
    with running(ProbeServer, executor=pool_factory(kind)) as server:
        replies = ask_from_clients(server.address, "copies", rounds=4)
        assert len(check_one_copy_per_worker(server, replies)) <= 2


def test_loky_workers_restarted_after_idling_each_get_exactly_one_copy() -> None:
    """loky ends workers idle for ``timeout`` seconds and starts new ones on demand.

    (The stdlib pool's ``max_tasks_per_child`` would restart workers too, but
    on Python 3.11 it loses tasks: 2 of 8 ``os.getpid`` calls never finish.)
    """
    with running(ProbeServer, executor=pool_factory("loky", timeout=0.2 * UNIT)) as server:
        first = copies_by_pid(ask_from_clients(server.address, "copies", rounds=1))
        assert wait_until(lambda: not any(map(psutil.pid_exists, first)), 20 * UNIT)
        replies = ask_from_clients(server.address, "copies", rounds=1)
        assert not set(copies_by_pid(replies)) & set(first)
        stats = server.stats()
    assert stats["server_copies_per_worker"] == {**first, **copies_by_pid(replies)}
    assert set(stats["server_copies_per_worker"].values()) == {1}


@pytest.mark.parametrize("kind", PROCESS_KINDS)
def test_a_users_initializer_bound_in_the_factory_still_runs(kind: str, tmp_path: Any) -> None:
    marks = tmp_path / "initialized"
    factory = pool_factory(kind, initializer=record_initializer_call, initargs=(str(marks),))
    with running(ProbeServer, executor=factory) as server:
        replies = ask_from_clients(server.address, "copies", rounds=1)
        check_one_copy_per_worker(server, replies)
    assert set(copies_by_pid(replies)) <= {int(pid) for pid in marks.read_text().split()}


def warm_up(address: str, workers: int = 2) -> list[str]:
    """Ask ``copies 0.1`` in bursts until each worker answered one, and so holds a copy."""
    replies: list[str] = []
    deadline = time.monotonic() + 30 * UNIT
    while len(copies_by_pid(replies)) < workers and time.monotonic() < deadline:
        replies += ask_from_clients(address, "copies 0.1", rounds=1, clients=4)
    assert len(copies_by_pid(replies)) == workers
    return replies


@pytest.mark.parametrize("kind", PROCESS_KINDS)
def test_a_pool_passed_as_is_gets_no_copies_once_each_worker_holds_one(
    pools: dict[str, Executor], kind: str
) -> None:
    with running(ProbeServer, executor=pools[kind]) as server:
        warm = warm_up(server.address)
        after_warm_up = server.stats()["server_copies_per_worker"]
        steady = ask_from_clients(server.address, "copies", rounds=4)
        assert server.stats()["server_copies_per_worker"] == after_warm_up
    assert set(copies_by_pid(warm + steady)) == set(after_warm_up)
    assert min(after_warm_up.values()) >= 1


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


@pytest.mark.parametrize("kind", PROCESS_KINDS)
@pytest.mark.parametrize(
    ("command", "raised"),
    [
        ("unpicklable", "tests.executor_handlers.NeedsTwoArguments"),
        ("locked", "builtins.RuntimeError"),
    ],
)
def test_an_exception_that_cannot_travel_back_costs_only_its_own_request(
    kind: str, command: str, raised: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One the server cannot unpickle broke the pool (passed as is: for good), so every
    later request got "" too."""
    pool = pool_factory(kind)()
    try:
        with (
            caplog.at_level(logging.ERROR, logger="mpreqrep"),
            running(ProbeServer, executor=pool) as server,
        ):
            assert ask(server.address, command) == ""
            assert ask_all(server.address, ["next"] * 4) == ["echo:next\r\n"] * 4
            assert server.stats()["failed"] == 1
    finally:
        pool.shutdown(wait=True)
    assert f"handle_request raised {raised}, which cannot be pickled" in caplog.text


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


@pytest.mark.parametrize("kind", PROCESS_KINDS)
def test_a_crashing_worker_costs_only_its_own_request_and_the_new_pool_one_copy_each(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="mpreqrep"),
        running(ProbeServer, executor=pool_factory(kind)) as server,
    ):
        ask_all(server.address, ["warm"] * 4)
        check_crash_costs_only_its_own_request(server)
        assert wait_until(lambda: server.stats()["served"] == 11, 5 * UNIT)
        replies = ask_from_clients(server.address, "copies", rounds=2)
        stats = server.stats()
    assert stats["executor_replacements"] >= 1 and stats["crash_retries"] >= 2
    assert stats["failed"] == 1
    assert set(stats["server_copies_per_worker"].values()) == {1}
    assert set(copies_by_pid(replies).values()) == {1}
    assert "replacing it with a new one" in caplog.text
    assert "giving up on a request" in caplog.text


@pytest.mark.parametrize("kind", PROCESS_KINDS)
def test_a_broken_pool_passed_as_is_fails_its_requests_and_says_to_pass_a_factory(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    pool = pool_factory(kind)()
    try:
        with (
            caplog.at_level(logging.ERROR, logger="mpreqrep"),
            running(ProbeServer, executor=pool) as server,
        ):
            assert ask(server.address, "crash") == ""
            assert ask(server.address, "after") == ""
            assert server.stats()["executor_replacements"] == 0
    finally:
        pool.shutdown(wait=True)
    assert "pass a factory" in caplog.text


def test_a_factory_that_returns_no_executor_fails_the_start() -> None:
    server = EchoServer("127.0.0.1:0", executor=lambda: "not an executor")
    with pytest.raises(TypeError, match="not an Executor"):
        server.start()


def test_an_executor_that_is_neither_an_executor_nor_callable_is_refused() -> None:
    with pytest.raises(TypeError, match="factory"):
        EchoServer("127.0.0.1:0", executor=4)  # type: ignore[arg-type]


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
        assert server.stats()["server_copies_per_worker"] == {os.getpid(): 1}


def test_a_factory_without_an_initializer_is_called_bare_and_its_workers_ask() -> None:
    with running(EchoServer, executor=FakeExecutor) as server:
        assert ask_all(server.address, ["a", "b"]) == ["a\r\n", "b\r\n"]
        assert server.stats()["server_copies_per_worker"] == {os.getpid(): 1}


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


def dispatcher_on(
    executor: Executor, make_executor: Callable[[], Executor] | None = None
) -> RemoteDispatcher:
    return RemoteDispatcher(executor, Echo(), token="t", owned=False, make_executor=make_executor)


@pytest.mark.parametrize("mode", ["broken", "refuse"])
def test_a_broken_executor_is_replaced_once_and_the_request_retried(mode: str) -> None:
    broken = FakeExecutor(mode)
    replacements: list[Executor] = []

    def replace() -> Executor:
        replacements.append(FakeExecutor())
        return replacements[-1]

    dispatcher = dispatcher_on(broken, replace)
    assert dispatcher.submit("again").result(timeout=10 * UNIT) == "again"
    assert dispatcher.submit("more").result(timeout=10 * UNIT) == "more"
    dispatcher.shutdown()
    assert len(replacements) == 1
    assert dispatcher.stats()["executor_replacements"] == 1


def test_a_failing_replacement_fails_the_request_with_a_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def replace() -> Executor:
        raise OSError("no more processes")

    dispatcher = dispatcher_on(FakeExecutor("broken"), replace)
    with caplog.at_level(logging.ERROR, logger="mpreqrep"):
        error = dispatcher.submit("x").exception(timeout=10 * UNIT)
    dispatcher.shutdown()
    assert isinstance(error, BrokenExecutor) and "replacement failed" in str(error)
    assert "could not replace" in caplog.text


def test_each_process_keeps_the_servers_of_its_latest_tokens_and_counts_copies() -> None:
    server = Echo()
    tokens = [f"token-{i}" for i in range(_remote_worker.MAX_CACHED_SERVERS + 1)]
    assert isinstance(run_cached(tokens[0], None, "x"), CacheMiss)
    install_server(tokens[0], server)
    for token in tokens:
        assert run_cached(token, server, "x").text == "x"  # type: ignore[union-attr]
    assert isinstance(run_cached(tokens[0], None, "x"), CacheMiss)
    assert run_cached(tokens[-1], None, "y") == WorkerReply(os.getpid(), 1, "y")
    assert run_cached(tokens[1], None, "z") == WorkerReply(os.getpid(), 1, "z")


@pytest.mark.parametrize("kind", PROCESS_KINDS)
def test_a_finished_reply_is_freed_at_once_not_by_the_garbage_collector(
    pools: dict[str, Executor], kind: str
) -> None:
    """No reference cycle holds a reply once the I/O loop lets go of its future: one
    kept each reply's text alive till the collector's next full pass (40 clients that
    never read 20 MiB replies: peak RSS 508 MiB over baseline, in scripts/torture noread)."""
    dispatcher = RemoteDispatcher(
        pools[kind], Echo(), token=f"freed-{kind}", owned=False, make_executor=None
    )
    gc.disable()
    try:
        reply = dispatcher.submit("x")  # a miss first (a pool passed as is), then sent again
        assert reply.result(timeout=30 * UNIT) == "x"
        freed = weakref.ref(reply)
        del reply
        assert wait_until(lambda: freed() is None, 10 * UNIT)
    finally:
        gc.enable()
        dispatcher.shutdown()


def test_a_resend_that_cannot_be_submitted_fails_its_request() -> None:
    dispatcher = dispatcher_on(FakeExecutor("run", "raise"))
    error = dispatcher.submit("x").exception(timeout=10 * UNIT)
    dispatcher.shutdown()
    assert isinstance(error, RuntimeError) and "after shutdown" in str(error)


def test_requests_that_time_out_while_waiting_for_their_retry_are_not_sent() -> None:
    replacement = FakeExecutor("hold")
    both_failed = threading.Event()

    def replace() -> Executor:
        both_failed.wait(10 * UNIT)
        return replacement

    dispatcher = dispatcher_on(FakeExecutor("broken"), replace)
    first, second = dispatcher.submit("first"), dispatcher.submit("second")
    both_failed.set()
    assert wait_until(lambda: len(replacement.futures) == 1, 10 * UNIT)
    second.cancel()
    first.cancel()
    assert replacement.futures[0].cancelled()
    dispatcher.shutdown()
    assert len(replacement.futures) == 1
    assert dispatcher.stats()["crash_retries"] == 1


def test_a_factory_without_a_readable_signature_is_called_bare() -> None:
    factory = functools.partial(next, iter([FakeExecutor()]))  # builtins may have none
    with running(EchoServer, executor=factory) as server:
        assert ask(server.address, "a") == "a\r\n"
