"""One worker process as the parent sees it: the CPU sampler, with concurrent readers,
and the socket that shows a process's end where its sentinel cannot be selected."""

from __future__ import annotations

import select
import threading
import time

import psutil
import pytest
from loky.backend import get_context

from mpreqrep._pool import ProcessPoolDispatcher
from mpreqrep._pool._process import CpuSampler, end_socket

from .conftest import UNIT, wait_until
from .ops_handlers import Spinner

pytestmark = pytest.mark.timeout(60 * UNIT)


def test_readers_within_a_window_share_one_measurement() -> None:
    clock = iter([0.0, 0.1, 0.6, 0.7])
    sampler = CpuSampler(psutil.Process(), interval_s=0.5, clock=lambda: next(clock))
    assert sampler.read() == 0.0  # at 0.1: no window finished yet
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:  # burn some CPU in this process
        pass
    first = sampler.read()  # at 0.6
    assert first > 0.0
    assert sampler.read() == first  # at 0.7: the same window, whoever asks


def test_a_gone_process_raises_no_such_process() -> None:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    process = psutil.Process(child.pid)
    sampler = CpuSampler(process, interval_s=0.0)
    child.wait(timeout=30 * UNIT)
    with pytest.raises(psutil.NoSuchProcess):
        sampler.read()


def test_concurrent_stats_callers_do_not_skew_cpu_percent() -> None:
    """Eight threads polling stats() while a worker spins: every figure stays within one
    CPU (the old per-call measurement reported thousands of percent).

    The pollers are stopped whatever happens: left spinning after a failure, they took
    a core from every later test (seen in a CI run that then timed out elsewhere)."""
    dispatcher = ProcessPoolDispatcher(Spinner(), 1, request_timeout_s=None, max_worker_memory=None)
    dispatcher.start()
    seen: list[float] = []
    stop = threading.Event()

    def poll() -> None:  # a call every millisecond or so each: concurrent, not a GIL siege
        while not stop.wait(0.001):
            seen.extend(worker["cpu_percent"] for worker in dispatcher.stats()["workers"])

    pollers = [threading.Thread(target=poll, daemon=True) for _ in range(8)]
    try:
        busy = dispatcher.submit(f"spin:{1.5 * UNIT}")
        for poller in pollers:
            poller.start()
        busy.result(timeout=30 * UNIT)
        stop.set()
        for poller in pollers:
            poller.join(10 * UNIT)
        assert not any(poller.is_alive() for poller in pollers)
        assert len(seen) > 100
        assert all(0.0 <= value <= 100.0 * 1.25 for value in seen), max(seen)
        assert max(seen) > 0.0
        assert wait_until(lambda: dispatcher.stats()["in_flight"] == 0, 10 * UNIT)
    finally:
        stop.set()
        dispatcher.shutdown()


def test_an_end_socket_ends_when_its_process_does_and_not_before() -> None:
    """Windows' way to see a process end in a selector: a thread waits on the sentinel
    (a handle there), then ends a socket."""
    process = get_context("loky").Process(target=time.sleep, args=(0.5 * UNIT,))
    process.start()
    reader = end_socket(process)
    try:
        assert select.select([reader], [], [], 0.1 * UNIT)[0] == []  # still running
        assert select.select([reader], [], [], 30 * UNIT)[0] == [reader]
        assert reader.recv(1) == b""  # the end of stream: the process has ended
        process.join(5 * UNIT)
        assert process.exitcode == 0
    finally:
        reader.close()
