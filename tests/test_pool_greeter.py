"""The handshake of worker connections, on a real listener and selector loop."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator

import pytest

from mpreqrep._channel import Listener, connect, frame_of
from mpreqrep._pool._greeter import Greeter, Introduction
from mpreqrep._pool._loop import SelectLoop
from mpreqrep._worker import Hello, introduction

from .conftest import UNIT

TOKEN = "k" * 32


@pytest.fixture
def greeter() -> Iterator[tuple[Greeter, SelectLoop, Listener, list[Introduction]]]:
    loop, listener, introduced = SelectLoop(), Listener(), []
    greeter = Greeter(loop, listener, TOKEN, lambda channel, message: introduced.append(message))
    yield greeter, loop, listener, introduced
    greeter.close()
    loop.close_loop()


def test_a_worker_that_knows_the_token_is_introduced_even_in_pieces(
    greeter: tuple[Greeter, SelectLoop, Listener, list[Introduction]],
) -> None:
    _, loop, listener, introduced = greeter
    frame = introduction(TOKEN, Hello(os.getpid()))
    with connect(listener.address) as sock:
        sock.sendall(frame[:5])
        for _ in range(3):
            loop.run_once(0.2 * UNIT)  # accepted, half a frame: nothing yet
        assert introduced == []
        sock.sendall(frame[5:])
        loop.run_once(1 * UNIT)
    assert introduced == [Hello(os.getpid())]


@pytest.mark.parametrize(
    "frame",
    [
        frame_of(b"x" * 32 + pickle.dumps(Hello(1))),  # a wrong token: never unpickled
        frame_of(TOKEN.encode() + pickle.dumps("not a message")),
        b"",  # the end of stream at once
    ],
    ids=["wrong-token", "not-a-message", "eof"],
)
def test_a_stranger_is_closed_without_being_introduced(
    greeter: tuple[Greeter, SelectLoop, Listener, list[Introduction]], frame: bytes
) -> None:
    _, loop, listener, introduced = greeter
    with connect(listener.address) as sock:
        sock.sendall(frame)
        if not frame:
            sock.shutdown(2)
        sock.settimeout(5 * UNIT)
        for _ in range(3):
            loop.run_once(0.2 * UNIT)
        if frame:
            assert sock.recv(1) == b""  # closed by the greeter
    assert introduced == []


def test_catch_up_greets_what_already_waits_and_close_drops_the_rest(
    greeter: tuple[Greeter, SelectLoop, Listener, list[Introduction]],
) -> None:
    greeter_, _, listener, introduced = greeter
    with connect(listener.address) as early, connect(listener.address) as silent:
        early.sendall(introduction(TOKEN, Hello(7)))
        greeter_.catch_up()  # no select: the kernel already holds both
        assert introduced == [Hello(7)]
        greeter_.close()
        silent.settimeout(5 * UNIT)
        assert silent.recv(1) == b""


def test_the_select_loop_runs_calls_in_order_and_refuses_them_once_closed() -> None:
    loop, ran = SelectLoop(), []
    assert loop.call_soon(lambda: ran.append(1))
    assert loop.call_soon(lambda: 1 / 0)  # a failing call is logged, the next still runs
    assert loop.call_soon(lambda: ran.append(2))
    loop.run_once(1 * UNIT)
    assert ran == [1, 2]
    loop.close_loop()
    assert not loop.call_soon(lambda: ran.append(3))
    loop.close_loop()  # idempotent
    assert ran == [1, 2]


def test_a_failing_event_callback_is_reported_and_the_others_run() -> None:
    loop, ran = SelectLoop(), []
    left, right = Listener(), Listener()
    try:
        with connect(left.address), connect(right.address):
            loop.watch(left.sock, lambda mask: 1 / 0)
            loop.add_reader(right.sock, lambda: ran.append("right"))
            assert loop.run_once(1 * UNIT)  # a callback failed
            assert ran == ["right"]
            loop.remove_reader(left.sock)
            loop.remove_reader(left.sock)  # harmless twice
    finally:
        left.close()
        right.close()
        loop.close_loop()
