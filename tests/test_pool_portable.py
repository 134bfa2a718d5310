"""Process mode in Windows' shape, on Linux: loopback TCP channels and no selectable
process sentinels (``_process.WINDOWS_SHAPE``), with real loky workers and real
faults; hostile peers on that TCP listener; and macOS's short socket paths."""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import mpreqrep
from mpreqrep._channel import MAX_UNIX_PATH, connect, frame_of
from mpreqrep._pool import HandlerTimeoutError, ProcessPoolDispatcher, WorkerCrashError, _process
from mpreqrep._pool._greeter import MAX_GREETINGS
from mpreqrep._worker import Hello, introduction

from .conftest import UNIT, ask_all, assert_all_gone_soon, running, wait_until
from .pool_handlers import Commands, Ledger
from .process_handlers import PidServer
from .test_pool import children, ledger_runs, outcome, worker_pids

pytestmark = pytest.mark.timeout(90 * UNIT)

REPO_ROOT = Path(__file__).resolve().parent.parent

END_THREAD = "mpreqrep-worker-end"


@pytest.fixture
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private temporary directory for this process, so a file left behind shows."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


@pytest.fixture
def windows_shape(monkeypatch: pytest.MonkeyPatch, temp_dir: Path) -> Iterator[Path]:
    """Pools made in the test use Windows' means; yields their temporary directory."""
    monkeypatch.setattr(_process, "mechanisms", _process.WINDOWS_SHAPE)
    yield temp_dir
    assert list(temp_dir.iterdir()) == []  # nothing in the file system, ever


@pytest.fixture
def pool() -> Iterator[Callable[..., ProcessPoolDispatcher]]:
    """Start dispatchers; shut them down and check that no worker and no thread stays."""
    made: list[ProcessPoolDispatcher] = []

    def start(handler: Any, workers: int = 2, timeout_s: float | None = None) -> Any:
        dispatcher = ProcessPoolDispatcher(
            handler, workers, request_timeout_s=timeout_s, max_worker_memory=None
        )
        made.append(dispatcher)
        dispatcher.start()
        return dispatcher

    before = children()
    yield start
    for dispatcher in made:
        dispatcher.shutdown()
    assert wait_until(lambda: children() <= before, 5 * UNIT)
    assert wait_until(lambda: END_THREAD not in thread_names(), 5 * UNIT)


def thread_names() -> list[str]:
    return [thread.name for thread in threading.enumerate()]


def listener_port(pid: int) -> int:
    """The parent's listener port, as a worker's connections show it (the way any
    local user could find it, too)."""
    ports = {
        conn.raddr.port
        for conn in psutil.Process(pid).net_connections(kind="tcp")
        if conn.raddr and conn.status == psutil.CONN_ESTABLISHED
    }
    (port,) = ports
    return port


def test_a_windows_shaped_pool_talks_over_loopback_tcp_and_leaves_nothing_behind(
    windows_shape: Path, pool: Callable[..., ProcessPoolDispatcher]
) -> None:
    dispatcher = pool(Commands())
    for pid in worker_pids(dispatcher):
        port = listener_port(pid)  # the lifeline and the channel, both on TCP
        worker_tcp = psutil.Process(pid).net_connections(kind="tcp")
        assert sum(conn.raddr == ("127.0.0.1", port) for conn in worker_tcp) == 2
        assert psutil.Process(pid).net_connections(kind="unix") == []
    assert thread_names().count(END_THREAD) == 2  # each worker's end is waited on
    token = dispatcher._supervisor._token  # the one guard on TCP: no other user may read it
    for pid in worker_pids(dispatcher):
        worker = psutil.Process(pid)
        assert token not in " ".join([*worker.cmdline(), *worker.environ().values()])
    assert [outcome(dispatcher.submit(f"echo:{n}")) for n in range(20)] == [
        str(n) for n in range(20)
    ]


def test_in_windows_shape_a_crash_costs_its_request_and_a_sigkill_its_worker_only(
    windows_shape: Path, pool: Callable[..., ProcessPoolDispatcher], tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    dispatcher = pool(Ledger(str(ledger)))
    futures = [dispatcher.submit(f"a{i}/sleep:0.005") for i in range(30)]
    poison = dispatcher.submit("poison/exit:1")
    futures += [dispatcher.submit(f"b{i}/sleep:0.005") for i in range(30)]
    assert isinstance(outcome(poison), WorkerCrashError)
    assert all(isinstance(outcome(future), str) for future in futures)
    assert wait_until(lambda: dispatcher.stats()["workers_alive"] == 2, 30 * UNIT)
    survivor, victim = sorted(worker_pids(dispatcher))
    futures = [dispatcher.submit(f"c{i}/sleep:0.005") for i in range(60)]
    os.kill(victim, signal.SIGKILL)
    failed = [error for error in map(outcome, futures) if isinstance(error, BaseException)]
    assert len(failed) <= 1 and all(isinstance(error, WorkerCrashError) for error in failed)
    assert wait_until(lambda: dispatcher.stats()["workers_alive"] == 2, 30 * UNIT)
    assert survivor in worker_pids(dispatcher) and victim not in worker_pids(dispatcher)
    assert set(ledger_runs(ledger).values()) == {1}  # nothing ran twice
    assert dispatcher.stats()["restarts_crashed"] == 2


def test_in_windows_shape_request_timeouts_kill_only_the_worker_running_them(
    windows_shape: Path, pool: Callable[..., ProcessPoolDispatcher]
) -> None:
    dispatcher = pool(Commands(), timeout_s=1.0 * UNIT)
    hung = dispatcher.submit("hang")
    others = [dispatcher.submit(f"sleep:{0.1 * UNIT}") for _ in range(6)]
    assert isinstance(outcome(hung), HandlerTimeoutError)
    assert all(isinstance(outcome(future), str) for future in others)
    assert wait_until(lambda: dispatcher.stats()["restarts_timed_out"] == 1, 10 * UNIT)
    assert wait_until(lambda: dispatcher.stats()["workers_alive"] == 2, 30 * UNIT)
    assert outcome(dispatcher.submit("echo:after")) == "after"


def test_a_windows_shaped_server_serves_crashes_and_times_out_on_its_io_loop(
    windows_shape: Path,
) -> None:
    """Behind a server the channels move to the I/O loop: TCP ones too."""
    before = children()
    with running(PidServer, workers=2, request_timeout=1.0 * UNIT) as server:
        requests = [f"sleep 0.01 {n}" for n in range(20)]
        replies = ask_all(server.address, [*requests[:10], "exit", *requests[10:], "hang"])
        assert replies[10] == "" and replies[-1] == ""  # the crash, the timeout
        assert all(
            reply and reply.endswith(f"{n}\r\n")
            for n, reply in enumerate(replies[:10] + replies[11:-1])
        ), replies
        stats = server.stats()
        assert (stats["crashed"], stats["timed_out"]) == (1, 1)
        assert wait_until(lambda: server.stats()["workers_alive"] == 2, 30 * UNIT)
        assert all(reply for reply in ask_all(server.address, requests))
    assert wait_until(lambda: children() <= before, 5 * UNIT)  # stop() left no process


BOOT_DEATH = """
import os, sys
# A worker whose interpreter dies while it boots, before it connected anything (a
# broken site-packages, a missing DLL, an antivirus): only its process end tells.
if os.path.exists({marker!r}) and "mpreqrep-worker" in sys.orig_argv:
    os._exit(3)
"""


def test_in_windows_shape_a_worker_that_dies_at_boot_is_replaced_at_once(
    windows_shape: Path,
    pool: Callable[..., ProcessPoolDispatcher],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a selectable sentinel, such a worker used to be seen only by the 60 s
    start timeout: the lifeline it never connected could not end."""
    marker, site = tmp_path / "dies-at-boot", tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BOOT_DEATH.format(marker=str(marker)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(REPO_ROOT)]))
    dispatcher = pool(Commands())
    marker.touch()
    os.kill(min(worker_pids(dispatcher)), signal.SIGKILL)
    killed_at = time.monotonic()
    assert wait_until(lambda: dispatcher.stats()["start_failures"] >= 1, 10 * UNIT)
    first_seen_s = time.monotonic() - killed_at
    assert wait_until(lambda: dispatcher.stats()["start_failures"] >= 3, 10 * UNIT)
    third_seen_s = time.monotonic() - killed_at  # after back-offs of 0.1 s and 0.2 s
    print(f"boot deaths seen {first_seen_s:.3f} s (1st) and {third_seen_s:.3f} s (3rd) after")
    assert outcome(dispatcher.submit("echo:served")) == "served"  # by the other worker
    marker.unlink()
    assert wait_until(lambda: dispatcher.stats()["workers_alive"] == 2, 15 * UNIT)


SERVE_IN_WINDOWS_SHAPE = """
import sys
from mpreqrep._cli import main
from mpreqrep._pool import _process
_process.mechanisms = _process.WINDOWS_SHAPE
sys.exit(main(["serve", "--address", "127.0.0.1:0", "--workers", "2",
               "tests.process_handlers:PidServer"]))
"""


def test_a_sigkilled_serve_in_windows_shape_takes_every_descendant_within_2_s(
    tmp_path: Path,
) -> None:
    """The lifeline's end, the one mechanism Windows has, is what ends the workers."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TMPDIR": str(tmp_path)}
    command = [sys.executable, "-c", SERVE_IN_WINDOWS_SHAPE]
    serve = subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert serve.stderr is not None
        port = int(re.findall(r":(\d+)", serve.stderr.readline())[-1])
        address = f"127.0.0.1:{port}"
        busy = threading.Thread(  # one worker is busy in a handler at the kill
            target=mpreqrep.do_request, args=(address, "hang", 10 * UNIT), daemon=True
        )
        busy.start()
        reply = mpreqrep.do_request(address, "beside", 30 * UNIT)
        assert reply and reply.endswith("beside\r\n")
        family = psutil.Process(serve.pid).children(recursive=True)
        unix_sockets = psutil.Process(serve.pid).net_connections(kind="unix")
        assert [conn.laddr for conn in unix_sockets if conn.laddr] == []  # socketpairs only
    finally:
        serve.kill()
        serve.wait()
    assert_all_gone_soon(family, killed_at=time.monotonic())
    assert list(tmp_path.iterdir()) == []


def test_hostile_peers_on_the_tcp_listener_cost_the_pool_nothing(
    windows_shape: Path, pool: Callable[..., ProcessPoolDispatcher]
) -> None:
    """Garbage, wrong tokens, a half frame, silence, a megabyte announced, and a flood
    of connections, while the pool serves: every request is answered, a killed
    worker's replacement gets through, and the parent's descriptors stay bounded."""
    dispatcher = pool(Commands())
    parent = psutil.Process()
    fds_before = parent.num_fds()
    address = ("127.0.0.1", listener_port(min(worker_pids(dispatcher))))
    token = secrets.token_hex(16)  # the right length, not the pool's
    strangers = [
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        frame_of(token.encode() + b"\x80\x05junk"),
        introduction(token, Hello(os.getpid())),
        introduction(token, Hello(os.getpid()))[:10],  # then silence
        (1 << 30).to_bytes(4, "big") + b"\0" * 1024,  # a gigabyte announced
        b"",  # silence
    ]
    peers: list[socket.socket] = []
    try:
        for payload in strangers:
            peer = connect(address)
            peer.sendall(payload)
            peers.append(peer)
        for _ in range(3 * MAX_GREETINGS // 64):  # in rounds: connect() waits on a full backlog
            peers += [connect(address) for _ in range(64)]
            assert outcome(dispatcher.submit("echo:during"), 10 * UNIT) == "during"
        # Our own ends of the peers, and at most MAX_GREETINGS of the parent's.
        assert parent.num_fds() <= fds_before + len(peers) + MAX_GREETINGS + 16
        victim = min(worker_pids(dispatcher))
        os.kill(victim, signal.SIGKILL)  # its replacement must get through the crowd
        assert wait_until(lambda: victim not in worker_pids(dispatcher), 10 * UNIT)
        assert wait_until(lambda: dispatcher.stats()["workers_alive"] == 2, 30 * UNIT)
        replies = [dispatcher.submit(f"echo:{n}") for n in range(50)]
        assert [outcome(reply) for reply in replies] == [str(n) for n in range(50)]
    finally:
        for peer in peers:
            peer.close()
    assert wait_until(lambda: parent.num_fds() <= fds_before + 4, 10 * UNIT)
    assert dispatcher.stats()["start_failures"] == 0


def test_a_long_tmpdir_gives_a_pool_a_socket_path_that_fits_macos(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pool: Callable[..., ProcessPoolDispatcher]
) -> None:
    """macOS allows 104 bytes for a socket path, and its TMPDIR is already ~50 long;
    a longer one (a CI runner's) falls back to /tmp, and nothing stays in either."""
    long_dir = tmp_path / ("d" * 120)
    long_dir.mkdir()
    monkeypatch.setenv("TMPDIR", str(long_dir))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    assert tempfile.gettempdir() == str(long_dir)
    dispatcher = pool(Commands(), workers=1)
    (path,) = {
        conn.laddr
        for conn in psutil.Process().net_connections(kind="unix")
        if "mpreqrep-" in conn.laddr
    }
    assert path.startswith("/tmp/mpreqrep-") and len(path) <= MAX_UNIX_PATH < 104
    assert outcome(dispatcher.submit("echo:short")) == "short"
    dispatcher.shutdown()
    assert not os.path.exists(os.path.dirname(path))
    assert list(long_dir.iterdir()) == []
