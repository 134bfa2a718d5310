"""DaemonThreadExecutor: daemon threads, on demand, bounded, idle ones exit."""

from __future__ import annotations

import sys
import textwrap
import threading
import time

import pytest

from mpreqrep._threads import DaemonThreadExecutor

from .conftest import UNIT, assert_exits_promptly, wait_until


def pool_threads(prefix: str) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith(prefix)]


def test_runs_calls_and_reports_results_and_errors() -> None:
    with DaemonThreadExecutor(2) as pool:
        assert pool.submit(pow, 2, 10).result(timeout=10 * UNIT) == 1024
        assert isinstance(pool.submit(int, "x").exception(timeout=10 * UNIT), ValueError)
        assert list(pool.map(abs, [-1, -2, 3], timeout=10 * UNIT)) == [1, 2, 3]


def test_base_exceptions_reach_the_future_not_the_thread() -> None:
    def exits() -> None:
        raise SystemExit(3)

    with DaemonThreadExecutor(1) as pool:
        assert isinstance(pool.submit(exits).exception(timeout=10 * UNIT), SystemExit)
        assert pool.submit(lambda: "still alive").result(timeout=10 * UNIT) == "still alive"


def test_threads_are_daemons_started_on_demand_up_to_the_bound() -> None:
    prefix = "bounded-pool"
    release = threading.Event()
    running: list[str] = []
    lock = threading.Lock()

    def hold() -> str:
        with lock:
            running.append(threading.current_thread().name)
        release.wait(10 * UNIT)
        return threading.current_thread().name

    pool = DaemonThreadExecutor(3, thread_name_prefix=prefix)
    assert pool_threads(prefix) == []
    futures = [pool.submit(hold) for _ in range(5)]
    assert wait_until(lambda: len(running) == 3, 10 * UNIT)
    threads = pool_threads(prefix)
    assert len(threads) == 3 and all(thread.daemon for thread in threads)
    release.set()
    names = {future.result(timeout=10 * UNIT) for future in futures}
    assert len(names) == 3  # the queued two ran on the same three threads
    pool.shutdown()
    assert pool_threads(prefix) == []


def test_concurrent_submits_each_get_a_thread() -> None:
    """Two calls submitted back to back run at once, even with an idle thread about."""
    with DaemonThreadExecutor(4) as pool:
        pool.submit(int).result(timeout=10 * UNIT)  # leaves one idle thread
        barrier = threading.Barrier(2, timeout=10 * UNIT)
        first, second = pool.submit(barrier.wait), pool.submit(barrier.wait)
        assert {first.result(timeout=10 * UNIT), second.result(timeout=10 * UNIT)} == {0, 1}


def test_idle_threads_exit_and_the_pool_starts_new_ones() -> None:
    prefix = "idle-pool"
    pool = DaemonThreadExecutor(1, thread_name_prefix=prefix, idle_timeout_s=0.05 * UNIT)
    first = pool.submit(lambda: threading.current_thread().name).result(timeout=10 * UNIT)
    assert wait_until(lambda: pool_threads(prefix) == [], 10 * UNIT)
    second = pool.submit(lambda: threading.current_thread().name).result(timeout=10 * UNIT)
    assert first != second
    pool.shutdown()


def test_a_single_thread_runs_calls_in_order() -> None:
    order: list[int] = []
    with DaemonThreadExecutor(1) as pool:
        futures = [pool.submit(order.append, index) for index in range(20)]
        for future in futures:
            future.result(timeout=10 * UNIT)
    assert order == list(range(20))


def test_shutdown_waits_finishes_the_queue_and_refuses_new_calls() -> None:
    done: list[int] = []
    pool = DaemonThreadExecutor(1)
    for index in range(3):
        pool.submit(lambda i=index: (time.sleep(0.01), done.append(i)))
    pool.shutdown(wait=True)
    assert done == [0, 1, 2]
    with pytest.raises(RuntimeError):
        pool.submit(int)


def test_shutdown_can_cancel_what_has_not_started() -> None:
    release = threading.Event()
    pool = DaemonThreadExecutor(1)
    running = pool.submit(release.wait, 10 * UNIT)
    queued = pool.submit(int)
    assert wait_until(running.running, 10 * UNIT)
    pool.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    release.set()
    assert running.result(timeout=10 * UNIT) is True


def test_a_call_cancelled_while_queued_never_runs() -> None:
    release = threading.Event()
    ran: list[str] = []
    with DaemonThreadExecutor(1) as pool:
        blocker = pool.submit(release.wait, 10 * UNIT)
        queued = pool.submit(ran.append, "cancelled")
        assert queued.cancel()
        release.set()
        assert blocker.result(timeout=10 * UNIT) is True
        pool.submit(ran.append, "after").result(timeout=10 * UNIT)
    assert ran == ["after"]


def test_shutdown_from_a_worker_does_not_join_itself() -> None:
    pool = DaemonThreadExecutor(1)
    assert pool.submit(pool.shutdown).result(timeout=10 * UNIT) is None


@pytest.mark.parametrize("options", [{"max_workers": 0}, {"max_workers": 1, "idle_timeout_s": 0}])
def test_bad_arguments_are_value_errors(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        DaemonThreadExecutor(**options)  # type: ignore[arg-type]


def test_a_running_call_does_not_block_interpreter_exit() -> None:
    script = textwrap.dedent(
        """
        import threading, time
        from mpreqrep._threads import DaemonThreadExecutor
        started = threading.Event()
        pool = DaemonThreadExecutor(1)
        pool.submit(lambda: (started.set(), time.sleep(60)))
        assert started.wait(30)
        print("exiting", flush=True)
        """
    )
    assert_exits_promptly([sys.executable, "-c", script])
