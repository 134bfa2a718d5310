"""The mpreqrep command line: parsing, bad input, request exit codes, serve under signals."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import psutil
import pytest

import mpreqrep
from mpreqrep import _cli
from workers.echo import EchoServer
from workers.primes import PrimeServer

from .conftest import UNIT, running, wait_until

REPO = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = Path(sys.executable).with_name("mpreqrep")
SUBPROCESS_TIMEOUT = int(120 * UNIT)

# A server whose handler reports that it started, then holds the request
# until the test creates a release file: in-flight requests on demand.
HOLDING_MODULE = textwrap.dedent(
    '''
    """Handlers that hold each request until the test releases it."""
    import os
    import pathlib
    import time

    from mpreqrep import RequestServer


    class HoldingServer(RequestServer):
        def __init__(self, address, *args, **kwargs):
            super().__init__(address, *args, **kwargs)
            self.folder = os.getcwd()

        def handle_request(self, request):
            name = request.strip()
            folder = pathlib.Path(self.folder)
            (folder / f"{name}.started").touch()
            deadline = time.monotonic() + 300
            while not (folder / f"{name}.release").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            return "done " + name
    '''
)


LOCKED_MODULE = textwrap.dedent(
    """
    import threading

    from mpreqrep import RequestServer


    class LockedServer(RequestServer):
        def __init__(self, address, *args, **kwargs):
            super().__init__(address, *args, **kwargs)
            self.lock = threading.Lock()  # cannot be copied to process workers
    """
)


# -- helpers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


def alive(process: psutil.Process) -> bool:
    """Running and not a zombie (an exited child nobody has reaped yet)."""
    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def child_environment() -> dict[str, str]:
    """This process's environment, plus, when this run measures coverage (pytest
    --cov), what makes a Python child measure itself into the same data: the
    project's configuration (``parallel = true``: a data file per process, which
    pytest-cov combines at the end) and this run's data file, made absolute since
    children run in other folders. coverage's own ``.pth`` file starts it."""
    import coverage

    measuring = coverage.Coverage.current()
    if measuring is None:
        return dict(os.environ)
    return {
        **os.environ,
        "COVERAGE_PROCESS_START": str(REPO / "pyproject.toml"),
        "COVERAGE_FILE": os.path.abspath(str(measuring.get_option("run:data_file"))),
    }


class ServeProcess:
    """An ``mpreqrep serve`` child process with its output collected line by line."""

    def __init__(self, argv: list[str], *, cwd: Path, new_session: bool = False) -> None:
        self.process = subprocess.Popen(
            argv,
            cwd=cwd,
            env=child_environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=new_session,
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self.stdout: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        self.seen: list[psutil.Process] = []
        self._readers = [
            threading.Thread(target=_collect, args=(self.process.stdout, self.stdout.put)),
            threading.Thread(target=_collect, args=(self.process.stderr, self.stderr.append)),
        ]
        for reader in self._readers:
            reader.start()

    def read_address(self) -> str:
        """The address from the startup line on stdout."""
        line = self.stdout.get(timeout=60 * UNIT)
        match = re.fullmatch(r"mpreqrep: serving \S+ at (\S+)\n", line)
        assert match, line
        return match.group(1)

    def wait_for_stderr(self, text: str) -> None:
        assert wait_until(lambda: any(text in line for line in self.stderr), 60 * UNIT), (
            f"{text!r} never logged; stderr: {''.join(self.stderr)}"
        )

    def record_descendants(self) -> None:
        """Remember the pool workers and helpers, to check later that none outlive us."""
        self.seen += psutil.Process(self.process.pid).children(recursive=True)

    def send(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def stop(self) -> int:
        """SIGTERM, as an operator stops it; the exit code."""
        self.send(signal.SIGTERM)
        return self.wait()

    def wait(self) -> int:
        code = self.process.wait(timeout=60 * UNIT)
        for reader in self._readers:
            reader.join(10 * UNIT)
        return code

    def assert_no_descendants_left(self) -> None:
        assert wait_until(lambda: not any(alive(p) for p in self.seen), 30 * UNIT), [
            p for p in self.seen if alive(p)
        ]

    def kill(self) -> None:
        """Teardown: kill what is still running of the processes this test started."""
        if self.process.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                self.record_descendants()
            self.process.kill()
        for process in self.seen:
            if alive(process):
                process.kill()
        self.process.wait(timeout=10 * UNIT)


@pytest.fixture
def serve_cli() -> Iterator[list[ServeProcess]]:
    """Start ``serve`` children with ``start(...)``; whatever is left is killed afterwards."""
    started: list[ServeProcess] = []
    yield started
    for child in started:
        child.kill()


def start(
    started: list[ServeProcess],
    *args: str,
    cwd: Path = REPO,
    console_script: bool = False,
    new_session: bool = False,
) -> ServeProcess:
    """``mpreqrep serve --address localhost:0 ARGS...`` via ``-m`` or the console script."""
    if console_script and not CONSOLE_SCRIPT.exists():
        pytest.skip("the mpreqrep console script is not installed")
    command = [str(CONSOLE_SCRIPT)] if console_script else [sys.executable, "-m", "mpreqrep"]
    argv = [*command, "serve", *args, "--address", "localhost:0"]
    child = ServeProcess(argv, cwd=cwd, new_session=new_session)
    started.append(child)
    return child


def _collect(stream: IO[str], sink: Callable[[str], object]) -> None:
    """Reader thread: pass each line of a child's output to ``sink``."""
    for line in stream:
        sink(line)


def request_in_thread(address: str, text: str) -> tuple[threading.Thread, list[str | None]]:
    """Send a request from a thread; its reply lands in the returned list."""
    replies: list[str | None] = []

    def send() -> None:
        replies.append(mpreqrep.do_request(address, text, timeout=90 * UNIT))

    thread = threading.Thread(target=send)
    thread.start()
    return thread, replies


def start_holding(
    serve_cli: list[ServeProcess], tmp_path: Path, name: str, *options: str, **how: bool
) -> tuple[ServeProcess, threading.Thread, list[str | None]]:
    """``serve`` HoldingServer with ``options``, holding a request ``name`` in flight;
    its descendants recorded. Returns the child, the client thread and its replies."""
    (tmp_path / "holding.py").write_text(HOLDING_MODULE)
    child = start(serve_cli, "holding:HoldingServer", *options, cwd=tmp_path, **how)
    thread, replies = request_in_thread(child.read_address(), name)
    assert wait_until((tmp_path / f"{name}.started").exists, 60 * UNIT)
    child.record_descendants()
    return child, thread, replies


def assert_released_and_answered(
    child: ServeProcess, tmp_path: Path, thread: threading.Thread, replies: list[str | None]
) -> None:
    """Release the held request ``first``: it is answered, and the child exits 0, leaving
    no descendant."""
    (tmp_path / "first.release").touch()
    assert child.wait() == 0
    thread.join(30 * UNIT)
    assert replies == ["done first\r\n"]
    child.assert_no_descendants_left()


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = _cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_clean_error_line(err: str) -> None:
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("mpreqrep: error: "), err


# -- argument types -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1", 1),
        ("1048576", 1048576),
        ("512K", 512 * 1024),
        ("512M", 512 * 1024**2),
        ("512m", 512 * 1024**2),
        ("2G", 2 * 1024**3),
        ("2gb", 2 * 1024**3),
        ("1.5GiB", 3 * 1024**3 // 2),
        ("1T", 1024**4),
        (" 64 MB ", 64 * 1024**2),
    ],
)
def test_size_argument(text: str, size: int) -> None:
    assert _cli.size_argument(text) == size


@pytest.mark.parametrize("text", ["", "0", "-1", "0.1", "M", "12Q", "1.2.3G", "lots", "1e9"])
def test_bad_size_argument(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="512M"):
        _cli.size_argument(text)


@pytest.mark.parametrize(
    ("text", "count"), [("auto", "auto"), ("AUTO", "auto"), ("1", 1), ("8", 8)]
)
def test_worker_count_argument(text: str, count: int | str) -> None:
    assert _cli.worker_count_argument(text) == count


@pytest.mark.parametrize("text", ["0", "-2", "1.5", "many", ""])
def test_bad_worker_count_argument(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="positive integer or 'auto'"):
        _cli.worker_count_argument(text)


@pytest.mark.parametrize("text", ["0", "-1", "soon", "nan"])
def test_bad_seconds_argument(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="positive number of seconds"):
        _cli.positive_seconds_argument(text)


def test_format_stats() -> None:
    stats: dict[str, object] = {
        "served": 3,
        "latency_p50_s": 0.0123456,
        "latency_p99_s": None,
        "workers": [{}, {}],
    }
    expected = "served=3 latency_p50_s=0.01235 latency_p99_s=- workers=2"
    assert _cli.format_stats(stats) == expected


def test_help_and_version_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["serve", "--help"], ["request", "--help"], ["--version"]):
        with pytest.raises(SystemExit) as exited:
            _cli.main(argv)
        assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "MODULE:CLASS" in out and "--timeout" in out and mpreqrep.__version__ in out


# -- bad input: one line on stderr, no traceback ------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required"),
        (["bogus"], "invalid choice"),
        (["serve"], "required"),
        (["serve", "workers.echo"], "expected MODULE:CLASS"),
        (["serve", ":EchoServer"], "expected MODULE:CLASS"),
        (["serve", "no_such_module_here:Server"], "cannot import module 'no_such_module_here'"),
        (["serve", "workers.echo:NoSuchServer"], "has no attribute 'NoSuchServer'"),
        (["serve", "workers.primes:count_primes"], "not a RequestServer subclass"),
        (["serve", "workers.primes:DEFAULT_LIMIT"], "not a RequestServer subclass"),
        (["serve", "tests.test_cli:ServeProcess"], "not a RequestServer subclass"),
        (["serve", "workers.echo:EchoServer", "--address", "localhost"], "invalid address"),
        (["serve", "workers.echo:EchoServer", "--address", "localhost:70000"], "invalid address"),
        (["serve", "workers.echo:EchoServer", "--address", "h:p+x"], "invalid address"),
        (["serve", "workers.echo:EchoServer", "--address", "udp://localhost:0"], "only tcp"),
        (["serve", "workers.echo:EchoServer", "--workers", "-2"], "--workers"),
        (["serve", "workers.echo:EchoServer", "--workers=-2"], "--workers"),
        (["serve", "workers.echo:EchoServer", "--workers", "0"], "--workers"),
        (["serve", "workers.echo:EchoServer", "--request-timeout", "0"], "--request-timeout"),
        (["serve", "workers.echo:EchoServer", "--max-worker-memory", "lots"], "512M"),
        (["serve", "workers.echo:EchoServer", "--log-level", "LOUD"], "--log-level"),
        (["serve", "workers.echo:EchoServer", "--stats-interval", "-1"], "--stats-interval"),
        (["request", "localhost", "hi"], "invalid address"),
        (["request", "udp://localhost:1", "hi"], "only tcp"),
        (["request", "::1:80", "hi"], "in brackets"),
        (["serve", "workers.echo:EchoServer", "--address", "localhost:-1"], "invalid address"),
        (["serve", "workers.echo:EchoServer", "--address", "::1:0"], "in brackets"),
        (["serve", "workers.echo:EchoServer", "--address", "[::1:0"], "invalid address"),
        (["request", "localhost:1"], "required"),
        (["request", "localhost:1", "hi", "--timeout", "x"], "--timeout"),
        (["serve", "workers.echo:EchoServer", "--async", "--workers", "2"], "--async is for"),
        (["serve", "workers.echo:EchoServer", "--dask", "tcp://[::1]:1", "--async"], "--async"),
        (["serve", "workers.echo:EchoServer", "--max-requests", "3"], "--max-requests is for"),
        (["serve", "workers.echo:EchoServer", "--max-requests-jitter", "3"], "give --workers"),
        (["serve", "workers.echo:EchoServer", "--max-worker-memory", "1G"], "for process mode"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(argv, capsys)
    assert code == _cli.EXIT_USAGE
    assert out == ""
    assert_one_clean_error_line(err)
    assert message in err


@pytest.fixture
def in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty folder, restoring ``sys.path`` and ``sys.modules`` afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    return tmp_path


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("raise RuntimeError('boom\\nsecond line')", "RuntimeError: boom second line"),
        ("def broken(:\n", "SyntaxError"),
        ("import no_such_dependency_here\n", "No module named 'no_such_dependency_here'"),
        ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
    ],
)
def test_module_that_fails_to_import(
    source: str, message: str, in_tmp_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (in_tmp_dir / "failing_module.py").write_text(source)
    code, _, err = run_main(["serve", "failing_module:Server"], capsys)
    assert code == _cli.EXIT_USAGE
    assert_one_clean_error_line(err)
    assert "cannot import module 'failing_module'" in err and message in err


def test_module_is_imported_from_the_current_directory(
    in_tmp_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (in_tmp_dir / "local_servers.py").write_text("NOT_A_SERVER = 1\n")
    while str(in_tmp_dir) in sys.path:
        sys.path.remove(str(in_tmp_dir))
    code, _, err = run_main(["serve", "local_servers:NOT_A_SERVER"], capsys)
    assert code == _cli.EXIT_USAGE
    assert "'local_servers:NOT_A_SERVER' is not a RequestServer subclass" in err


def test_options_the_class_does_not_take(
    in_tmp_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (in_tmp_dir / "narrow.py").write_text(
        "from mpreqrep import RequestServer\n"
        "class NarrowServer(RequestServer):\n"
        "    def __init__(self, address):\n"
        "        super().__init__(address)\n"
    )
    code, _, err = run_main(["serve", "narrow:NarrowServer", "--workers", "2"], capsys)
    assert code == _cli.EXIT_USAGE
    assert_one_clean_error_line(err)
    assert "cannot create narrow:NarrowServer: TypeError" in err


def test_a_class_whose_init_raises_is_one_line_and_exit_1(
    in_tmp_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (in_tmp_dir / "raising.py").write_text(
        "from mpreqrep import RequestServer\n"
        "class RaisingServer(RequestServer):\n"
        "    def __init__(self, address, **options):\n"
        "        super().__init__(address, **options)\n"
        "        raise KeyError('no such setting')\n"
    )
    code, out, err = run_main(
        ["serve", "raising:RaisingServer", "--address", "127.0.0.1:0"], capsys
    )
    assert (code, out) == (_cli.EXIT_ERROR, "")
    assert_one_clean_error_line(err)
    assert "cannot create raising:RaisingServer: KeyError: 'no such setting'" in err


def closed_pipe() -> int:
    """The write end of a pipe whose read end is closed: writing to it fails (EPIPE)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


@pytest.mark.timeout(SUBPROCESS_TIMEOUT)
def test_request_with_stdout_closed_is_one_line_and_exit_1() -> None:
    stdout = closed_pipe()
    try:
        with running(EchoServer) as server:
            result = subprocess.run(
                [sys.executable, "-m", "mpreqrep", "request", server.address, "hi"],
                stdout=stdout,
                stderr=subprocess.PIPE,
                env=child_environment(),
                text=True,
                timeout=60 * UNIT,
            )
    finally:
        os.close(stdout)
    assert result.returncode == _cli.EXIT_ERROR
    assert_one_clean_error_line(result.stderr)
    assert "stdout is closed" in result.stderr


@pytest.mark.timeout(SUBPROCESS_TIMEOUT)
def test_serve_with_stdout_closed_serves_on_and_says_the_line_is_lost() -> None:
    address = f"127.0.0.1:{free_port()}"
    stdout = closed_pipe()
    try:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mpreqrep",
                "serve",
                "workers.echo:EchoServer",
                "--address",
                address,
            ],
            cwd=REPO,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=child_environment(),
            text=True,
        )
    finally:
        os.close(stdout)
    try:
        replies: list[str | None] = []
        assert wait_until(lambda: _answers(address, replies), 60 * UNIT)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60 * UNIT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0 and replies == ["ping\r\n"]
    assert "Traceback" not in err
    assert "stdout is closed" in err and "serving on" in err


def test_taken_port_is_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code, out, err = run_main(
            ["serve", "workers.echo:EchoServer", "--address", f"localhost:{port}"], capsys
        )
    assert code == _cli.EXIT_ERROR
    assert out == ""
    assert_one_clean_error_line(err)
    assert f"cannot listen at localhost:{port}: OSError" in err


@pytest.mark.timeout(SUBPROCESS_TIMEOUT)
@pytest.mark.parametrize("console_script", [False, True], ids=["python -m", "console script"])
def test_bad_input_in_a_real_process(console_script: bool) -> None:
    if console_script and not CONSOLE_SCRIPT.exists():
        pytest.skip("the mpreqrep console script is not installed")
    command = [str(CONSOLE_SCRIPT)] if console_script else [sys.executable, "-m", "mpreqrep"]
    result = subprocess.run(
        [*command, "serve", "no_such_module_here:Server"],
        cwd=REPO,
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=60 * UNIT,
    )
    assert result.returncode == _cli.EXIT_USAGE
    assert result.stdout == ""
    assert_one_clean_error_line(result.stderr)


# -- request ------------------------------------------------------------------------------


def test_request_prints_the_reply(capsys: pytest.CaptureFixture[str]) -> None:
    with running(EchoServer) as server:
        assert run_main(["request", server.address, "h\u00e9llo"], capsys) == (
            0,
            "h\u00e9llo\n",
            "",
        )
        assert run_main(["request", server.address, ""], capsys) == (0, "\n", "")
        argv = ["request", server.address, "x", "--timeout", str(10 * UNIT)]
        assert run_main(argv, capsys) == (0, "x\n", "")


def test_request_no_server_is_exit_3(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["request", f"localhost:{free_port()}", "hi"], capsys)
    assert (code, out) == (_cli.EXIT_NO_SERVER, "")
    assert_one_clean_error_line(err)
    assert "no server is listening" in err


def test_request_timeout_is_exit_4(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, never accepts
        address = f"localhost:{silent.getsockname()[1]}"
        code, out, err = run_main(["request", address, "hi", "--timeout", str(0.2 * UNIT)], capsys)
    assert (code, out) == (_cli.EXIT_TIMEOUT, "")
    assert_one_clean_error_line(err)
    assert "no reply" in err


def test_request_empty_reply_is_exit_5(capsys: pytest.CaptureFixture[str]) -> None:
    with running(PrimeServer) as server:
        code, out, err = run_main(["request", server.address, "not a limit"], capsys)
    assert (code, out) == (_cli.EXIT_EMPTY_REPLY, "")
    assert_one_clean_error_line(err)
    assert "without replying" in err


def test_request_past_max_reply_size_is_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    with running(EchoServer) as server:
        argv = ["request", server.address, "x" * 2000, "--max-reply-size", "1K"]
        code, out, err = run_main(argv, capsys)
        assert run_main([*argv[:3], "--max-reply-size", "2K"], capsys)[:2] == (0, "x" * 2000 + "\n")
    assert (code, out) == (_cli.EXIT_ERROR, "")
    assert_one_clean_error_line(err)
    assert "too long a reply" in err and "1024 bytes" in err


# -- serve in this process (so coverage sees the supervisor) -----------------------------


def test_serve_in_process_until_sigterm(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    address = f"localhost:{free_port()}"
    answered: list[str | None] = []

    def drive() -> None:
        """Once the server answered and logged stats, signal this process (never before)."""
        if wait_until(lambda: _answers(address, answered), 30 * UNIT) and wait_until(
            lambda: "stats served=1 " in caplog.text, 30 * UNIT
        ):
            os.kill(os.getpid(), signal.SIGTERM)

    previous_handler = signal.getsignal(signal.SIGTERM)
    driver = threading.Thread(target=drive)
    driver.start()
    with caplog.at_level(logging.INFO, logger="mpreqrep"):
        argv = ["serve", "workers.echo:EchoServer", "--address", address, "--async"]
        code, out, err = run_main([*argv, "--stats-interval", str(0.05 * UNIT)], capsys)
    driver.join(60 * UNIT)
    assert (code, err) == (0, "")
    assert (
        out == f"mpreqrep: serving workers.echo:EchoServer at 127.0.0.1:{address.split(':')[1]}\n"
    )
    assert answered == ["ping\r\n"]
    assert "received SIGTERM: draining" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is previous_handler  # restored


def _answers(address: str, replies: list[str | None]) -> bool:
    """Whether the server at ``address`` answers yet (recording its reply)."""
    try:
        replies.append(mpreqrep.do_request(address, "ping", timeout=5 * UNIT))
    except mpreqrep.NoServerError:
        return False
    return True


def test_server_failure_in_process_is_exit_1(
    in_tmp_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (in_tmp_dir / "locked_here.py").write_text(LOCKED_MODULE)
    code, out, err = run_main(["serve", "locked_here:LockedServer", "--workers", "1"], capsys)
    assert code == _cli.EXIT_ERROR
    assert out.startswith("mpreqrep: serving locked_here:LockedServer at ")
    assert_one_clean_error_line(err)
    assert "server failed: " in err


def test_server_thread_that_dies_after_serving_is_exit_1(
    in_tmp_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The exception ends the server's own thread (not the runner's): it still makes
    serve fail, on one line, without a traceback."""
    (in_tmp_dir / "dying_here.py").write_text(
        "from mpreqrep import RequestServer\n"
        "class DyingServer(RequestServer):\n"
        "    def run(self):\n"
        "        self.stop()\n"
        "        super().run()  # serves, and stops at once\n"
        "        raise RuntimeError('serving broke')\n"
    )
    argv = ["serve", "dying_here:DyingServer", "--address", "127.0.0.1:0"]
    code, out, err = run_main(argv, capsys)
    assert code == _cli.EXIT_ERROR
    assert out.startswith("mpreqrep: serving dying_here:DyingServer at ")
    assert_one_clean_error_line(err)
    assert "server failed: RuntimeError: serving broke" in err


def test_failures_of_leaves_other_threads_to_the_previous_hook() -> None:
    recorded: list[BaseException] = []
    delegated: list[BaseException | None] = []
    previous = threading.excepthook

    def before(args: threading.ExceptHookArgs) -> None:
        delegated.append(args.exc_value)

    threading.excepthook = before
    try:
        watched = threading.Thread(target=lambda: 1 / 0)
        other = threading.Thread(target=lambda: [][0])
        with _cli.failures_of(watched, recorded.append):
            for thread in (watched, other):
                thread.start()
                thread.join(10 * UNIT)
        assert [type(exc) for exc in recorded] == [ZeroDivisionError]
        assert [type(exc) for exc in delegated] == [IndexError]
        assert threading.excepthook is before  # put back
    finally:
        threading.excepthook = previous


def test_interrupted_request_is_exit_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: object, **kwargs: object) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(_cli, "do_request", interrupted)
    assert run_main(["request", "localhost:1", "hi"], capsys) == (130, "", "")


# -- serve in a child process, under signals ----------------------------------------------


@pytest.mark.timeout(SUBPROCESS_TIMEOUT)
def test_serve_answers_logs_stats_and_exits_0_on_sigterm(serve_cli: list[ServeProcess]) -> None:
    child = start(serve_cli, "workers.echo:EchoServer", "--stats-interval", str(0.1 * UNIT))
    address = child.read_address()
    assert mpreqrep.do_request(address, "hi", timeout=30 * UNIT) == "hi\r\n"
    child.wait_for_stderr("stats served=1 ")
    assert child.stop() == 0
    with pytest.raises(mpreqrep.NoServerError):
        mpreqrep.do_request(address, "hi")


@pytest.mark.timeout(SUBPROCESS_TIMEOUT)
@pytest.mark.parametrize(
    ("signum", "options"),
    [
        (signal.SIGINT, []),
        (signal.SIGTERM, ["--async"]),
        (signal.SIGINT, ["--workers", "1"]),
        (signal.SIGTERM, ["--workers", "2"]),
    ],
    ids=["SIGINT-sync", "SIGTERM-async", "SIGINT-process", "SIGTERM-process"],
)
def test_signal_drains_in_flight_requests_and_exits_0(
    signum: int, options: list[str], tmp_path: Path, serve_cli: list[ServeProcess]
) -> None:
    # The console script does not put the current directory on sys.path: serve must.
    child, thread, replies = start_holding(
        serve_cli, tmp_path, "first", *options, console_script=True
    )
    child.send(signum)
    child.wait_for_stderr("draining")
    child.send(signal.SIGTTIN)
    child.wait_for_stderr("SIGTTIN ignored: the server is stopping")
    assert child.process.poll() is None and not replies  # held: still in flight
    assert_released_and_answered(child, tmp_path, thread, replies)


@pytest.mark.timeout(SUBPROCESS_TIMEOUT)
@pytest.mark.parametrize("options", [["--async"], ["--workers", "1"]], ids=["threads", "process"])
def test_second_signal_exits_at_once(
    options: list[str],
    tmp_path: Path,
    serve_cli: list[ServeProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    temporary = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))  # short: socket paths
    monkeypatch.setenv("TMPDIR", str(temporary))  # the server's, to see it clean up
    child, thread, replies = start_holding(serve_cli, tmp_path, "stuck", *options)
    child.send(signal.SIGTERM)
    child.wait_for_stderr("draining")
    child.send(signal.SIGTERM)
    assert child.wait() == 128 + signal.SIGTERM
    assert any("second SIGTERM" in line for line in child.stderr)
    thread.join(30 * UNIT)
    assert replies == [""]  # never answered: its handler died with the process
    child.assert_no_descendants_left()
    assert list(temporary.iterdir()) == []  # no socket directory left behind
    temporary.rmdir()


@pytest.mark.timeout(SUBPROCESS_TIMEOUT)
def test_a_thread_handler_past_the_graceful_timeout_is_exit_1(
    tmp_path: Path, serve_cli: list[ServeProcess]
) -> None:
    """A thread cannot be killed: the graceful timeout (plus a margin) bounds serve anyway."""
    child, thread, replies = start_holding(
        serve_cli, tmp_path, "stuck", "--async", "--graceful-timeout", "0.5"
    )
    began = time.monotonic()
    assert child.stop() == _cli.EXIT_ERROR
    elapsed = time.monotonic() - began
    assert 0.5 + _cli.EXIT_MARGIN_S <= elapsed < 0.5 + _cli.EXIT_MARGIN_S + 10 * UNIT, elapsed
    assert any("did not stop within the graceful timeout" in line for line in child.stderr)
    thread.join(30 * UNIT)
    assert replies == [""]  # never answered


@pytest.mark.timeout(SUBPROCESS_TIMEOUT)
def test_ctrl_c_in_a_terminal_drains_too(tmp_path: Path, serve_cli: list[ServeProcess]) -> None:
    """Ctrl-C signals the whole process group, pool workers included."""
    child, thread, replies = start_holding(
        serve_cli, tmp_path, "first", "--workers", "1", new_session=True
    )
    os.killpg(child.process.pid, signal.SIGINT)
    child.wait_for_stderr("draining")
    assert_released_and_answered(child, tmp_path, thread, replies)


@pytest.mark.timeout(SUBPROCESS_TIMEOUT)
def test_primes_in_process_mode_from_the_repo_root(
    serve_cli: list[ServeProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    child = start(serve_cli, "workers.primes:PrimeServer", "--workers", "2", console_script=True)
    address = child.read_address()
    assert run_main(["request", address, "1000", "--timeout", str(60 * UNIT)], capsys)[:2] == (
        0,
        "168\n",
    )
    child.record_descendants()
    child.send(signal.SIGINT)
    assert child.wait() == 0
    child.assert_no_descendants_left()


@pytest.mark.timeout(SUBPROCESS_TIMEOUT)
def test_server_that_cannot_start_is_exit_1(tmp_path: Path, serve_cli: list[ServeProcess]) -> None:
    (tmp_path / "locked.py").write_text(LOCKED_MODULE)
    child = start(serve_cli, "locked:LockedServer", "--workers", "1", cwd=tmp_path)
    child.read_address()
    assert child.wait() == _cli.EXIT_ERROR
    assert "Traceback" not in "".join(child.stderr)
    assert child.stderr[-1].startswith("mpreqrep: error: server failed: "), child.stderr
