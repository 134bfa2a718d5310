"""The worker-process side, run in this process against a stand-in parent."""

from __future__ import annotations

import functools
import os
import pickle
import signal
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from mpreqrep import _worker
from mpreqrep._channel import FrameReader, Listener, encode_frame
from mpreqrep._pool._greeter import read_introduction
from mpreqrep._pool._requests import _decode

from .conftest import UNIT, wait_until
from .pool_handlers import Commands, Echo

TOKEN = "t" * 32


@pytest.fixture
def parent(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Listener, list[int]]]:
    """A listener standing in for the parent; the lifeline watchdog records exits."""
    exits: list[int] = []
    monkeypatch.setattr(
        _worker, "watch_lifeline", functools.partial(_worker.watch_lifeline, exit_now=exits.append)
    )
    sigint_handler = signal.getsignal(signal.SIGINT)  # worker_main ignores SIGINT
    listener = Listener()
    listener.sock.setblocking(True)
    yield listener, exits
    listener.close()
    signal.signal(signal.SIGINT, sigint_handler)


def read_frames(sock: socket.socket, count: int) -> list[bytes]:
    """Read ``count`` frames from a blocking socket."""
    reader, frames = FrameReader(), []
    sock.settimeout(10 * UNIT)
    while len(frames) < count:
        data = sock.recv(65536)
        assert data, f"end of stream after {len(frames)} of {count} frames"
        frames += reader.feed(data)
    return frames


def as_outcome(frame: bytes) -> Any:
    """A worker's message as the parent reads it, a plain reply tuple as an Outcome."""
    message = _decode(frame)
    if type(message) is tuple:
        request_id, reply, elapsed_s = message
        return _worker.Outcome(request_id, reply, elapsed_s=elapsed_s)
    return message


def play_parent(listener: Listener, frames: list[bytes], replies: int) -> Future[Any]:
    """In a thread: take the lifeline and the channel, send ``frames``, read the
    replies, close the channel. Resolves to (lifeline, hello, replies)."""
    result: Future[Any] = Future()

    def run() -> None:
        try:
            lifeline, _ = listener.sock.accept()
            (introduction,) = read_frames(lifeline, 1)
            channel, _ = listener.sock.accept()
            with channel:
                (hello,) = read_frames(channel, 1)
                channel.sendall(b"".join(frames))
                answers = [as_outcome(frame) for frame in read_frames(channel, replies)]
            result.set_result((lifeline, introduction, hello, answers))
        except BaseException as exc:
            result.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return result


def test_a_worker_connects_its_lifeline_says_hello_and_answers_in_order(
    parent: tuple[Listener, list[int]],
) -> None:
    listener, exits = parent
    frames = [encode_frame([(1, "echo:a"), (2, "raise")]), encode_frame([(3, "echo:b")])]
    played = play_parent(listener, frames, 3)
    _worker.worker_main(pickle.dumps(Commands()), listener.address, TOKEN, None)
    lifeline, introduction, hello, (first, second, third) = played.result(10 * UNIT)
    assert read_introduction(introduction, TOKEN) == _worker.Lifeline(os.getpid())
    assert read_introduction(hello, TOKEN) == _worker.Hello(os.getpid())
    assert read_introduction(hello, "u" * 32) is None  # a stranger's token: not unpickled
    assert first._replace(elapsed_s=0.0) == _worker.Outcome(1, reply="a")
    assert first.elapsed_s > 0
    assert isinstance(second.error, ValueError) and "do_raise" in second.traceback
    assert third.reply == "b"
    assert exits == []  # the parent is alive: its lifeline is open
    lifeline.close()  # as when the parent dies
    assert wait_until(lambda: exits == [_worker.EXIT_ORPHANED], 10 * UNIT)
    assert not Path(str(listener.address)).parent.exists()  # the socket directory is gone


def test_a_worker_whose_parent_dies_removes_the_socket_directory_from_its_main_thread(
    parent: tuple[Listener, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    listener, _ = parent
    # A watchdog that never gets to clean up: the main thread's exit came first.
    monkeypatch.setattr(_worker, "watch_lifeline", lambda lifeline, address: None)

    def die() -> None:  # as the kernel does for a parent killed with SIGKILL
        lifeline, _ = listener.sock.accept()
        channel, _ = listener.sock.accept()
        read_frames(channel, 1)  # the hello
        lifeline.close()
        channel.close()

    dying = threading.Thread(target=die, daemon=True)
    dying.start()
    _worker.worker_main(pickle.dumps(Commands()), listener.address, TOKEN, None)
    dying.join(10 * UNIT)
    assert not Path(str(listener.address)).parent.exists()


def test_a_worker_that_cannot_load_the_handler_says_why_and_exits(
    parent: tuple[Listener, list[int]],
) -> None:
    listener, _ = parent
    with pytest.raises(SystemExit) as exited:
        _worker.worker_main(b"not a pickle", listener.address, TOKEN, None)
    assert exited.value.code == _worker.EXIT_INIT_FAILED
    lifeline, _ = listener.sock.accept()
    failure_sock, _ = listener.sock.accept()
    with lifeline, failure_sock:
        (frame,) = read_frames(failure_sock, 1)
    failure = read_introduction(frame, TOKEN)
    assert isinstance(failure, _worker.InitFailed) and failure.pid == os.getpid()
    assert "UnpicklingError" in failure.summary and "\n" not in failure.summary
    assert "Traceback" in failure.traceback


def test_handler_failures_of_every_kind_become_that_request_s_error(
    parent: tuple[Listener, list[int]],
) -> None:
    listener, _ = parent
    commands = ["raise-unpicklable", "base:SystemExit", "base:Custom", "surrogate", "echo:ok"]
    played = play_parent(listener, [encode_frame(list(enumerate(commands)))], len(commands))
    _worker.worker_main(pickle.dumps(Commands()), listener.address, TOKEN, None)
    lifeline, _, _, outcomes = played.result(10 * UNIT)
    lifeline.close()
    unpicklable, system_exit, custom, surrogate, fine = outcomes
    assert "BadReplyError: 7: no round trip" in str(unpicklable.error)
    assert isinstance(system_exit.error, _worker.HandlerBaseException)
    assert "SystemExit" in str(system_exit.error)
    assert "CustomBaseError" in str(custom.error)
    assert isinstance(surrogate.error, _worker.ReplyEncodingError)
    assert fine.reply == "ok"


def test_a_worker_past_its_memory_cap_retires_before_its_next_reply(
    parent: tuple[Listener, list[int]],
) -> None:
    listener, _ = parent
    played = play_parent(listener, [encode_frame([(1, "a"), (2, "b")])], 3)
    _worker.worker_main(pickle.dumps(Echo("")), listener.address, TOKEN, 1)
    lifeline, _, _, messages = played.result(10 * UNIT)
    lifeline.close()
    assert [type(message).__name__ for message in messages] == ["Retiring", "Outcome", "Outcome"]
    assert messages[0] == _worker.Retiring(os.getpid())


def test_a_parent_that_resets_the_channel_ends_the_worker_quietly(
    parent: tuple[Listener, list[int]],
) -> None:
    listener, _ = parent

    def reset() -> None:
        lifeline, _ = listener.sock.accept()
        channel, _ = listener.sock.accept()
        read_frames(channel, 1)
        channel.sendall(encode_frame([(1, "sleep:0.2")]))
        channel.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        channel.close()  # unread reply pending: a reset, not an orderly end
        lifeline.close()

    thread = threading.Thread(target=reset, daemon=True)
    thread.start()
    _worker.worker_main(pickle.dumps(Commands()), listener.address, TOKEN, None)
    thread.join(10 * UNIT)


def test_the_lifeline_watchdog_also_ends_on_an_error() -> None:
    left, right = socket.socketpair()
    exits: list[int] = []
    left.close()
    _worker.watch_lifeline(left, ("127.0.0.1", 1), exit_now=exits.append)  # recv on a closed socket
    right.close()
    assert exits == [_worker.EXIT_ORPHANED]
