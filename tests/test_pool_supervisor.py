"""The pool's supervisor with real workers: what heals, and what ends the server.

An exception that escapes supervision and passes that keep failing stop the
server with :attr:`RequestServer.failure` (and ``mpreqrep serve`` with exit
status 1); a removed worker socket is replaced and the pool heals.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import psutil
import pytest

import mpreqrep
from mpreqrep._pool import PoolFailedError, PoolStartError, ProcessPoolDispatcher, _failures

from .conftest import UNIT, running, wait_until
from .ops_handlers import OpsServer
from .pool_handlers import Commands, Ledger
from .supervision_handlers import raise_and_wake, supervisor_thread
from .test_cli import ServeProcess, serve_cli, start
from .test_operations import alive, request_in_thread, worker_pids

__all__ = ["serve_cli"]  # the fixture, used by name

pytestmark = pytest.mark.timeout(90 * UNIT)


def epoll_fds() -> set[int]:
    """This process's epoll file descriptors (Linux)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[eventpoll]":
                found.add(int(name))
        except OSError:  # the listing's own descriptor, closed meanwhile
            pass
    return found


def worker_socket_paths() -> set[str]:
    """The pools' Unix socket files in this process (the listener's name shows on the
    connections it accepted too)."""
    return {
        conn.laddr
        for conn in psutil.Process().net_connections(kind="unix")
        if conn.laddr and os.path.basename(conn.laddr) == "channels"
    }


@pytest.fixture
def held(tmp_path: Path) -> Iterator[Path]:
    """A marker for ``hold:`` requests, released at the end."""
    marker = tmp_path / "held"
    yield marker
    Path(f"{marker}.release").touch()


# -- what ends the server ------------------------------------------------------------------


def test_an_exception_escaping_supervision_stops_the_server_with_a_failure(
    held: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = OpsServer("127.0.0.1:0", workers=2)
    server.start()
    pids = worker_pids(server)
    assert server.failure is None
    thread, replies = request_in_thread(server.address, f"hold:{held}")
    assert wait_until(held.exists, 30 * UNIT)
    raise_and_wake(supervisor_thread(), SystemExit, lambda: server.resize(2))
    server.join(30 * UNIT)
    assert not server.is_alive()  # stopped by itself
    thread.join(30 * UNIT)
    assert replies == [""]  # the request it held failed with the pool
    failure = server.failure
    assert isinstance(failure, PoolFailedError)
    assert isinstance(failure.__cause__, SystemExit)
    with pytest.raises(mpreqrep.NoServerError):
        mpreqrep.do_request(server.address, "late", timeout=5 * UNIT)
    assert wait_until(lambda: not any(alive(pid) for pid in pids), 10 * UNIT)
    assert "the process pool cannot continue: SystemExit" in caplog.text
    server.stop()  # harmless afterwards
    assert server.failure is failure


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="epoll: Linux")
def test_passes_that_keep_failing_fail_the_pool_and_its_requests(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A broken selector (its epoll descriptor clobbered, as by a stray dup2) fails every
    pass: after the limit, the pool fails with the selector's error as the cause."""
    monkeypatch.setattr(_failures, "FAILING_PASSES_LIMIT_S", 1.0 * UNIT)
    before = epoll_fds()
    dispatcher = ProcessPoolDispatcher(
        Commands(), 1, request_timeout_s=None, max_worker_memory=None
    )
    (selector_fd,) = epoll_fds() - before
    failures: list[BaseException] = []
    failed = threading.Event()
    dispatcher.on_failure(lambda failure: (failures.append(failure), failed.set()))
    dispatcher.start()
    pids = worker_pids_of(dispatcher)
    pending: Future[str] = dispatcher.submit(f"sleep:{30 * UNIT}")
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(devnull, selector_fd)  # the selector's descriptor is now /dev/null
        dispatcher.resize(1)  # wakes the supervisor: every pass fails from now on
        assert failed.wait(30 * UNIT)
    finally:
        os.close(devnull)
    (failure,) = failures
    assert isinstance(failure, PoolFailedError) and "every pass" in str(failure)
    assert isinstance(failure.__cause__, OSError)
    assert isinstance(pending.exception(timeout=10 * UNIT), RuntimeError)
    assert isinstance(dispatcher.submit("echo:late").exception(timeout=0), RuntimeError)
    assert "supervision failed; it goes on" in caplog.text  # tolerated until the limit
    dispatcher.shutdown()
    assert not any(alive(pid) for pid in pids)


def worker_pids_of(dispatcher: ProcessPoolDispatcher) -> set[int]:
    return {worker["pid"] for worker in dispatcher.stats()["workers"]}


def test_a_failure_while_starting_is_a_pool_start_error(tmp_path: Path) -> None:
    slow = Ledger(str(tmp_path / "ledger"), load_delay_s=60 * UNIT)  # still starting throughout
    dispatcher = ProcessPoolDispatcher(slow, 1, request_timeout_s=None, max_worker_memory=None)
    calls: list[BaseException] = []
    dispatcher.on_failure(calls.append)

    before = worker_socket_paths()

    def end_supervision_once_started() -> None:
        # Once the supervisor thread has accepted the worker's lifeline, it is done
        # spawning (loky's spawn, say, must not be the code the exception lands in).
        assert wait_until(lambda: accepted_sockets(before) >= 1, 30 * UNIT)
        raise_and_wake(supervisor_thread(), KeyboardInterrupt, lambda: dispatcher.resize(1))

    injector = threading.Thread(target=end_supervision_once_started)
    injector.start()
    with pytest.raises(PoolStartError, match="failed to start: KeyboardInterrupt"):
        dispatcher.start()
    injector.join(10 * UNIT)
    assert calls == []  # start() raised: nothing else to tell
    dispatcher.shutdown()


def accepted_sockets(before: set[str]) -> int:
    """Connections a new pool's listener accepted in this process (its listener aside)."""
    names = [
        conn.laddr
        for conn in psutil.Process().net_connections(kind="unix")
        if conn.laddr and conn.laddr not in before and os.path.basename(conn.laddr) == "channels"
    ]
    return max(0, len(names) - 1)


def test_serve_exits_1_with_one_line_when_supervision_ends(
    serve_cli: list[ServeProcess],
) -> None:
    child = start(
        serve_cli, "tests.supervision_handlers:EndsSupervisionOnSigusr1", "--workers", "2"
    )
    address = child.read_address()
    assert wait_until(
        lambda: bool(mpreqrep.do_request(address, "pid", timeout=5 * UNIT)), 60 * UNIT
    )
    child.record_descendants()
    child.send(signal.SIGUSR1)
    assert child.wait() == 1
    errors = [line for line in child.stderr if line.startswith("mpreqrep: error:")]
    assert len(errors) == 1 and "server stopped: PoolFailedError" in errors[0], child.stderr
    child.assert_no_descendants_left()


# -- what heals ------------------------------------------------------------------------------


def test_a_removed_worker_socket_is_replaced_and_the_pool_heals(
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = worker_socket_paths()
    with running(OpsServer, workers=2) as server:
        (path,) = worker_socket_paths() - before
        pids = worker_pids(server)
        os.unlink(path)  # as a temp cleaner would: no new worker could connect
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)  # a worker this test's server started
        assert wait_until(
            lambda: server.stats()["workers_alive"] == 2 and victim not in worker_pids(server),
            30 * UNIT,
        )
        replies = {mpreqrep.do_request(server.address, "pid", timeout=30 * UNIT) for _ in range(20)}
        assert "" not in replies and None not in replies
        stats = server.stats()
        assert (stats["start_failures"], stats["restarts_crashed"]) == (0, 1)
        assert server.failure is None
        assert f"the workers' socket {path} is gone" in caplog.text
        assert not os.path.exists(os.path.dirname(path))  # the old directory is removed
        (new_path,) = worker_socket_paths() - before - {path}  # old connections keep its name
        assert os.path.exists(new_path)
