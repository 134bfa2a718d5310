"""do_request_async against tiny asyncio servers that misbehave, and against ours."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mpreqrep
from mpreqrep._aclient import do_request_async
from workers.primes import PrimeServer
from workers.slow_io import SlowIOServer

from .backlog_race import close_with_connection_in_backlog
from .conftest import UNIT, running

T = TypeVar("T")
Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on a fresh event loop, bounded by the test unit."""
    return asyncio.run(asyncio.wait_for(coroutine, 30 * UNIT))


@asynccontextmanager
async def tiny_server(behaviour: Behaviour) -> AsyncIterator[str]:
    """An asyncio server on an ephemeral port running ``behaviour`` per connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await behaviour(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"localhost:{port}"


def replying(reply: bytes, received: list[bytes] | None = None) -> Behaviour:
    """Read the whole request (to EOF, so the client must half-close), then reply."""

    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()
        if received is not None:
            received.append(request)
        writer.write(reply)
        await writer.drain()

    return behaviour


async def request_via(behaviour: Behaviour, request: str, timeout: float = 10 * UNIT) -> str | None:
    async with tiny_server(behaviour) as address:
        return await do_request_async(address, request, timeout=timeout)


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


# -- against tiny asyncio servers ---------------------------------------------------------


def test_sends_crlf_half_closes_and_returns_the_first_line() -> None:
    received: list[bytes] = []
    reply = run(request_via(replying(b"ok\r\nignored\r\n", received), "ping"))
    assert reply == "ok\r\n"
    assert received == [b"ping\r\n"]


def test_does_not_double_a_trailing_crlf() -> None:
    received: list[bytes] = []
    run(request_via(replying(b"ok\r\n", received), "ping\r\n"))
    assert received == [b"ping\r\n"]


def test_utf8_both_ways_and_bad_bytes_dropped() -> None:
    received: list[bytes] = []
    reply = run(request_via(replying(b"caf\xc3\xa9 \xff\xfe!\r\n", received), "h\u00e9llo \u2603"))
    assert reply == "caf\u00e9 !\r\n"
    assert received == ["h\u00e9llo \u2603\r\n".encode()]


def test_close_without_reply_gives_empty_string() -> None:
    assert run(request_via(replying(b""), "ping")) == ""


def test_reply_without_crlf_is_returned_at_eof() -> None:
    assert run(request_via(replying(b"partial"), "ping")) == "partial"


def test_reply_trickled_byte_by_byte() -> None:
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        for byte in b"slow\r\n":
            writer.write(bytes([byte]))
            await writer.drain()

    assert run(request_via(trickle, "ping")) == "slow\r\n"


def test_reset_without_reply_gives_empty_string() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    assert run(request_via(reset, "ping")) == ""


def test_timeout_returns_none_promptly() -> None:
    async def scenario() -> tuple[str | None, float]:
        release = asyncio.Event()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await release.wait()

        async with tiny_server(silent) as address:
            started = time.monotonic()
            reply = await do_request_async(address, "ping", timeout=0.2 * UNIT)
            elapsed = time.monotonic() - started
            release.set()
        return reply, elapsed

    reply, elapsed = run(scenario())
    assert reply is None
    assert 0.2 * UNIT <= elapsed < 10 * UNIT


@pytest.mark.parametrize("timeout", [None, 0, -1, float("nan"), float("inf"), 1e300])
def test_no_timeout_waits_for_a_late_reply(timeout: float | None) -> None:
    async def late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        await asyncio.sleep(0.2 * UNIT)
        writer.write(b"late\r\n")

    async def scenario() -> str | None:
        async with tiny_server(late) as address:
            return await do_request_async(address, "ping", timeout=timeout)

    assert run(scenario()) == "late\r\n"


def test_many_concurrent_requests_on_one_loop() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        await asyncio.sleep(0.05 * UNIT)
        writer.write(b"re:" + line)

    async def scenario() -> list[str | None]:
        async with tiny_server(echo) as address:
            calls = [do_request_async(address, f"n{i}", timeout=20 * UNIT) for i in range(50)]
            return await asyncio.gather(*calls)

    assert run(scenario()) == [f"re:n{i}\r\n" for i in range(50)]


def test_cancelling_the_caller_closes_the_connection() -> None:
    async def scenario() -> None:
        received = asyncio.Event()
        closed = asyncio.Event()

        async def trickle_until_closed(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            await reader.read()
            received.set()
            try:
                while True:  # bytes without CRLF: the client keeps reading
                    writer.write(b".")
                    await writer.drain()
                    await asyncio.sleep(0.01 * UNIT)
            except ConnectionError:
                closed.set()

        async with tiny_server(trickle_until_closed) as address:
            task = asyncio.create_task(do_request_async(address, "ping"))
            await asyncio.wait_for(received.wait(), 10 * UNIT)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(closed.wait(), 10 * UNIT)

    run(scenario())


def test_no_server_raises_no_server_error() -> None:
    with pytest.raises(mpreqrep.NoServerError) as caught:
        run(do_request_async(f"localhost:{free_port()}", "ping"))
    assert isinstance(caught.value, RuntimeError)
    assert isinstance(caught.value, ConnectionError)


@pytest.mark.parametrize("request_value", [b"bytes", 42, None])
def test_non_str_request_raises_value_error(request_value: Any) -> None:
    with pytest.raises(ValueError, match="string"):
        run(do_request_async("localhost:1", request_value))


@pytest.mark.parametrize("address", ["localhost", "localhost:70000", "localhost:name+x"])
def test_malformed_address_raises_value_error(address: str) -> None:
    with pytest.raises(ValueError):
        run(do_request_async(address, "ping"))


# -- against a real RequestServer ---------------------------------------------------------


def test_round_trip_with_request_server() -> None:
    with running() as server:
        assert run(do_request_async(server.address, "hi")) == "Requested: hi\r\n"


def test_handler_failure_gives_empty_string() -> None:
    with running(PrimeServer) as server:
        assert run(do_request_async(server.address, "not a number", timeout=10 * UNIT)) == ""
        assert run(do_request_async(server.address, "10", timeout=10 * UNIT)) == "4\r\n"


def test_timeout_against_a_slow_handler() -> None:
    with running(SlowIOServer, async_val=True) as server:
        assert run(do_request_async(server.address, str(0.5 * UNIT), timeout=0.1 * UNIT)) is None


def test_concurrent_requests_overlap_in_async_mode() -> None:
    delay = 0.5 * UNIT
    count = 8

    async def scenario(address: str) -> list[str | None]:
        calls = [do_request_async(address, str(delay), timeout=20 * UNIT) for _ in range(count)]
        return await asyncio.gather(*calls)

    with running(SlowIOServer, async_val=True) as server:
        started = time.monotonic()
        replies = run(scenario(server.address))
        elapsed = time.monotonic() - started
    assert replies == [f"slept {delay}\r\n"] * count
    assert elapsed < count * delay / 2


@pytest.fixture(scope="module")
def echo_address() -> Iterator[str]:
    with running() as server:
        yield server.address


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=200))
def test_same_reply_as_do_request(echo_address: str, text: str) -> None:
    expected = mpreqrep.do_request(echo_address, text, timeout=10 * UNIT)
    assert run(do_request_async(echo_address, text, timeout=10 * UNIT)) == expected


def test_ipv6_address_in_brackets_and_other_protocols() -> None:
    with mpreqrep.RequestServer("[::1]:0") as server:
        assert run(do_request_async(server.address, "six", 10 * UNIT)) == "Requested: six\r\n"
    for address in ("udp://localhost:1", "::1:1", "localhost:-1"):
        with pytest.raises(ValueError):
            run(do_request_async(address, "x"))


def test_listener_closed_with_the_connection_in_its_backlog_gives_empty_string() -> None:
    outcomes = close_with_connection_in_backlog(
        lambda address: asyncio.run(do_request_async(address, "x", timeout=10 * UNIT)), rounds=40
    )
    assert outcomes == [""] * 40


def test_a_reply_cut_short_by_a_reset_is_no_reply() -> None:
    async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.write(b"the first half of a rep")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    assert run(request_via(cut_short, "ping")) == ""


def streaming_without_crlf(limit: int, sent: list[int]) -> Behaviour:
    """Read the request, then send bytes without a CRLF until the client hangs up
    (or ``limit`` bytes are out), counting them in ``sent``."""

    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        chunk = b"x" * 65536
        with contextlib.suppress(OSError):  # the client hung up: what we wait for
            while sent[0] < limit:
                writer.write(chunk)
                await writer.drain()
                sent[0] += len(chunk)

    return behaviour


def test_a_reply_that_never_ends_is_cut_off_at_the_cap() -> None:
    sent = [0]

    async def scenario() -> None:
        async with tiny_server(streaming_without_crlf(256 * 2**20, sent)) as address:
            with pytest.raises(mpreqrep.ReplyTooLargeError, match="1048576 bytes"):
                await do_request_async(address, "x", 60 * UNIT, max_reply_size=2**20)

    run(scenario())
    assert sent[0] < 256 * 2**20


@pytest.mark.parametrize("size", [0, -1, 2.5, True])
def test_a_max_reply_size_that_is_no_positive_int_raises(size: object) -> None:
    with pytest.raises(ValueError, match="max_reply_size"):
        run(do_request_async("127.0.0.1:1", "x", 10 * UNIT, max_reply_size=size))  # type: ignore[arg-type]


@pytest.mark.parametrize(("size", "too_large"), [(100, False), (101, True)])
def test_a_reply_of_max_reply_size_bytes_comes_whole_and_one_more_raises(
    size: int, too_large: bool
) -> None:
    reply = b"a" * (size - 2) + b"\r\n"

    async def scenario() -> str | None:
        async with tiny_server(replying(reply)) as address:
            return await do_request_async(address, "x", max_reply_size=100)

    if too_large:
        with pytest.raises(mpreqrep.ReplyTooLargeError):
            run(scenario())
    else:
        assert run(scenario()) == reply.decode()


def test_the_reply_cap_defaults_to_the_blocking_clients() -> None:
    default = inspect.signature(do_request_async).parameters["max_reply_size"].default
    assert default == inspect.signature(mpreqrep.do_request).parameters["max_reply_size"].default
