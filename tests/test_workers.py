"""The ready-made servers in workers/: handler logic directly, then over real servers."""

from __future__ import annotations

import json
import logging
import pickle
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mpreqrep
from workers.echo import EchoServer
from workers.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    JsonRpcError,
    JsonRpcServer,
)
from workers.primes import DEFAULT_LIMIT, MAX_LIMIT, PrimeServer, count_primes, parse_limit
from workers.slow_io import DEFAULT_DELAY_S, MAX_DELAY_S, SlowIOServer, parse_delay

from .conftest import UNIT, ask_all, running

ALL_SERVERS = [EchoServer, PrimeServer, JsonRpcServer, SlowIOServer]


def unstarted(server_class: type[mpreqrep.RequestServer]) -> mpreqrep.RequestServer:
    """A server bound to an ephemeral port, for calling its handler directly."""
    server = server_class("127.0.0.1:0")
    server.stop()
    server.run()  # stop() before run(): closes the listener and returns at once
    return server


def call(server_class: type[mpreqrep.RequestServer], request: str) -> str:
    return unstarted(server_class).handle_request(request)


@pytest.mark.parametrize("server_class", ALL_SERVERS)
def test_is_documented_and_pickles_for_process_workers(
    server_class: type[mpreqrep.RequestServer],
) -> None:
    assert server_class.__doc__ and server_class.__module__.startswith("workers.")
    assert type(pickle.loads(pickle.dumps(unstarted(server_class)))) is server_class


# -- echo ---------------------------------------------------------------------------------


@pytest.mark.parametrize("request_text", ["hi\r\n", "", "caf\u00e9 \u2603\r\n", "no crlf"])
def test_echo_returns_the_request_unchanged(request_text: str) -> None:
    assert call(EchoServer, request_text) == request_text


def test_echo_over_a_server() -> None:
    with running(EchoServer) as server:
        assert mpreqrep.do_request(server.address, "hello", timeout=10 * UNIT) == "hello\r\n"
        assert mpreqrep.do_request(server.address, "", timeout=10 * UNIT) == "\r\n"


# -- primes -------------------------------------------------------------------------------


def sieve_count(limit: int) -> int:
    """Reference count of primes <= limit."""
    if limit < 2:
        return 0
    flags = [True] * (limit + 1)
    flags[0] = flags[1] = False
    for number in range(2, int(limit**0.5) + 1):
        if flags[number]:
            flags[number * number :: number] = [False] * len(flags[number * number :: number])
    return sum(flags)


@pytest.mark.parametrize(
    ("limit", "count"),
    [(-5, 0), (0, 0), (1, 0), (2, 1), (3, 2), (4, 2), (9, 4), (10, 4), (100, 25), (1000, 168)],
)
def test_count_primes_known_values(limit: int, count: int) -> None:
    assert count_primes(limit) == count


def test_count_primes_matches_a_sieve() -> None:
    assert [count_primes(n) for n in range(600)] == [sieve_count(n) for n in range(600)]
    assert count_primes(DEFAULT_LIMIT) == sieve_count(DEFAULT_LIMIT) == 2262


@pytest.mark.parametrize(
    ("request_text", "limit"),
    [("20000\r\n", 20000), (" 7 ", 7), ("0", 0), (str(MAX_LIMIT), MAX_LIMIT)],
)
def test_parse_limit(request_text: str, limit: int) -> None:
    assert parse_limit(request_text) == limit


@pytest.mark.parametrize("request_text", ["", "\r\n", "abc\r\n", "1.5", "-1", str(MAX_LIMIT + 1)])
def test_bad_limit_raises_a_clear_value_error(request_text: str) -> None:
    with pytest.raises(ValueError, match="limit"):
        call(PrimeServer, request_text)


def test_prime_server_replies_with_the_count() -> None:
    assert call(PrimeServer, "1000\r\n") == "168"


def test_primes_over_a_process_pool() -> None:
    with running(PrimeServer, workers=2) as server:
        replies = ask_all(server.address, ["1000", "garbage", "100", "10"])
        assert mpreqrep.do_request(server.address, "2", timeout=30 * UNIT) == "1\r\n"
    assert replies == ["168\r\n", "", "25\r\n", "4\r\n"]


def test_bad_prime_request_is_logged_and_the_server_carries_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="mpreqrep"), running(PrimeServer) as server:
        assert mpreqrep.do_request(server.address, "garbage", timeout=10 * UNIT) == ""
        assert mpreqrep.do_request(server.address, "100", timeout=10 * UNIT) == "25\r\n"
    assert "expected an integer limit" in caplog.text


# -- jsonrpc ------------------------------------------------------------------------------


class FailingRpcServer(JsonRpcServer):
    """Methods that go wrong in each way a method can."""

    def rpc_divide(self, a: float, b: float) -> float:
        return a / b

    def rpc_unencodable(self) -> Any:
        return {"value": object()}

    def rpc_not_finite(self) -> float:
        return float("inf")

    def rpc_refuse(self) -> None:
        raise JsonRpcError(-32000, "refused")


def rpc(request: Any, server_class: type[JsonRpcServer] = JsonRpcServer) -> dict[str, Any]:
    """Call the handler with a request (encoded unless already text) and decode the reply."""
    text = request if isinstance(request, str) else json.dumps(request)
    reply = call(server_class, text + "\r\n")
    assert "\n" not in reply and "\r" not in reply
    decoded: dict[str, Any] = json.loads(reply)
    assert decoded["jsonrpc"] == "2.0"
    return decoded


def error_code(reply: dict[str, Any]) -> int:
    assert "result" not in reply
    code: int = reply["error"]["code"]
    assert isinstance(reply["error"]["message"], str)
    return code


@pytest.mark.parametrize(
    ("call_object", "result"),
    [
        ({"method": "add", "params": [1, 2], "id": 7}, 3),
        ({"method": "add", "params": {"a": 1.5, "b": 2}, "id": "x"}, 3.5),
        ({"method": "echo", "params": ["caf\u00e9\nline"], "id": None}, "caf\u00e9\nline"),
        ({"method": "echo", "params": [{"nested": [1, None]}]}, {"nested": [1, None]}),
        ({"method": "methods"}, ["add", "echo", "methods"]),
    ],
)
def test_jsonrpc_results(call_object: dict[str, Any], result: Any) -> None:
    assert rpc(call_object) == {"jsonrpc": "2.0", "result": result, "id": call_object.get("id")}


@pytest.mark.parametrize(
    ("request_text", "code"),
    [
        ("", PARSE_ERROR),
        ("{not json", PARSE_ERROR),
        ('{"method": "echo", "params": [NaN]}', PARSE_ERROR),
        ("[" * 100_000, PARSE_ERROR),
        ("[1, 2]", INVALID_REQUEST),
        ('"add"', INVALID_REQUEST),
        ('{"params": [1, 2]}', INVALID_REQUEST),
        ('{"method": 5}', INVALID_REQUEST),
        ('{"method": "echo", "params": 5}', INVALID_REQUEST),
        ('{"method": "nope"}', METHOD_NOT_FOUND),
        ('{"method": "stop"}', METHOD_NOT_FOUND),
        ('{"method": "handle_request", "params": ["x"]}', METHOD_NOT_FOUND),
        ('{"method": "__class__"}', METHOD_NOT_FOUND),
        ('{"method": "add", "params": [1]}', INVALID_PARAMS),
        ('{"method": "add", "params": {"a": 1, "c": 2}}', INVALID_PARAMS),
        ('{"method": "add", "params": ["1", 2]}', INVALID_PARAMS),
        ('{"method": "add", "params": [true, 2]}', INVALID_PARAMS),
    ],
)
def test_jsonrpc_errors_are_replies(request_text: str, code: int) -> None:
    assert error_code(rpc(request_text)) == code


def test_jsonrpc_error_repeats_the_id() -> None:
    assert rpc({"method": "nope", "id": 42})["id"] == 42


@pytest.mark.parametrize(
    ("method", "code"),
    [
        ("divide", INTERNAL_ERROR),
        ("unencodable", INTERNAL_ERROR),
        ("not_finite", INTERNAL_ERROR),
        ("refuse", -32000),
    ],
)
def test_jsonrpc_failing_methods(method: str, code: int, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="workers.jsonrpc"):
        params = [1, 0] if method == "divide" else []
        reply = rpc({"method": method, "params": params, "id": 1}, FailingRpcServer)
    assert error_code(reply) == code
    assert reply["id"] == 1
    if code == INTERNAL_ERROR:
        assert "JSON-RPC" in caplog.text


def test_jsonrpc_internal_error_names_only_the_exception_type() -> None:
    reply = rpc({"method": "divide", "params": [1, 0]}, FailingRpcServer)
    assert reply["error"]["message"] == "'divide' failed: ZeroDivisionError"


@pytest.fixture(scope="module")
def jsonrpc_handler() -> mpreqrep.RequestServer:
    """One handler for the property test: binding a port per example is wasteful."""
    return unstarted(JsonRpcServer)


@settings(max_examples=200, deadline=None)
@given(request_text=st.one_of(st.text(), st.from_regex(r'\{"method": ?"[a-z]*".*', fullmatch=True)))
def test_jsonrpc_never_raises_for_any_request(
    jsonrpc_handler: mpreqrep.RequestServer, request_text: str
) -> None:
    reply = json.loads(jsonrpc_handler.handle_request(request_text))
    assert ("result" in reply) != ("error" in reply)


@pytest.mark.parametrize("options", [{}, {"workers": 1}], ids=["threads", "processes"])
def test_jsonrpc_over_a_server(options: dict[str, Any]) -> None:
    with running(JsonRpcServer, **options) as server:
        add = mpreqrep.do_request(server.address, '{"method": "add", "params": [2, 3], "id": 1}')
        bad = mpreqrep.do_request(server.address, "{oops", timeout=30 * UNIT)
    assert add is not None and json.loads(add) == {"jsonrpc": "2.0", "result": 5, "id": 1}
    assert bad is not None and error_code(json.loads(bad)) == PARSE_ERROR


# -- slow_io ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_text", "delay"),
    [("", DEFAULT_DELAY_S), ("\r\n", DEFAULT_DELAY_S), ("0.25\r\n", 0.25), ("0", 0.0)],
)
def test_parse_delay(request_text: str, delay: float) -> None:
    assert parse_delay(request_text) == delay


@pytest.mark.parametrize("request_text", ["soon", "-1", "nan", "inf", str(MAX_DELAY_S * 2)])
def test_bad_delay_raises_a_clear_value_error(request_text: str) -> None:
    with pytest.raises(ValueError, match="delay"):
        call(SlowIOServer, request_text)


def test_slow_io_replies_after_sleeping() -> None:
    assert call(SlowIOServer, "0\r\n") == "slept 0"


@pytest.mark.parametrize("async_val", [False, True], ids=["sync", "async"])
def test_async_mode_overlaps_waiting_handlers(async_val: bool) -> None:
    delay = 0.3 * UNIT
    count = 4
    with running(SlowIOServer, async_val=async_val) as server:
        started = time.monotonic()
        replies = ask_all(server.address, [str(delay)] * count)
        elapsed = time.monotonic() - started
    assert replies == [f"slept {delay}\r\n"] * count
    if async_val:
        assert elapsed < count * delay  # overlapped: far less than one after another
    else:
        assert elapsed >= count * delay  # one after another
