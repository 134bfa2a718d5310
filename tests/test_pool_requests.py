"""The pool's requests and channels behind one lock: sends gathered once per loop pass.

A real channel over a socketpair stands in for a worker: the test reads the
frames it gets and writes its replies, so no process is needed.
"""

from __future__ import annotations

import pickle
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from mpreqrep._channel import Channel, FrameReader, encode_frame
from mpreqrep._pool._requests import Requests

from .conftest import UNIT

pytestmark = pytest.mark.timeout(30 * UNIT)

PID = 10


class EndOfPass:
    """What the I/O loop offers: calls queued now run when :meth:`run` ends the pass."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], None]] = []
        self.open = True

    def call_soon(self, callback: Callable[[], None]) -> bool:
        if self.open:
            self.calls.append(callback)
        return self.open

    def run(self) -> None:
        calls, self.calls = self.calls, []
        for call in calls:
            call()


@pytest.fixture
def worker_end() -> Iterator[tuple[Requests, socket.socket]]:
    """Requests with one worker joined, and the worker's end of its channel."""
    parent, worker = socket.socketpair()
    worker.setblocking(False)  # the test only reads what is there
    requests = Requests(None, wake=lambda: None, flush_soon=lambda channel: None)
    requests.join(PID, Channel(parent))
    yield requests, worker
    requests.fail_all("test over")
    parent.close()
    worker.close()


def frames_waiting(sock: socket.socket) -> list[list[tuple[int, str]]]:
    """The request frames the worker end can read now, without waiting."""
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return []
    return [pickle.loads(payload) for payload in FrameReader().feed(data)]


def reply(sock: socket.socket, *request_ids: int) -> bytes:
    """Answer ``request_ids`` as a light handler would; returns the bytes sent."""
    data = b"".join(encode_frame((rid, f"r{rid}", 0.00001)) for rid in request_ids)
    sock.sendall(data)
    return data


def settle_all(requests: Requests, data: bytes) -> None:
    requests.settle(PID, FrameReader().feed(data))


def test_without_a_loop_a_request_goes_out_at_once(
    worker_end: tuple[Requests, socket.socket],
) -> None:
    requests, worker = worker_end
    future = requests.submit("a")
    assert frames_waiting(worker) == [[(0, "a")]]
    settle_all(requests, reply(worker, 0))
    assert future.result(timeout=0) == "r0"


def test_requests_submitted_in_one_pass_travel_in_one_frame_at_its_end(
    worker_end: tuple[Requests, socket.socket],
) -> None:
    requests, worker = worker_end
    loop = EndOfPass()
    requests.send_once_per_pass(loop.call_soon)
    futures = [requests.submit(text) for text in "abc"]
    assert frames_waiting(worker) == []  # nothing written during the pass
    assert len(loop.calls) == 1  # one top-up queued for the pass, not one per request
    loop.run()
    assert frames_waiting(worker) == [[(0, "a"), (1, "b")]]  # heavy until measured: two
    settle_all(requests, reply(worker, 0, 1))
    loop.run()
    assert frames_waiting(worker) == [[(2, "c")]]
    settle_all(requests, reply(worker, 2))
    assert [future.result(timeout=0) for future in futures] == ["r0", "r1", "r2"]
    assert loop.calls == []  # nothing waited: no top-up queued


def test_a_pass_s_replies_and_new_requests_share_one_top_up(
    worker_end: tuple[Requests, socket.socket],
) -> None:
    requests, worker = worker_end
    loop = EndOfPass()
    requests.send_once_per_pass(loop.call_soon)
    first = requests.submit("a")
    loop.run()
    assert frames_waiting(worker) == [[(0, "a")]]
    second = requests.submit("b")
    settle_all(requests, reply(worker, 0))
    assert first.result(timeout=0) == "r0" and not second.done()
    assert frames_waiting(worker) == []
    loop.run()
    assert frames_waiting(worker) == [[(1, "b")]]


def test_other_threads_and_a_loop_that_has_ended_send_at_once(
    worker_end: tuple[Requests, socket.socket],
) -> None:
    requests, worker = worker_end
    loop = EndOfPass()
    requests.send_once_per_pass(loop.call_soon)
    elsewhere = threading.Thread(target=requests.submit, args=("a",))
    elsewhere.start()
    elsewhere.join()
    assert frames_waiting(worker) == [[(0, "a")]]
    loop.open = False  # the loop has ended: it runs nothing more
    requests.submit("b")
    settle_all(requests, reply(worker, 0))
    assert frames_waiting(worker) == [[(1, "b")]]
    assert loop.calls == []
