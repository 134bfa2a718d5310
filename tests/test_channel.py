"""Framing and the parent's non-blocking end of a worker channel, over real Unix sockets
and loopback TCP (Windows' kind)."""

from __future__ import annotations

import itertools
import os
import pickle
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpreqrep import _channel
from mpreqrep._channel import Channel, FrameReader, Listener, connect, encode_frame

from .conftest import UNIT, wait_until

pytestmark = pytest.mark.timeout(30 * UNIT)


@pytest.fixture(params=[True, False], ids=["unix", "tcp"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Channel, socket.socket]]:
    """A parent-side channel and the blocking worker end it talks to."""
    listener = Listener(unix=request.param)
    worker = connect(listener.address)  # queued at once, on either kind
    channel = listener.accept()
    assert channel is not None
    yield channel, worker
    channel.close()
    worker.close()
    listener.close()


def test_frames_split_across_reads_and_packed_in_one_come_out_whole() -> None:
    stream = encode_frame("first") + encode_frame(["second", 2]) + encode_frame(b"")
    reader = FrameReader()
    payloads: list[bytes] = []
    for index in range(0, len(stream), 3):  # three bytes at a time
        payloads += reader.feed(stream[index : index + 3])
    assert [pickle.loads(payload) for payload in payloads] == ["first", ["second", 2], b""]
    assert reader.feed(stream) and reader.feed(b"") == []


@given(
    messages=st.lists(st.binary(max_size=300), max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
)
@settings(max_examples=300, deadline=None)
def test_frames_come_out_whole_and_in_order_however_the_stream_is_cut(
    messages: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(message) for message in messages)
    bounds = [0, *sorted(cut for cut in cuts if cut < len(stream)), len(stream)]
    reader = FrameReader()
    payloads: list[bytes] = []
    for begin, end in itertools.pairwise(bounds):
        payloads += reader.feed(stream[begin:end])  # empty pieces too
    assert [pickle.loads(payload) for payload in payloads] == messages
    assert reader.feed(encode_frame("next")) == [encode_frame("next")[4:]]  # nothing left over


def test_a_big_frame_in_many_reads_comes_out_once_its_last_byte_came() -> None:
    big = encode_frame(b"x" * (1 << 20)) + encode_frame("after")
    reader = FrameReader()
    chunk = 64 << 10
    gathered = [reader.feed(big[index : index + chunk]) for index in range(0, len(big), chunk)]
    assert all(payloads == [] for payloads in gathered[:-1])
    assert [pickle.loads(payload) for payload in gathered[-1]] == [b"x" * (1 << 20), "after"]


def test_a_channel_keeps_what_the_socket_does_not_take_and_flushes_it_in_order(
    pair: tuple[Channel, socket.socket],
) -> None:
    channel, worker = pair
    big = encode_frame("x" * (4 << 20))  # far more than the socket buffers hold
    channel.send(big)
    assert channel.has_outbox
    channel.send(encode_frame("after"))  # queued behind, never interleaved
    reader, payloads = FrameReader(), []
    worker.settimeout(10 * UNIT)
    while len(payloads) < 2:
        channel.flush()
        payloads += reader.feed(worker.recv(1 << 20))
    assert pickle.loads(payloads[0]) == "x" * (4 << 20)
    assert pickle.loads(payloads[1]) == "after"
    channel.flush()
    assert not channel.has_outbox


def test_a_channel_reads_whole_frames_then_the_end_of_stream(
    pair: tuple[Channel, socket.socket],
) -> None:
    channel, worker = pair
    received: list[bytes] = []
    ended = []

    def gather() -> bool:
        payloads = channel.receive()
        if payloads is None:
            ended.append(True)
        else:
            received.extend(payloads)
        return bool(ended)

    assert channel.receive() == []  # nothing yet: does not block
    worker.sendall(encode_frame(1) + encode_frame(2)[:3])
    assert wait_until(lambda: gather() or bool(received), 10 * UNIT)
    assert [pickle.loads(payload) for payload in received] == [1]  # the half frame waits
    worker.sendall(encode_frame(2)[3:])
    worker.close()
    assert wait_until(gather, 10 * UNIT)
    assert [pickle.loads(payload) for payload in received] == [1, 2]


def test_sending_to_a_worker_that_is_gone_drops_the_bytes_quietly(
    pair: tuple[Channel, socket.socket],
) -> None:
    channel, worker = pair
    worker.close()
    for _ in range(3):  # the first send may still succeed; later ones meet EPIPE
        channel.send(encode_frame("lost"))
    channel.flush()
    assert not channel.has_outbox
    assert channel.receive() is None
    channel.close()
    channel.send(encode_frame("after close"))  # ignored
    channel.close()


def test_the_listener_accepts_none_when_no_worker_waits_and_cleans_up() -> None:
    listener = Listener()
    assert isinstance(listener.address, str) and os.path.exists(listener.address)
    assert oct(os.stat(os.path.dirname(listener.address)).st_mode & 0o777) == "0o700"
    assert listener.accept() is None
    listener.close()
    assert not os.path.exists(os.path.dirname(listener.address))
    listener.close()
    with pytest.raises(OSError):
        connect(listener.address)


def test_read_nowait_reads_no_more_than_asked_and_tells_nothing_from_the_end(
    pair: tuple[Channel, socket.socket],
) -> None:
    channel, worker = pair
    assert channel.read_nowait(4) == b""  # nothing waits: does not block
    worker.sendall(b"abcdef")
    first: list[bytes] = []

    def read_four() -> bool:
        data = channel.read_nowait(4)
        if data:
            first.append(data)
        return bool(first)

    assert wait_until(read_four, 5 * UNIT)
    assert first == [b"abcd"]
    assert channel.read_nowait(64) == b"ef"
    worker.close()
    assert wait_until(lambda: channel.read_nowait(64) is None, 5 * UNIT)


def test_tcp_channels_send_small_frames_at_once_on_both_ends() -> None:
    """Nagle's algorithm would hold a second small frame until the first is
    acknowledged, and the peer delays that ACK (40 ms on Linux, 200 ms on Windows)."""
    listener = Listener(unix=False)
    try:
        host, port = listener.address
        assert host == "127.0.0.1" and port > 0
        with connect(listener.address) as worker:
            channel = listener.accept()
            assert channel is not None
            for sock in (worker, channel.sock):
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            channel.close()
    finally:
        listener.close()
    with pytest.raises(OSError):
        connect(listener.address)


def test_connections_reset_before_they_were_accepted_are_skipped() -> None:
    listener = Listener(unix=False)
    real = listener.sock
    with connect(listener.address) as worker:
        outcomes: list[Any] = [ConnectionResetError(104, "reset"), ConnectionAbortedError(103, "")]

        class Aborting:  # connections reset while queued, then the real one
            def accept(self) -> tuple[socket.socket, Any]:
                if outcomes:
                    raise outcomes.pop()
                return real.accept()

        listener.sock = Aborting()  # type: ignore[assignment]
        channel = listener.accept()
        assert channel is not None
        worker.sendall(b"x")
        assert wait_until(lambda: channel.read_nowait(1) == b"x", 5 * UNIT)
        channel.close()
    listener.sock = real
    listener.close()


def test_socket_directories_can_be_removed_for_an_exit_that_skips_close() -> None:
    listener = Listener()
    assert isinstance(listener.address, str)
    directory = os.path.dirname(listener.address)
    _channel.remove_socket_directories()
    assert not os.path.exists(directory)
    listener.close()


def test_a_long_tmpdir_still_gives_a_short_socket_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    long_dir = tmp_path / ("d" * 120)
    long_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_dir))
    listener = Listener()
    assert isinstance(listener.address, str)
    assert len(listener.address) <= _channel.MAX_UNIX_PATH
    assert listener.accept() is None
    listener.close()
    assert list(long_dir.iterdir()) == []
