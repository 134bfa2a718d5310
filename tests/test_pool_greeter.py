"""The handshake of worker connections, on a real listener (Unix socket and loopback
TCP, as on Windows) and selector loop, with peers that do not know the token."""

from __future__ import annotations

import os
import pickle
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from mpreqrep._channel import Channel, Listener, connect, encode_frame, frame_of
from mpreqrep._pool import _greeter
from mpreqrep._pool._greeter import (
    MAX_GREETINGS,
    MAX_INTRODUCTION_SIZE,
    FirstFrame,
    Greeter,
    Introduction,
    StrangerError,
)
from mpreqrep._pool._loop import SelectLoop
from mpreqrep._worker import Hello, InitFailed, introduction

from .conftest import UNIT, wait_until

pytestmark = pytest.mark.timeout(60 * UNIT)

TOKEN = "k" * 32


@dataclass
class Handshake:
    """A greeter on its loop, and what it introduced."""

    greeter: Greeter
    loop: SelectLoop
    introduced: list[tuple[Channel, Introduction]] = field(default_factory=list)

    def run(self, passes: int = 3) -> None:
        for _ in range(passes):
            self.loop.run_once(0.05 * UNIT)

    def messages(self) -> list[Introduction]:
        return [message for _, message in self.introduced]


@contextmanager
def handshake_on(*, unix: bool) -> Iterator[Handshake]:
    loop = SelectLoop()
    state: list[Handshake] = []
    greeter = Greeter(
        loop,
        TOKEN,
        lambda channel, message: state[0].introduced.append((channel, message)),
        unix=unix,
    )
    state.append(Handshake(greeter, loop))
    try:
        yield state[0]
    finally:
        for channel, _ in state[0].introduced:
            channel.close()
        greeter.close()
        loop.close_loop()


@pytest.fixture(params=[True, False], ids=["unix", "tcp"])
def handshake(request: pytest.FixtureRequest) -> Iterator[Handshake]:
    with handshake_on(unix=request.param) as state:
        yield state


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the other end closed ``sock`` (or reset it)."""
    sock.settimeout(5 * UNIT)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def still_open(sock: socket.socket) -> bool:
    """Whether the other end keeps ``sock`` open (nothing to read, no end of stream)."""
    sock.setblocking(False)
    try:
        sock.recv(1)
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False
    finally:
        sock.setblocking(True)
    return False


def test_a_worker_that_knows_the_token_is_introduced_even_in_pieces(
    handshake: Handshake,
) -> None:
    frame = introduction(TOKEN, Hello(os.getpid()))
    with connect(handshake.greeter.address) as sock:
        for piece in (frame[:2], frame[2:20], frame[20:]):  # header, token, rest split
            assert handshake.messages() == []
            sock.sendall(piece)
            handshake.run()
    assert handshake.messages() == [Hello(os.getpid())]


def test_nothing_past_the_first_frame_is_read_the_channel_gets_it(
    handshake: Handshake,
) -> None:
    with connect(handshake.greeter.address) as sock:
        sock.sendall(introduction(TOKEN, Hello(1)) + encode_frame("next"))
        assert wait_until(lambda: handshake.run(1) or bool(handshake.introduced), 5 * UNIT)
        channel, payloads = handshake.introduced[0][0], []
        assert wait_until(lambda: bool(payloads.extend(channel.receive() or []) or payloads), 5)
        assert [pickle.loads(payload) for payload in payloads] == ["next"]


def test_a_long_traceback_of_a_failed_load_comes_whole(handshake: Handshake) -> None:
    failed = InitFailed(7, "ImportError: numpy", "Traceback\n" * 40_000)  # 400 KB
    with connect(handshake.greeter.address) as sock:
        sender = threading.Thread(target=sock.sendall, args=(introduction(TOKEN, failed),))
        sender.start()  # more than the socket buffers: it waits for the greeter's reads
        assert wait_until(lambda: handshake.run(1) or bool(handshake.introduced), 10 * UNIT)
        sender.join(5 * UNIT)
    assert handshake.messages() == [failed]


def header(size: int) -> bytes:
    return size.to_bytes(4, "big")


@pytest.mark.parametrize(
    "frame",
    [
        frame_of(b"x" * 32 + pickle.dumps(Hello(1))),  # a wrong token of the right length
        frame_of(TOKEN[:8].encode()),  # a frame shorter than the token
        frame_of(b"k" * 31 + b"j" + pickle.dumps(Hello(1))),  # one byte off
        frame_of(TOKEN.encode() + pickle.dumps("not a message")),
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",  # a length of 1.2 GB
        header(MAX_INTRODUCTION_SIZE + 1) + TOKEN.encode(),  # too long, even with the token
        b"",  # the end of stream at once
        introduction(TOKEN, Hello(1))[:-3],  # the end of stream inside the frame
    ],
    ids=[
        "wrong-token",
        "short-frame",
        "one-byte-off",
        "not-a-message",
        "http",
        "oversize",
        "eof",
        "eof-mid-frame",
    ],
)
def test_a_stranger_is_closed_without_being_introduced(handshake: Handshake, frame: bytes) -> None:
    with connect(handshake.greeter.address) as sock:
        sock.sendall(frame)
        sock.shutdown(socket.SHUT_WR)
        handshake.run()
        assert closed_by_peer(sock)
    assert handshake.introduced == []


def test_a_wrong_token_is_rejected_before_the_announced_rest_is_read(
    handshake: Handshake,
) -> None:
    """A stranger announcing a megabyte is closed after 36 bytes: the rest it pushes
    meets a closed connection, and nothing of it is buffered."""
    with connect(handshake.greeter.address) as sock:
        sock.sendall(header(MAX_INTRODUCTION_SIZE) + b"x" * 32)
        handshake.run()
        assert closed_by_peer(sock)
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range(64):  # far more than the socket buffers hold
                sock.sendall(b"\0" * 65536)
    assert handshake.introduced == []


def test_frames_are_read_in_steps_and_checked_before_the_rest() -> None:
    frame = FirstFrame(b"tok", deadline=1.0)
    assert frame.wanted() == 4
    frame.feed(header(8))
    assert frame.wanted() == 3  # the token, and not a byte more
    frame.feed(b"tok")
    assert frame.wanted() == 5
    frame.feed(b"hello")
    assert (frame.wanted(), frame.payload) == (0, b"tokhello")
    with pytest.raises(StrangerError, match="wrong token"):
        stranger = FirstFrame(b"tok", deadline=1.0)
        stranger.feed(header(8))
        stranger.feed(b"tak")
    with pytest.raises(StrangerError, match="2 bytes"):
        FirstFrame(b"tok", deadline=1.0).feed(header(2))


def test_a_silent_or_half_sent_connection_is_closed_at_its_deadline_not_before(
    handshake: Handshake, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeout_s = 1.0 * UNIT
    monkeypatch.setattr(_greeter, "GREETING_TIMEOUT_S", timeout_s)
    address = handshake.greeter.address
    began = time.monotonic()

    def closed(*socks: socket.socket) -> Callable[[], bool]:
        def check() -> bool:
            handshake.run(1)
            return not any(still_open(sock) for sock in socks)

        return check

    with connect(address) as silent, connect(address) as half:
        half.sendall(introduction(TOKEN, Hello(1))[:10])
        halfway = lambda: handshake.run(1) or time.monotonic() - began > timeout_s / 2  # noqa: E731
        assert wait_until(halfway, 5 * UNIT)  # both accepted meanwhile
        with connect(address) as younger:
            assert wait_until(closed(silent, half), 10 * UNIT)
            assert time.monotonic() - began >= timeout_s  # the timer, not a pass, decides
            assert still_open(younger)  # its deadline is later: the timer is set again
            assert wait_until(closed(younger), 10 * UNIT)
        with connect(address) as late:  # a worker after them gets in as ever
            late.sendall(introduction(TOKEN, Hello(2)))
            assert wait_until(lambda: handshake.run(1) or bool(handshake.introduced), 5 * UNIT)
    assert handshake.messages() == [Hello(2)]


@pytest.fixture
def room_for_one(monkeypatch: pytest.MonkeyPatch) -> Iterator[Handshake]:
    """A greeter (on a Unix socket: bytes are there when sendall returns) with room for
    one waiting connection."""
    monkeypatch.setattr(_greeter, "MAX_GREETINGS", 1)
    with handshake_on(unix=True) as handshake:
        yield handshake


def test_a_connection_making_room_is_read_first_its_frame_may_be_there(
    room_for_one: Handshake,
) -> None:
    """The supervisor may not have run for a while (a starved thread): a worker whose
    frame waits in the kernel is read before it is closed to make room."""
    address = room_for_one.greeter.address
    with connect(address) as first, connect(address):
        room_for_one.greeter.catch_up()  # takes the first, not yet the second
        first.sendall(introduction(TOKEN, Hello(3)))
        room_for_one.greeter.catch_up()  # the second needs the room: the first is read
        assert room_for_one.messages() == [Hello(3)]


def test_a_connection_closed_by_an_earlier_callback_of_the_same_pass_is_left_alone(
    room_for_one: Handshake,
) -> None:
    """One select reports the listener (a newcomer) and a half-sent connection:
    accepting closes the half-sent one to make room, and its own callback then finds
    it gone."""
    frame = introduction(TOKEN, Hello(5))
    address = room_for_one.greeter.address
    with connect(address) as half:
        half.sendall(frame[:10])
        room_for_one.run()
        with connect(address):  # the listener is ready first,
            half.sendall(frame[10:12])  # then the half-sent one
            room_for_one.loop.run_once(1 * UNIT)
            assert closed_by_peer(half)
    assert room_for_one.introduced == []


def test_a_flood_of_connections_holds_a_bounded_number_and_a_worker_still_gets_in(
    handshake: Handshake,
) -> None:
    address = handshake.greeter.address
    flood: list[socket.socket] = []
    try:
        for _ in range(3):  # in rounds: a full backlog would make connect() wait
            flood += [connect(address) for _ in range(MAX_GREETINGS // 2 + 10)]
            handshake.run(1)
        began = time.monotonic()
        handshake.run()
        assert time.monotonic() - began < 2 * UNIT
        open_ones = [sock for sock in flood if still_open(sock)]
        assert len(open_ones) == MAX_GREETINGS
        assert open_ones == flood[-MAX_GREETINGS:]  # the oldest made room
        with connect(address) as worker:
            worker.sendall(introduction(TOKEN, Hello(4)))
            assert wait_until(lambda: handshake.run(1) or bool(handshake.introduced), 5 * UNIT)
        assert handshake.messages() == [Hello(4)]
    finally:
        for sock in flood:
            sock.close()


def test_one_event_accepts_a_bounded_number_of_connections(
    handshake: Handshake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_greeter, "MAX_GREETINGS", 4)
    address = handshake.greeter.address
    flood = [connect(address) for _ in range(10)]
    try:
        handshake.greeter.catch_up()  # one round takes 4: none had to make room
        assert all(still_open(sock) for sock in flood)
        handshake.greeter.catch_up()  # 4 more, each closing one of the first 4
        assert wait_until(lambda: not any(still_open(sock) for sock in flood[:4]), 5 * UNIT)
        assert all(still_open(sock) for sock in flood[4:])
    finally:
        for sock in flood:
            sock.close()


def test_catch_up_greets_what_already_waits_and_close_drops_the_rest(
    handshake: Handshake,
) -> None:
    address = handshake.greeter.address
    with connect(address) as early, connect(address) as silent:
        early.sendall(introduction(TOKEN, Hello(7)))
        greeted = lambda: handshake.greeter.catch_up() or bool(handshake.introduced)  # noqa: E731
        assert wait_until(greeted, 5 * UNIT)  # no select: what the kernel holds
        assert handshake.messages() == [Hello(7)]
        handshake.greeter.close()
        assert closed_by_peer(silent)


@pytest.mark.parametrize("unix", [True, False], ids=["unix", "tcp"])
def test_a_greeter_closed_before_anyone_connected_frees_its_listener(unix: bool) -> None:
    with handshake_on(unix=unix) as handshake:
        address = handshake.greeter.address
    with pytest.raises(OSError):  # refused, or no such file
        connect(address).close()


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
