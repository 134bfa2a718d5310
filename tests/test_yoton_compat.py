"""The real yoton against mpreqrep, both directions, byte for byte."""

from __future__ import annotations

import contextlib
import re
import socket
import sys
from collections.abc import Callable, Iterator
from types import ModuleType

import pytest

import mpreqrep

from .conftest import UNIT, assert_exits_promptly, running, serve_once, wait_until

REQUESTS = ["hello", "with crlf\r\n", "", "unicode é ✓", "two\r\nlines", "trailing\n"]


@pytest.fixture
def yoton_server(yoton: ModuleType) -> Iterator[str]:
    """yoton's own RequestServer (sync mode) on an ephemeral port."""
    server = yoton.RequestServer("localhost:0")
    port = server._bsd_socket.getsockname()[1]
    server.start()
    try:
        wait_for_yoton(yoton, f"localhost:{port}")
        yield f"localhost:{port}"
    finally:
        server.stop()
        server.join(10 * UNIT)


def wait_for_yoton(yoton: ModuleType, address: str) -> None:
    """yoton's server listens only once its thread runs: poll until it answers."""

    def answers() -> bool:
        try:
            return bool(yoton.do_request(address, "ready?", 5 * UNIT))
        except RuntimeError:
            return False

    assert wait_until(answers, 20 * UNIT), "yoton server never answered"


def capture_client_bytes(send: Callable[[str], object]) -> bytes:
    """Run a client call against a raw socket; return the bytes it sent until EOF."""
    port, thread, received = serve_once(b"R\r\n")
    send(f"localhost:{port}")
    thread.join(10 * UNIT)
    return received[0]


def capture_server_bytes(port: int, payload: bytes) -> bytes:
    """Send raw bytes to a server, half-close, return every byte it sent.

    yoton's server reads one byte at a time up to the first CRLF, so a payload
    with bytes after it leaves them unread when it closes, and the kernel then
    resets the connection: the half-close may find it gone (ENOTCONN) and the
    reset ends the reply (the bytes that came before it are still read).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10 * UNIT) as sock:
        sock.sendall(payload)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(4096):
                chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("text", REQUESTS)
def test_yoton_client_against_our_server(yoton: ModuleType, text: str) -> None:
    with running() as server:
        assert yoton.do_request(server.address, text, 10 * UNIT) == mpreqrep.do_request(
            server.address, text
        )


@pytest.mark.parametrize("async_val", [False, True])
def test_yoton_client_reply_matches_yoton_server(
    yoton: ModuleType, yoton_server: str, async_val: bool
) -> None:
    with running(async_val=async_val) as server:
        for text in REQUESTS:
            ours = yoton.do_request(server.address, text, 10 * UNIT)
            theirs = yoton.do_request(yoton_server, text, 10 * UNIT)
            assert ours == theirs


@pytest.mark.parametrize("text", REQUESTS)
def test_our_client_against_yoton_server(yoton_server: str, text: str) -> None:
    expected = "Requested: " + (text if text.endswith("\r\n") else text + "\r\n")
    expected = expected[: expected.index("\r\n") + 2]
    assert mpreqrep.do_request(yoton_server, text, 10 * UNIT) == expected


@pytest.mark.parametrize("text", REQUESTS)
def test_clients_send_the_same_bytes(yoton: ModuleType, text: str) -> None:
    ours = capture_client_bytes(lambda address: mpreqrep.do_request(address, text, 10 * UNIT))
    theirs = capture_client_bytes(lambda address: yoton.do_request(address, text, 10 * UNIT))
    assert ours == theirs


@pytest.mark.parametrize(
    "payload", [b"hello\r\n", b"caf\xc3\xa9\r\n", b"bad\xff\r\n", b"a\r\nb\r\n", b"x\r\n"]
)
def test_servers_send_the_same_bytes(yoton_server: str, payload: bytes) -> None:
    yoton_port = int(yoton_server.rsplit(":", 1)[1])
    with running() as server:
        assert capture_server_bytes(server.port, payload) == capture_server_bytes(
            yoton_port, payload
        )


def test_drop_in_import_swap(yoton: ModuleType) -> None:
    """Code written for yoton runs unchanged with the module swapped."""
    for module in (yoton, mpreqrep):

        class Upper(module.RequestServer):  # type: ignore[name-defined,misc]
            def handle_request(self, request: str) -> str:
                return request.upper()

        server = Upper("localhost:0", async_val=False, verbose=0)
        port = server._bsd_socket.getsockname()[1] if module is yoton else server.port
        server.start()
        try:
            wait_for_yoton(yoton, f"localhost:{port}")
            assert module.do_request(f"localhost:{port}", "swap", 10 * UNIT) == "SWAP\r\n"
        finally:
            server.stop()
            server.join(10 * UNIT)


EXIT_SCRIPT = """
import sys, threading, time
module = sys.argv[1]
if module == "yoton":
    import pyzo, os
    sys.path.insert(0, os.path.dirname(pyzo.__file__))
import importlib
lib = importlib.import_module(module)
started = threading.Event()

class Slow(lib.RequestServer):
    def handle_request(self, request):
        started.set()
        time.sleep(10)
        return "late"

server = Slow("localhost:0", async_val=True)
port = server._bsd_socket.getsockname()[1] if module == "yoton" else server.port
server.start()
threading.Thread(target=lib.do_request, args=(f"localhost:{port}", "x", 30), daemon=True).start()
assert started.wait(30), "the handler never started"
print("exiting", flush=True)
"""


@pytest.mark.parametrize("module", ["yoton", "mpreqrep"])
def test_running_async_handler_does_not_block_exit(module: str) -> None:
    """Handler threads are daemons, as yoton's: a 10 s handler costs exit nothing."""
    assert_exits_promptly([sys.executable, "-c", EXIT_SCRIPT, module])


def verbose_lines(module: ModuleType, yoton: ModuleType, capsys: pytest.CaptureFixture[str]) -> str:
    """The verbose output of a server of ``module``: its hosting line and one
    accept line, with the port numbers taken out."""
    server = module.RequestServer("localhost:0", verbose=1)
    port = server._bsd_socket.getsockname()[1] if module is yoton else server.port
    capsys.readouterr()
    server.start()
    try:
        wait_for_yoton(yoton, f"localhost:{port}")
        mpreqrep.do_request(f"localhost:{port}", "last", 10 * UNIT)
    finally:
        server.stop()
        server.join(10 * UNIT)
    lines = capsys.readouterr().out.splitlines()
    return re.sub(r"\b\d{4,5}\b", "N", "\n".join([lines[0], lines[-1]]))


def test_verbose_output_is_yotons(yoton: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    ours = verbose_lines(mpreqrep, yoton, capsys)
    assert ours == verbose_lines(yoton, yoton, capsys)
    assert ours.startswith("Yoton: hosting at 127.0.0.1, port N\nhandling request from: ")
