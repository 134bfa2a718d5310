"""The pool's requests and channels behind one lock: sends gathered once per loop pass,
and the deadline timer on the channels' host.

A real channel over a socketpair stands in for a worker: the test reads the
frames it gets and writes its replies, so no process is needed.
"""

from __future__ import annotations

import logging
import pickle
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from mpreqrep._channel import Channel, FrameReader, encode_frame
from mpreqrep._pool._errors import HandlerTimeoutError, WorkerCrashError
from mpreqrep._pool._requests import Requests

from .conftest import UNIT
from .test_pool_expiry import RecordingHost

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
    requests = Requests(
        None, host=EndOfPass(), flush_soon=lambda channel: None, kill=lambda pids: None
    )
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


# -- the deadline timer -----------------------------------------------------------------

TIMEOUT_S = 5.0


class Clock:
    """The time the requests' book reads; the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def timed() -> Iterator[
    tuple[Requests, RecordingHost, list[list[int]], Clock, list[socket.socket]]
]:
    """Requests with a timeout, three workers joined, a recorded host and kills."""
    host, kills, clock = RecordingHost(), [], Clock()
    requests = Requests(TIMEOUT_S, host=host, flush_soon=lambda channel: None, kill=kills.append)
    requests._now = clock  # type: ignore[method-assign]
    pairs = [socket.socketpair() for _ in range(3)]
    for pid, (parent, worker) in enumerate(pairs, start=PID):
        worker.setblocking(False)
        requests.join(pid, Channel(parent))
    yield requests, host, kills, clock, [worker for _, worker in pairs]
    requests.fail_all("test over")
    for parent, worker in pairs:
        parent.close()
        worker.close()


def test_requests_past_their_deadline_fail_together_and_their_workers_are_killed_once(
    timed: tuple[Requests, RecordingHost, list[list[int]], Clock, list[socket.socket]],
) -> None:
    requests, host, kills, clock, _ = timed
    assert host.timers == []  # nothing runs: no timer
    futures = [requests.submit(text) for text in "abc"]  # one on each worker, same deadline
    assert len(host.timers) == 1  # one timer for all of them
    clock.now += TIMEOUT_S - 0.001
    host.timers[0].callback()  # early (a clock step, say): nothing expired, set again
    assert not any(future.done() for future in futures) and kills == []
    assert len(host.timers) == 2 and host.live() == host.timers[1:]
    clock.now += 0.001
    host.timers[1].callback()
    assert all(isinstance(future.exception(timeout=0), HandlerTimeoutError) for future in futures)
    assert kills == [[PID, PID + 1, PID + 2]]
    assert requests.figures([])[0]["timed_out"] == 3
    assert len(host.timers) == 2  # nothing else runs: not set again


def test_the_timer_is_set_again_only_when_the_earliest_deadline_moves_earlier(
    timed: tuple[Requests, RecordingHost, list[list[int]], Clock, list[socket.socket]],
) -> None:
    requests, host, _, clock, workers = timed
    for index in range(200):  # the hot path: a request comes and goes, time passes
        future = requests.submit(f"r{index}")
        clock.now += 0.001
        pid = next(p for p, w in enumerate(workers, start=PID) if frames_waiting(w))
        requests.settle(pid, FrameReader().feed(encode_frame((index, "ok", 0.01))))
        assert future.result(timeout=0) == "ok"
    assert len(host.timers) == 1  # set once, for the first request only
    clock.now += TIMEOUT_S
    host.timers[0].callback()  # stale: nothing runs any more, nothing to set
    assert len(host.timers) == 1


def test_a_joining_worker_s_first_requests_set_the_timer(
    timed: tuple[Requests, RecordingHost, list[list[int]], Clock, list[socket.socket]],
) -> None:
    requests, host, _, _, _ = timed
    for pid in (PID, PID + 1, PID + 2):
        requests.lose(pid)
    waiting = requests.submit("waits")
    assert host.timers == []
    parent, worker = socket.socketpair()
    with parent, worker:
        requests.join(PID + 3, Channel(parent))
        assert len(host.live()) == 1 and not waiting.done()
        requests.fail_all("test over")


def test_rehosting_moves_the_timer_to_the_new_host(
    timed: tuple[Requests, RecordingHost, list[list[int]], Clock, list[socket.socket]],
) -> None:
    requests, home, _, _, _ = timed
    future = requests.submit("a")
    io_loop = RecordingHost()
    requests.rehost(io_loop)
    assert home.live() == [] and len(io_loop.live()) == 1
    home.timers[0].callback()  # it had started on the old host: it does nothing
    assert not future.done()


def test_a_deadline_passing_after_the_requests_were_abandoned_only_kills_the_worker(
    timed: tuple[Requests, RecordingHost, list[list[int]], Clock, list[socket.socket]],
) -> None:
    requests, host, kills, clock, _ = timed
    future = requests.submit("a")
    requests.abandon("graceful timeout passed")  # the request fails, it still runs
    assert isinstance(future.exception(timeout=0), RuntimeError)
    clock.now += TIMEOUT_S
    host.timers[0].callback()
    assert kills == [[PID]]  # the worker still runs past the deadline: killed
    assert requests.figures([])[0]["timed_out"] == 0  # failed already, not timed out


def test_a_request_resent_after_its_worker_was_lost_is_claimed_without_a_complaint(
    worker_end: tuple[Requests, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    requests, worker = worker_end
    running, queued = requests.submit("a"), requests.submit("b")
    assert [rid for frame in frames_waiting(worker) for rid, _ in frame] == [0, 1]
    other_parent, other_worker = socket.socketpair()
    other_worker.setblocking(False)
    try:
        requests.join(PID + 1, Channel(other_parent))
        with caplog.at_level(logging.DEBUG):
            requests.lose(PID)  # "a" ran there and fails; "b" never started: resent
        assert isinstance(running.exception(timeout=0), WorkerCrashError)
        assert frames_waiting(other_worker) == [[(1, "b")]]
        complaints = [r for r in caplog.records if r.name == "concurrent.futures"]
        assert complaints == []  # it logged CRITICAL: "Future ... in unexpected state"
        requests.settle(PID + 1, FrameReader().feed(encode_frame((1, "r1", 0.00001))))
        assert queued.result(timeout=0) == "r1"
    finally:
        other_parent.close()
        other_worker.close()
