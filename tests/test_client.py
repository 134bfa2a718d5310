"""do_request against our server and against plain sockets that misbehave."""

from __future__ import annotations

import contextlib
import http.server
import inspect
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

import mpreqrep

from .backlog_race import close_with_connection_in_backlog
from .conftest import UNIT, running, serve_once


@pytest.fixture
def silent_listener() -> Iterator[socket.socket]:
    """A socket that listens and never accepts: connects succeed, replies never come."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


def test_round_trip() -> None:
    with running() as server:
        assert mpreqrep.do_request(server.address, "hi") == "Requested: hi\r\n"


def test_sends_crlf_and_half_closes() -> None:
    port, thread, received = serve_once(b"ok\r\nignored")
    assert mpreqrep.do_request(f"localhost:{port}", "ping", timeout=10 * UNIT) == "ok\r\n"
    thread.join(10 * UNIT)
    assert received == [b"ping\r\n"]


def test_reply_without_crlf_ends_at_eof() -> None:
    port, thread, _ = serve_once(b"partial")
    assert mpreqrep.do_request(f"localhost:{port}", "x") == "partial"
    thread.join(10 * UNIT)


def test_close_without_reply_gives_empty_string() -> None:
    port, thread, _ = serve_once(None)
    assert mpreqrep.do_request(f"localhost:{port}", "x") == ""
    thread.join(10 * UNIT)


def test_timeout_returns_none(silent_listener: socket.socket) -> None:
    port = silent_listener.getsockname()[1]
    started = time.monotonic()
    assert mpreqrep.do_request(f"localhost:{port}", "x", timeout=0.2 * UNIT) is None
    assert time.monotonic() - started < 5 * UNIT


def test_no_server_raises_no_server_error() -> None:
    with pytest.raises(mpreqrep.NoServerError) as caught:
        mpreqrep.do_request(f"localhost:{free_port()}", "x")
    assert isinstance(caught.value, RuntimeError)
    assert isinstance(caught.value, ConnectionError)
    assert isinstance(caught.value.__cause__, OSError)


@pytest.mark.parametrize("request_", [b"bytes", 3, None])
def test_non_str_request_is_a_value_error(request_: object) -> None:
    with pytest.raises(ValueError):
        mpreqrep.do_request("localhost:1", request_)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [0, -1, None, float("inf"), float("nan"), 1e300])
def test_non_positive_or_endless_timeout_waits(timeout: float | None) -> None:
    with running() as server:
        assert mpreqrep.do_request(server.address, "w", timeout=timeout) == "Requested: w\r\n"


def test_http_server_answers_its_status_line() -> None:
    httpd = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        reply = mpreqrep.do_request(
            f"localhost:{httpd.server_port}", "GET / HTTP/1.0\r\n", 10 * UNIT
        )
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert reply is not None
    assert reply.startswith("HTTP/1.0 ") and reply.endswith("\r\n")


def test_ipv6_address_in_brackets() -> None:
    with mpreqrep.RequestServer("[::1]:0") as server:
        assert server.address == f"[::1]:{server.port}"
        assert mpreqrep.do_request(server.address, "six", 10 * UNIT) == "Requested: six\r\n"
        assert mpreqrep.do_request(f"tcp://[::1]:{server.port}", "6") == "Requested: 6\r\n"


@pytest.mark.parametrize(
    "address", ["udp://localhost:1", "itc://localhost:1", "::1:1", "localhost:-1", "[::1]"]
)
def test_another_protocol_or_a_malformed_address_is_a_value_error(address: str) -> None:
    with pytest.raises(ValueError):
        mpreqrep.do_request(address, "x", timeout=1 * UNIT)


def test_listener_closed_with_the_connection_in_its_backlog_gives_empty_string() -> None:
    """No bare OSError (ECONNRESET, EPIPE, ENOTCONN on shutdown): the server closed
    without a reply, so the client returns ``""``."""
    outcomes = close_with_connection_in_backlog(
        lambda address: mpreqrep.do_request(address, "x", timeout=10 * UNIT), rounds=80
    )
    assert outcomes == [""] * 80


def test_a_reply_cut_short_by_a_reset_is_no_reply() -> None:
    listener = socket.create_server(("127.0.0.1", 0))

    def cut_short() -> None:
        with listener, listener.accept()[0] as conn:
            while conn.recv(100):  # the whole request, up to the client's half-close
                pass
            conn.sendall(b"the first half of a rep")
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    thread = threading.Thread(target=cut_short)
    thread.start()
    address = f"localhost:{listener.getsockname()[1]}"
    assert mpreqrep.do_request(address, "x", 10 * UNIT) == ""
    thread.join(10 * UNIT)


def stream_without_crlf(limit: int) -> tuple[int, threading.Thread, list[int]]:
    """A server that reads the request, then sends bytes without a CRLF until the
    client hangs up or ``limit`` bytes are out; records how many it sent."""
    listener = socket.create_server(("127.0.0.1", 0))
    sent = [0]

    def stream() -> None:
        with listener, listener.accept()[0] as conn:
            conn.settimeout(10 * UNIT)
            while conn.recv(4096):
                pass
            chunk = b"x" * 65536
            with contextlib.suppress(OSError):  # the client hung up: what we wait for
                while sent[0] < limit:
                    conn.sendall(chunk)
                    sent[0] += len(chunk)

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread, sent


def test_a_reply_that_never_ends_is_cut_off_at_the_cap_not_buffered_until_the_timeout() -> None:
    port, thread, sent = stream_without_crlf(limit=256 * 2**20)
    started = time.monotonic()
    with pytest.raises(mpreqrep.ReplyTooLargeError, match="1048576 bytes"):
        mpreqrep.do_request(f"localhost:{port}", "x", timeout=60 * UNIT, max_reply_size=2**20)
    assert time.monotonic() - started < 30 * UNIT
    thread.join(10 * UNIT)
    assert sent[0] < 256 * 2**20  # the client hung up, the server could not go on


@pytest.mark.parametrize(
    "reply", [b"a" * 98 + b"\r\n", b"a" * 100, b"a" * 99 + b"\r", b"a" * 98 + b"\r\nand more"]
)
def test_a_reply_of_max_reply_size_bytes_comes_whole(reply: bytes) -> None:
    port, thread, _ = serve_once(reply)
    whole = reply[: reply.find(b"\r\n") + 2] if b"\r\n" in reply else reply
    assert mpreqrep.do_request(f"localhost:{port}", "x", max_reply_size=100) == whole.decode()
    thread.join(10 * UNIT)


def test_a_reply_one_byte_past_max_reply_size_raises() -> None:
    port, thread, _ = serve_once(b"a" * 100 + b"\r\n")
    with pytest.raises(mpreqrep.ReplyTooLargeError):
        mpreqrep.do_request(f"localhost:{port}", "x", max_reply_size=100)
    thread.join(10 * UNIT)


@pytest.mark.parametrize("size", [0, -1, 2.5, True, "100"])
def test_a_max_reply_size_that_is_no_positive_int_raises_before_connecting(
    size: object, silent_listener: socket.socket
) -> None:
    address = f"127.0.0.1:{silent_listener.getsockname()[1]}"
    with pytest.raises(ValueError, match="max_reply_size"):
        mpreqrep.do_request(address, "x", 10 * UNIT, max_reply_size=size)  # type: ignore[arg-type]
    silent_listener.settimeout(0)
    with pytest.raises(BlockingIOError):
        silent_listener.accept()  # nobody connected


def test_the_reply_cap_defaults_to_one_gib_and_none_lifts_it() -> None:
    assert inspect.signature(mpreqrep.do_request).parameters["max_reply_size"].default == 2**30
    port, thread, _ = serve_once(b"b" * (4 * 2**20))
    reply = mpreqrep.do_request(f"localhost:{port}", "x", 30 * UNIT, max_reply_size=None)
    assert reply == "b" * (4 * 2**20)
    thread.join(10 * UNIT)


def test_a_request_that_cannot_be_encoded_raises_before_connecting(
    silent_listener: socket.socket,
) -> None:
    silent_listener.setblocking(False)
    with pytest.raises(UnicodeEncodeError):
        mpreqrep.do_request(f"localhost:{silent_listener.getsockname()[1]}", "lone \ud800")
    with pytest.raises(BlockingIOError):  # nothing ever connected
        silent_listener.accept()
