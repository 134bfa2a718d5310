"""SPEC section 5: each fault named, each survived (handler faults in every mode)."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import loky
import psutil
import pytest

import mpreqrep

from .conftest import UNIT, running, wait_until
from .test_server import fire

MODES = [pytest.param(False, id="sync"), pytest.param(True, id="async")]


class Faulty(mpreqrep.RequestServer):
    """Raises, returns a non-str, hangs or echoes, as the request says."""

    def handle_request(self, request: str) -> str:
        command = request.strip()
        if command == "raise":
            raise RuntimeError("handler exploded")
        if command == "bytes":
            return b"not a str"  # type: ignore[return-value]
        if command == "hang":
            threading.Event().wait(3 * UNIT)
        return "echo:" + request


class HostileStr(str):
    """A reply whose own methods misbehave: none of them may run on the I/O thread."""

    def encode(self, *args: Any, **kwargs: Any) -> bytes:
        raise SystemExit("encode() of a str subclass ran")

    def endswith(self, *args: Any, **kwargs: Any) -> bool:
        threading.Event().wait()  # would wedge the I/O thread for good
        return False


class BaseFault(BaseException):
    """A BaseException of the handler's own."""


class Hostile(mpreqrep.RequestServer):
    """Each request names a fault the handler commits; ``slow`` and others echo."""

    def handle_request(self, request: str) -> str:
        command = request.strip()
        if command == "exit":
            raise SystemExit(3)
        if command == "interrupt":
            raise KeyboardInterrupt
        if command == "base":
            raise BaseFault("a BaseException subclass")
        if command == "surrogate":
            return "name-\udcff"  # what os.fsdecode makes of a non-UTF-8 file name
        if command == "subclass":
            return HostileStr("subclass reply")
        if command == "raise":
            raise RuntimeError("handler exploded")
        if command == "bytes":
            return b"not a str"  # type: ignore[return-value]
        if command == "slow":
            time.sleep(0.3 * UNIT)  # the bystander's own work, not a synchronisation
        if command.startswith("big "):
            return "b" * int(command.split()[1])
        return "echo:" + request


# Each handler fault: what the client gets (the faulty request counts as failed
# unless its reply is right).
HANDLER_FAULTS = {
    "exit": "",
    "interrupt": "",
    "base": "",
    "surrogate": "",
    "raise": "",
    "bytes": "",
    "subclass": "subclass reply\r\n",
}
# sync-timeout: sync mode with a request timeout runs handlers on one handler thread.
FAULT_MODES = ["sync", "sync-timeout", "async", "process", "thread-executor", "loky-executor"]


@contextmanager
def hostile(mode: str, **options: Any) -> Iterator[mpreqrep.RequestServer]:
    """A running :class:`Hostile` server in ``mode`` (see ``FAULT_MODES``)."""
    executor: Executor | None = None
    if mode == "async":
        options["async_val"] = True
    elif mode == "sync-timeout":
        options.setdefault("request_timeout", 30 * UNIT)
    elif mode == "process":
        options["workers"] = 2
    elif mode == "thread-executor":
        executor = ThreadPoolExecutor(max_workers=2)
    elif mode == "loky-executor":
        executor = loky.ProcessPoolExecutor(max_workers=2)
    try:
        with running(Hostile, executor=executor, **options) as server:
            yield server
    finally:
        if executor is not None:
            executor.shutdown(wait=True)


@pytest.fixture
def hostile_server(request: pytest.FixtureRequest) -> Iterator[mpreqrep.RequestServer]:
    """A :class:`Hostile` server in the mode the test is parametrized with."""
    with hostile(request.param) as server:
        yield server


def raw_exchange(port: int, payload: bytes, *, half_close: bool = True) -> bytes:
    """Send raw bytes and read everything until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10 * UNIT) as sock:
        try:
            sock.sendall(payload)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:  # reset already (BrokenPipe, ConnectionReset, or ENOTCONN)
            return b""
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed this connection (EOF or reset), without a reply."""
    sock.settimeout(10 * UNIT)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("async_val", MODES)
@pytest.mark.parametrize("command", ["raise", "bytes"])
def test_handler_failure_is_logged_and_closes_without_reply(
    async_val: bool, command: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="mpreqrep"),
        running(Faulty, async_val=async_val) as server,
    ):
        assert mpreqrep.do_request(server.address, command) == ""
        assert mpreqrep.do_request(server.address, "next") == "echo:next\r\n"
        assert server.stats()["failed"] == 1
    failures = [r for r in caplog.records if "handle_request failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None


@pytest.mark.parametrize("async_val", MODES)
def test_oversize_request_is_closed_and_never_handled(async_val: bool) -> None:
    with running(Faulty, async_val=async_val, max_request_size=1000) as server:
        assert raw_exchange(server.port, b"x" * 5000) == b""
        assert raw_exchange(server.port, b"y" * 998 + b"\r\n") == b"echo:" + b"y" * 998 + b"\r\n"
        assert server.stats()["served"] == 1


@pytest.mark.parametrize("async_val", MODES)
def test_silent_client_is_dropped_after_the_read_timeout(async_val: bool) -> None:
    with running(async_val=async_val, read_timeout=0.3 * UNIT) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as silent:
            started = time.monotonic()
            assert closed_by_server(silent)
            assert 0.2 * UNIT < time.monotonic() - started < 5 * UNIT
        assert server.stats()["dropped"] == 1


def test_trickling_client_is_dropped_while_others_are_served() -> None:
    with (
        running(read_timeout=0.5 * UNIT) as server,
        socket.create_connection(("127.0.0.1", server.port)) as trickler,
    ):
        deadline = time.monotonic() + 10 * UNIT
        while time.monotonic() < deadline:
            try:
                trickler.send(b"a")
            except (BrokenPipeError, ConnectionResetError):
                break
            assert mpreqrep.do_request(server.address, "ok", 5 * UNIT) == "Requested: ok\r\n"
            if wait_until(lambda: server.stats()["dropped"] == 1, 0.1 * UNIT):
                break
        assert server.stats()["dropped"] == 1
        assert closed_by_server(trickler)


def test_client_that_closes_without_sending_is_not_handled() -> None:
    with running(Faulty) as server:
        assert raw_exchange(server.port, b"") == b""
        assert wait_until(lambda: server.stats()["dropped"] == 1, 5 * UNIT)
        assert server.stats()["served"] == 0


@pytest.mark.parametrize("async_val", MODES)
def test_invalid_utf8_is_decoded_with_errors_ignored(async_val: bool) -> None:
    with running(Faulty, async_val=async_val) as server:
        assert raw_exchange(server.port, b"a\xffb\xc3\r\n") == b"echo:ab\r\n"


def test_eof_without_crlf_is_a_request() -> None:
    with running(Faulty) as server:
        assert raw_exchange(server.port, b"no crlf") == b"echo:no crlf\r\n"


def test_bytes_after_the_first_crlf_are_ignored() -> None:
    with running(Faulty) as server:
        assert raw_exchange(server.port, b"one\r\ntwo\r\n") == b"echo:one\r\n"


def test_reset_mid_request_costs_nobody_a_reply() -> None:
    with running(Faulty, read_timeout=5 * UNIT) as server:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"partial")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # SO_LINGER 0: the server sees a reset
        assert mpreqrep.do_request(server.address, "fine") == "echo:fine\r\n"
        assert wait_until(lambda: server.stats()["dropped"] == 1, 5 * UNIT)


def test_request_timeout_in_sync_mode_cuts_the_client_off_while_the_handler_runs() -> None:
    release = threading.Event()

    class Stuck(mpreqrep.RequestServer):
        def handle_request(self, request: str) -> str:
            if request.strip() == "hang":
                release.wait(30 * UNIT)
            return "echo:" + request

    with running(Stuck, request_timeout=1 * UNIT) as server:
        started = time.monotonic()
        assert mpreqrep.do_request(server.address, "hang", 20 * UNIT) == ""
        assert time.monotonic() - started < 5 * UNIT
        # Handlers never overlap: a request behind the running handler times out too.
        assert mpreqrep.do_request(server.address, "queued", 20 * UNIT) == ""
        release.set()
        assert mpreqrep.do_request(server.address, "next", 20 * UNIT) == "echo:next\r\n"
        assert server.stats()["timed_out"] == 2


def test_request_timeout_closes_without_reply_in_thread_mode() -> None:
    with running(Faulty, async_val=True, request_timeout=0.3 * UNIT) as server:
        assert mpreqrep.do_request(server.address, "hang", 10 * UNIT) == ""
        assert mpreqrep.do_request(server.address, "next", 10 * UNIT) == "echo:next\r\n"
        assert server.stats()["timed_out"] == 1


@pytest.mark.parametrize("async_val", MODES)
def test_burst_of_300_simultaneous_connections_all_answered(async_val: bool) -> None:
    with running(async_val=async_val) as server:
        replies = fire(server.address, 300)
    assert replies == [f"Requested: x{i}\r\n" for i in range(300)]


def test_open_descriptors_return_to_baseline_after_good_and_bad_clients() -> None:
    process = psutil.Process()
    with running(Faulty, async_val=True, read_timeout=0.5 * UNIT, max_request_size=100) as server:
        baseline = process.num_fds()
        for round_ in range(3):
            silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(10)]
            for command in ("ok", "raise", "bytes"):
                fire(server.address, 5, command)
            raw_exchange(server.port, b"z" * 500)
            raw_exchange(server.port, b"")
            assert (
                mpreqrep.do_request(server.address, f"round{round_}") == f"echo:round{round_}\r\n"
            )
            for sock in silent:
                assert closed_by_server(sock)
                sock.close()
        assert wait_until(lambda: process.num_fds() <= baseline, 10 * UNIT), (
            process.num_fds(),
            baseline,
        )


def test_a_handlers_own_timeout_error_is_a_failure_with_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class SlowBackend(mpreqrep.RequestServer):
        def handle_request(self, request: str) -> str:
            raise TimeoutError("the database did not answer")

    with caplog.at_level(logging.ERROR, logger="mpreqrep"), running(SlowBackend) as server:
        assert mpreqrep.do_request(server.address, "q") == ""
        assert wait_until(lambda: server.stats()["failed"] == 1, 5 * UNIT)
        assert server.stats()["timed_out"] == 0
    assert any(record.exc_info for record in caplog.records)


@pytest.mark.parametrize("hostile_server", FAULT_MODES, indirect=True)
def test_every_handler_fault_costs_only_its_own_connection(
    hostile_server: mpreqrep.RequestServer, caplog: pytest.LogCaptureFixture
) -> None:
    """SystemExit, KeyboardInterrupt, a BaseException of its own, an unencodable
    reply, a str subclass: logged, that client gets "", bystanders in flight
    keep their replies, and the next request is answered."""
    server = hostile_server
    for fault, expected in HANDLER_FAULTS.items():
        with socket.create_connection(("127.0.0.1", server.port), timeout=10 * UNIT) as reading:
            reading.sendall(b"half a ")  # a bystander still sending its request
            slow: list[str | None] = []
            bystander = threading.Thread(
                target=lambda replies=slow: replies.append(
                    mpreqrep.do_request(server.address, "slow", 20 * UNIT)
                )
            )
            bystander.start()
            with caplog.at_level(logging.ERROR, logger="mpreqrep"):
                assert mpreqrep.do_request(server.address, fault, 20 * UNIT) == expected, fault
            reading.sendall(b"request\r\n")
            reading.shutdown(socket.SHUT_WR)
            assert reading.recv(100) == b"echo:half a request\r\n"
            bystander.join(30 * UNIT)
            assert slow == ["echo:slow\r\n"], fault
        assert mpreqrep.do_request(server.address, "next", 20 * UNIT) == "echo:next\r\n", fault
    failed = [fault for fault, expected in HANDLER_FAULTS.items() if not expected]
    assert wait_until(lambda: server.stats()["failed"] == len(failed), 5 * UNIT)
    assert server.is_alive()
    tracebacks = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert len(tracebacks) >= len(failed)


def slow_reader(port: int, request: bytes, *, receive_buffer: int = 65536) -> socket.socket:
    """A connection with a small receive buffer that has sent ``request`` and half-closed."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)  # before connecting
    sock.settimeout(10 * UNIT)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request)
    sock.shutdown(socket.SHUT_WR)
    return sock


def read_at(sock: socket.socket, bytes_per_s: float) -> bytes:
    """Read until the server closes, at about ``bytes_per_s``: the client's pace."""
    received = bytearray()
    started = time.monotonic()
    while True:
        ahead_s = started + len(received) / bytes_per_s - time.monotonic()
        if ahead_s > 0:
            time.sleep(ahead_s)  # the reader's pace, not a synchronisation
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(received)
        received += chunk


REPLY_MODES = ["sync", "async", "process"]


@pytest.mark.parametrize("mode", REPLY_MODES)
def test_a_slow_steady_reader_gets_the_whole_reply(mode: str) -> None:
    """12 MB at 5 MB/s outlasts the read timeout even past what the kernel
    buffers (up to 4 MB): it must arrive whole."""
    size = 12_000_000
    read_timeout = 1 * UNIT
    with hostile(mode, read_timeout=read_timeout) as server:
        started = time.monotonic()
        with slow_reader(server.port, f"big {size}\r\n".encode()) as sock:
            reply = read_at(sock, 5_000_000 / UNIT)
        assert time.monotonic() - started > 2 * read_timeout
        assert len(reply) == size + 2 and reply == b"b" * size + b"\r\n"
        assert wait_until(lambda: server.stats()["served"] == 1, 5 * UNIT)
        assert server.stats()["dropped"] == 0


def test_a_reader_that_stops_is_dropped_with_a_reset_not_a_clean_end() -> None:
    with (
        hostile("sync", read_timeout=0.5 * UNIT) as server,
        slow_reader(server.port, b"big 8000000\r\n") as sock,
    ):
        first = sock.recv(65536)
        assert first.startswith(b"bbb")
        assert wait_until(lambda: server.stats()["dropped"] == 1, 10 * UNIT)
        with pytest.raises(ConnectionResetError):
            read_at(sock, 1e12)  # what the kernel kept, then the reset
        assert mpreqrep.do_request(server.address, "next", 10 * UNIT) == "echo:next\r\n"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_buffered_reply_bytes_past_the_bound_pause_accepting(mode: str) -> None:
    with hostile(mode, max_buffered_bytes=1_000_000, read_timeout=30 * UNIT) as server:
        stalled = slow_reader(server.port, b"big 8000000\r\n")  # and never read
        assert wait_until(lambda: server.stats()["buffered_bytes"] > 1_000_000, 10 * UNIT)
        replies: list[str | None] = []
        waiting = threading.Thread(
            target=lambda: replies.append(mpreqrep.do_request(server.address, "next", 20 * UNIT))
        )
        waiting.start()
        assert not wait_until(lambda: bool(replies), 0.5 * UNIT)  # in the backlog meanwhile
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stalled.close()  # the stalled client gives up: its buffer goes, accepting resumes
        waiting.join(20 * UNIT)
        assert replies == ["echo:next\r\n"]
        assert wait_until(lambda: server.stats()["buffered_bytes"] == 0, 5 * UNIT)


def test_request_bytes_count_against_the_buffer_bound_too() -> None:
    with hostile("async", max_buffered_bytes=100_000, read_timeout=30 * UNIT) as server:
        uploader = socket.create_connection(("127.0.0.1", server.port), timeout=10 * UNIT)
        uploader.sendall(b"u" * 200_000)  # no CRLF yet: held by the server
        assert wait_until(lambda: server.stats()["buffered_bytes"] >= 100_000, 10 * UNIT)
        replies: list[str | None] = []
        waiting = threading.Thread(
            target=lambda: replies.append(mpreqrep.do_request(server.address, "next", 20 * UNIT))
        )
        waiting.start()
        assert not wait_until(lambda: bool(replies), 0.5 * UNIT)  # in the backlog meanwhile
        uploader.sendall(b"\r\n")
        uploader.shutdown(socket.SHUT_WR)
        assert raw_read(uploader) == b"echo:" + b"u" * 200_000 + b"\r\n"
        uploader.close()
        waiting.join(20 * UNIT)
        assert replies == ["echo:next\r\n"]


def raw_read(sock: socket.socket) -> bytes:
    """Everything until the server closes."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)
