"""RequestServer in thread mode: life cycle, options, concurrency guarantees."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import mpreqrep

from .conftest import UNIT, ask_all, running, wait_until
from .process_handlers import PidServer


class OverlapCounter(mpreqrep.RequestServer):
    """Records how many handlers ever ran at the same time."""

    def __init__(self, address: str, **options: object) -> None:
        super().__init__(address, **options)  # type: ignore[arg-type]
        self.lock = threading.Lock()
        self.active = 0
        self.most_active = 0

    def handle_request(self, request: str) -> str:
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        time.sleep(0.01)  # hold the handler so overlaps would show
        with self.lock:
            self.active -= 1
        return request


class BarrierServer(mpreqrep.RequestServer):
    """Every handler waits until two handlers are running at once."""

    def __init__(self, address: str, **options: object) -> None:
        super().__init__(address, **options)  # type: ignore[arg-type]
        self.barrier = threading.Barrier(2, timeout=10 * UNIT)

    def handle_request(self, request: str) -> str:
        self.barrier.wait()
        return "met"


def fire(address: str, count: int, text: str = "x") -> list[str | None]:
    """Send ``count`` requests at once, ``text`` numbered, each from its own thread."""
    return ask_all(address, [f"{text}{index}" for index in range(count)])


def test_binds_in_init_and_reports_the_real_port() -> None:
    server = mpreqrep.RequestServer("localhost:0")
    try:
        assert server.port > 0
        assert server.address == f"127.0.0.1:{server.port}"
        assert server.daemon
        with socket.create_connection(("127.0.0.1", server.port), timeout=5 * UNIT):
            pass  # listening before start(): the connection waits in the backlog
    finally:
        server.stop()
        server.run()  # stop() before run(): run() closes the listener and returns


def test_taken_port_raises_oserror_in_init() -> None:
    with running() as server, pytest.raises(OSError):
        mpreqrep.RequestServer(server.address)


@pytest.mark.parametrize("address", ["itc://localhost:0", "localhost", "localhost:99999"])
def test_bad_address_is_a_value_error(address: str) -> None:
    with pytest.raises(ValueError):
        mpreqrep.RequestServer(address)


@pytest.mark.parametrize(
    "options",
    [
        {"workers": 1, "executor": object()},
        {"request_timeout": 0},
        {"max_request_size": 0},
        {"read_timeout": -1},
        {"max_pending": 0},
        {"max_threads": 0},
        {"read_timeout": float("inf")},  # would overflow select(): no limit is not an option
        {"read_timeout": float("nan")},
        {"request_timeout": float("nan")},
        {"max_buffered_bytes": 0},
    ],
)
def test_bad_options_are_value_errors(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        mpreqrep.RequestServer("localhost:0", **options)  # type: ignore[arg-type]


def test_unknown_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        mpreqrep.RequestServer("localhost:0", asynch=True)  # type: ignore[call-arg]


def test_default_handler_echoes_like_yoton() -> None:
    with running() as server:
        assert mpreqrep.do_request(server.address, "abc") == "Requested: abc\r\n"
        assert mpreqrep.do_request(server.address, "wait") == "Requested: wait\r\n"


def test_context_manager_starts_stops_and_joins() -> None:
    with mpreqrep.RequestServer("localhost:0") as server:
        assert server.is_alive()
        assert mpreqrep.do_request(server.address, "in") == "Requested: in\r\n"
    assert not server.is_alive()
    with pytest.raises(mpreqrep.NoServerError):
        mpreqrep.do_request(server.address, "after")


def test_run_serves_in_the_calling_thread() -> None:
    server = mpreqrep.RequestServer("localhost:0")
    replies: list[str | None] = []

    def client() -> None:
        replies.append(mpreqrep.do_request(server.address, "r", timeout=10 * UNIT))
        server.stop()

    thread = threading.Thread(target=client)
    thread.start()
    server.run()
    thread.join(10 * UNIT)
    assert replies == ["Requested: r\r\n"]


def test_stop_returns_at_once_and_join_answers_accepted_requests() -> None:
    release = threading.Event()

    class Held(mpreqrep.RequestServer):
        def handle_request(self, request: str) -> str:
            release.wait(10 * UNIT)
            return "done"

    with running(Held, async_val=True) as server:
        replies: list[str | None] = []
        client = threading.Thread(
            target=lambda: replies.append(mpreqrep.do_request(server.address, "q", 20 * UNIT))
        )
        client.start()
        assert wait_until(lambda: server.stats()["in_flight"] == 1, 10 * UNIT)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 1 * UNIT
        assert server.is_alive()
        release.set()
        server.join(10 * UNIT)
        client.join(10 * UNIT)
    assert replies == ["done\r\n"]


@pytest.mark.parametrize("keyword", ["async", "async_val"])
def test_async_keyword_alias_runs_handlers_concurrently(keyword: str) -> None:
    with running(BarrierServer, **{keyword: True}) as server:
        assert fire(server.address, 2) == ["met\r\n", "met\r\n"]


@pytest.mark.parametrize(
    "options", [{}, {"request_timeout": 30 * UNIT}], ids=["inline", "one-handler-thread"]
)
def test_sync_mode_never_overlaps_handlers(options: dict[str, float]) -> None:
    with running(OverlapCounter, **options) as server:
        replies = fire(server.address, 20)
        assert replies == [f"x{i}\r\n" for i in range(20)]
        assert server.most_active == 1


def test_async_mode_overlaps_handlers() -> None:
    with running(OverlapCounter, async_val=True) as server:
        fire(server.address, 20)
        assert server.most_active > 1


@pytest.mark.parametrize("async_val", [False, True])
def test_a_silent_client_delays_nobody(async_val: bool) -> None:
    with (
        running(async_val=async_val, read_timeout=30 * UNIT) as server,
        socket.create_connection(("127.0.0.1", server.port)),
    ):
        started = time.monotonic()
        assert mpreqrep.do_request(server.address, "other", 10 * UNIT) == "Requested: other\r\n"
        assert time.monotonic() - started < 2 * UNIT


def test_verbose_prints_a_line_per_connection(capsys: pytest.CaptureFixture[str]) -> None:
    with running(verbose=1) as server:
        mpreqrep.do_request(server.address, "v")
    assert capsys.readouterr().out.count("handling request from: ('127.0.0.1', ") == 1


def test_stats_count_requests() -> None:
    with running() as server:
        assert server.stats()["served"] == 0
        for _ in range(3):
            mpreqrep.do_request(server.address, "s")
        # The client may read its reply before the I/O thread counts it.
        assert wait_until(lambda: server.stats()["served"] == 3, 10 * UNIT)
        stats = server.stats()
    assert stats["served"] == 3
    assert stats["failed"] == stats["timed_out"] == stats["in_flight"] == 0
    assert 0 < stats["latency_p50_s"] <= stats["latency_p99_s"]


def test_server_copy_pickles_without_runtime() -> None:
    import pickle

    server = mpreqrep.RequestServer("localhost:0")
    server.custom = [1, 2]  # type: ignore[attr-defined]
    try:
        copy = pickle.loads(pickle.dumps(server))
        assert copy.custom == [1, 2]
        assert copy.port == server.port
        assert copy.handle_request("x") == "Requested: x"
        with pytest.raises(RuntimeError):
            copy.stop()
    finally:
        server.stop()
        server.run()


def children() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


@pytest.mark.parametrize("options", [{}, {"workers": 1}], ids=["thread", "process"])
def test_a_second_start_raises_before_touching_anything(options: dict[str, object]) -> None:
    with running(PidServer, **options) as server:
        before = children()
        for call in (server.start, server.run):
            with pytest.raises(RuntimeError, match="serves only once"):
                call()
        assert children() == before  # no second pool
        assert mpreqrep.do_request(server.address, "still", 10 * UNIT).endswith("still\r\n")
    # running() checked that stop() + join() return


def test_run_or_start_after_stop_raises_runtime_error() -> None:
    with running() as server:
        pass
    for call in (server.run, server.start):
        with pytest.raises(RuntimeError, match="serves only once"):
            call()


def test_concurrent_starts_serve_once() -> None:
    server = mpreqrep.RequestServer("127.0.0.1:0")
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        barrier.wait()
        try:
            server.start()
        except RuntimeError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10 * UNIT)
    assert len(errors) == 3
    assert mpreqrep.do_request(server.address, "once", 10 * UNIT) == "Requested: once\r\n"
    server.stop()
    server.join(10 * UNIT)
    assert not server.is_alive()


class Unpicklable(mpreqrep.RequestServer):
    """Holds a lock, which cannot be pickled for the process workers."""

    def __init__(self, address: str, **options: object) -> None:
        super().__init__(address, **options)  # type: ignore[arg-type]
        self.lock = threading.Lock()


def test_a_failed_start_closes_the_listener_at_once() -> None:
    server = Unpicklable("127.0.0.1:0", workers=1)
    with pytest.raises(RuntimeError, match="pickle"):
        server.start()
    started = time.monotonic()
    with pytest.raises(mpreqrep.NoServerError):
        mpreqrep.do_request(server.address, "anyone?", 10 * UNIT)
    assert time.monotonic() - started < 1 * UNIT
    with pytest.raises(RuntimeError, match="serves only once"):
        server.start()


CTRL_C_SCRIPT = """
import signal, sys, threading
import mpreqrep

class Held(mpreqrep.RequestServer):
    release = threading.Event()

    def handle_request(self, request):
        print("handling", flush=True)
        if sys.argv[2:] == ["signal-here"]:
            # The kernel gives this SIGINT to this thread, not to the main one that runs
            # the loop: run() stops only if the signal wakes the loop's select().
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        Held.release.wait(30)  # released by the first Ctrl-C below
        return "answered"

server = Held("127.0.0.1:0", async_val=sys.argv[1] == "async")
old_stop = server.stop

def stop():
    old_stop()
    Held.release.set()

server.stop = stop
print(server.port, flush=True)
server.run()
print("run returned; wake-up fd", signal.set_wakeup_fd(-1), flush=True)  # given back
"""


@contextlib.contextmanager
def script_process(path: Path, text: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """``text`` run as a script at ``path`` from the repo root, killed if still running
    at the end. Without PYTHONFAULTHANDLER: that changes which thread takes a signal."""
    path.write_text(textwrap.dedent(text))
    env = {name: value for name, value in os.environ.items() if name != "PYTHONFAULTHANDLER"}
    process = subprocess.Popen(
        [sys.executable, str(path), *args],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_ctrl_c_stops_a_script_that_serves_with_run_and_it_exits_0(tmp_path: Path) -> None:
    with script_process(tmp_path / "serve_in_main.py", CTRL_C_SCRIPT, "sync") as process:
        assert process.stdout is not None
        address = f"127.0.0.1:{int(process.stdout.readline())}"
        replies: list[str | None] = []
        client = threading.Thread(
            target=lambda: replies.append(mpreqrep.do_request(address, "q", 30 * UNIT))
        )
        client.start()
        assert process.stdout.readline() == "handling\n"
        process.send_signal(signal.SIGINT)
        client.join(30 * UNIT)
        out, err = process.communicate(timeout=30 * UNIT)
    assert replies == ["answered\r\n"]
    assert process.returncode == 0, err
    assert out == "run returned; wake-up fd -1\n"
    assert "Traceback" not in err
    with pytest.raises(mpreqrep.NoServerError):
        mpreqrep.do_request(address, "after", 10 * UNIT)


class HeldServer(mpreqrep.RequestServer):
    """Each handler waits until the test releases it."""

    def __init__(self, address: str, **options: object) -> None:
        super().__init__(address, **options)  # type: ignore[arg-type]
        self.entered = threading.Event()
        self.release = threading.Event()

    def handle_request(self, request: str) -> str:
        self.entered.set()
        self.release.wait(20 * UNIT)
        return "answered"


def ask_in_background(address: str) -> tuple[threading.Thread, list[str | None]]:
    replies: list[str | None] = []
    thread = threading.Thread(
        target=lambda: replies.append(mpreqrep.do_request(address, "q", 30 * UNIT))
    )
    thread.start()
    return thread, replies


def ctrl_c_handled() -> bool:
    """Whether our SIGINT handler ran: it puts Python's default handler back."""
    return signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("async_val", [False, True], ids=["sync", "async"])
def test_ctrl_c_while_run_serves_in_the_main_thread_drains_and_returns(async_val: bool) -> None:
    assert threading.current_thread() is threading.main_thread()
    server = HeldServer("127.0.0.1:0", async_val=async_val)
    client, replies = ask_in_background(server.address)

    def press_ctrl_c() -> None:
        assert server.entered.wait(20 * UNIT)
        os.kill(os.getpid(), signal.SIGINT)
        assert wait_until(ctrl_c_handled, 20 * UNIT)
        server.release.set()

    presser = threading.Thread(target=press_ctrl_c)
    presser.start()
    server.run()  # returns: no KeyboardInterrupt
    presser.join(20 * UNIT)
    client.join(20 * UNIT)
    assert replies == ["answered\r\n"]
    assert ctrl_c_handled()
    with pytest.raises(mpreqrep.NoServerError):
        mpreqrep.do_request(server.address, "after", 10 * UNIT)


def test_a_ctrl_c_the_kernel_gives_another_thread_still_stops_run(tmp_path: Path) -> None:
    # In a process of its own: pytest's faulthandler changes how the signal is taken.
    script = tmp_path / "sigint_elsewhere.py"
    with script_process(script, CTRL_C_SCRIPT, "async", "signal-here") as process:
        assert process.stdout is not None
        address = f"127.0.0.1:{int(process.stdout.readline())}"
        reply = mpreqrep.do_request(address, "q", 10 * UNIT)
        out, err = process.communicate(timeout=30 * UNIT)
    assert reply == "answered\r\n"  # not None: the stop came at once, not at the 30 s wait
    assert process.returncode == 0, err
    assert out == "handling\nrun returned; wake-up fd -1\n"


def test_run_leaves_a_signal_wake_up_fd_of_someone_else_in_place() -> None:
    theirs, other_end = socket.socketpair()
    theirs.setblocking(False)
    previous = signal.set_wakeup_fd(theirs.fileno())
    try:
        server = mpreqrep.RequestServer("127.0.0.1:0")
        replies: list[str | None] = []

        def ask_then_stop() -> None:
            replies.append(mpreqrep.do_request(server.address, "q", 10 * UNIT))
            server.stop()

        stopper = threading.Thread(target=ask_then_stop)
        stopper.start()
        server.run()
        stopper.join(10 * UNIT)
        assert replies == ["Requested: q\r\n"]
        assert signal.set_wakeup_fd(previous) == theirs.fileno()
    finally:
        signal.set_wakeup_fd(previous)
        theirs.close()
        other_end.close()


def test_a_second_ctrl_c_interrupts_the_drain() -> None:
    server = HeldServer("127.0.0.1:0", async_val=True)
    client, replies = ask_in_background(server.address)

    def press_ctrl_c_twice() -> None:
        assert server.entered.wait(20 * UNIT)
        os.kill(os.getpid(), signal.SIGINT)
        assert wait_until(ctrl_c_handled, 20 * UNIT)
        os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c_twice)
    presser.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            server.run()
    finally:
        server.release.set()
        presser.join(20 * UNIT)
        client.join(20 * UNIT)
    assert replies == [""]  # the drain was cut short: closed without a reply


def test_a_thread_that_cannot_start_leaves_nothing_listening(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = mpreqrep.RequestServer("127.0.0.1:0")

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    with pytest.raises(RuntimeError, match="new thread"):
        server.start()
    monkeypatch.undo()
    with pytest.raises(mpreqrep.NoServerError):
        mpreqrep.do_request(server.address, "anyone?", 10 * UNIT)


def test_verbose_with_a_closed_stdout_still_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stdout", closed)
    with running(verbose=1) as server:
        assert mpreqrep.do_request(server.address, "v", 10 * UNIT) == "Requested: v\r\n"
        assert server.stats()["failed"] == 0
