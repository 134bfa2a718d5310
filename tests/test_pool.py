"""The process-pool dispatcher, driven directly through submit() and futures (no sockets)."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import psutil
import pytest
from loky import process_executor as loky_executor

from mpreqrep import _pool, _worker
from mpreqrep._channel import FrameReader, Listener, encode_frame
from mpreqrep._errors import HandlerReturnTypeError
from mpreqrep._pool import (
    HandlerTimeoutError,
    PoolStartError,
    ProcessPoolDispatcher,
    WorkerCrashError,
    resolve_worker_count,
)

from .conftest import UNIT, wait_until
from .pool_handlers import Commands, Counting, Echo, FailsToLoad, Unpicklable

pytestmark = pytest.mark.timeout(90 * UNIT)

REPO_ROOT = Path(__file__).resolve().parent.parent

MakeDispatcher = Callable[..., ProcessPoolDispatcher]

# loky warns once per pool when it replaces a worker while work is queued; its text
# speaks of its own default leak limit, not of max_worker_memory.
loky_recycling_warning = pytest.mark.filterwarnings("ignore:A worker was restarted:UserWarning")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def worker_pids(dispatcher: ProcessPoolDispatcher) -> set[int]:
    return {worker["pid"] for worker in dispatcher.stats()["workers"]}


def loky_children() -> set[int]:
    """Live children of this process, loky's resource trackers excepted."""
    pids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(child.cmdline()) and alive(child.pid):
                pids.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def outcome(future: Future[str], timeout: float = 30 * UNIT) -> str | BaseException:
    """The reply, or the exception the future failed with."""
    try:
        return future.result(timeout=timeout)
    except Exception as exc:
        return exc


@pytest.fixture
def make() -> Iterator[MakeDispatcher]:
    """Build (and by default start) dispatchers; shut them down and check no worker stays."""
    made: list[ProcessPoolDispatcher] = []

    def factory(
        handler: Any,
        workers: int = 2,
        *,
        timeout_s: float | None = None,
        max_rss: int | None = None,
        start: bool = True,
    ) -> ProcessPoolDispatcher:
        dispatcher = ProcessPoolDispatcher(
            handler, workers, request_timeout_s=timeout_s, max_worker_memory=max_rss
        )
        made.append(dispatcher)
        if start:
            dispatcher.start()
        return dispatcher

    yield factory
    for dispatcher in made:
        pids = worker_pids(dispatcher)
        dispatcher.shutdown()
        assert not {pid for pid in pids if alive(pid)}


# -- worker counts and options ----------------------------------------------------------


def test_worker_counts_resolve_ints_digit_strings_and_auto() -> None:
    cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    assert resolve_worker_count(3) == 3
    assert resolve_worker_count("2") == 2
    assert resolve_worker_count("auto") == cores
    assert resolve_worker_count(None) == cores


@pytest.mark.parametrize("workers", [0, -1, "0", "many", "", 1.5, True])
def test_bad_worker_counts_are_value_errors(workers: Any) -> None:
    with pytest.raises(ValueError, match="workers"):
        resolve_worker_count(workers)


@pytest.mark.parametrize(
    ("workers", "timeout_s", "max_rss"), [(0, None, None), (1, 0.0, None), (1, None, -5)]
)
def test_out_of_range_options_are_value_errors(
    workers: int, timeout_s: float | None, max_rss: int | None
) -> None:
    with pytest.raises(ValueError):
        ProcessPoolDispatcher(
            Echo(""), workers, request_timeout_s=timeout_s, max_worker_memory=max_rss
        )


# -- start-up and the handler copy ------------------------------------------------------


def test_start_warms_every_worker_before_the_first_request(make: MakeDispatcher) -> None:
    dispatcher = make(Echo(""), 2)
    workers = dispatcher.stats()["workers"]
    assert len(workers) == 2
    assert all(alive(worker["pid"]) and worker["served"] == 0 for worker in workers)
    assert {worker["pid"] for worker in workers} <= loky_children()


def test_attributes_set_in_init_reach_the_workers(make: MakeDispatcher) -> None:
    dispatcher = make(Echo("copied> "), 2)
    futures = [dispatcher.submit(f"r{index}\r\n") for index in range(30)]
    assert [outcome(future) for future in futures] == [f"copied> r{i}\r\n" for i in range(30)]


def test_each_worker_loads_one_copy_and_the_parent_pickles_once(make: MakeDispatcher) -> None:
    Counting.pickled = 0
    dispatcher = make(Counting(), 2)
    replies = [outcome(dispatcher.submit("x")) for _ in range(40)]
    by_pid: dict[int, list[tuple[int, int, int]]] = {}
    for reply in replies:
        pid, copy_id, calls, loads = map(int, str(reply).split())
        by_pid.setdefault(pid, []).append((copy_id, calls, loads))
    assert os.getpid() not in by_pid
    for seen in by_pid.values():
        assert len({copy_id for copy_id, _, _ in seen}) == 1  # one copy per worker
        assert {loads for _, _, loads in seen} == {1}  # unpickled once, at start-up
        assert sorted(calls for _, calls, _ in seen) == list(range(1, len(seen) + 1))
    assert Counting.pickled == 1  # requests carry text only


def test_submit_returns_a_plain_future_of_the_dispatcher(make: MakeDispatcher) -> None:
    dispatcher = make(Echo("e:"), 1)
    future = dispatcher.submit("x")
    assert type(future) is Future
    assert outcome(future) == "e:x"


def test_a_handler_that_does_not_pickle_fails_start(make: MakeDispatcher) -> None:
    dispatcher = make(Unpicklable(), 1, start=False)
    with pytest.raises(PoolStartError, match="Unpicklable") as caught:
        dispatcher.start()
    assert caught.value.__cause__ is not None


def test_a_handler_that_workers_cannot_load_fails_start(make: MakeDispatcher) -> None:
    before = loky_children()
    dispatcher = make(FailsToLoad(), 2, start=False)
    with pytest.raises(PoolStartError, match="cannot load in a worker"):
        dispatcher.start()
    assert wait_until(lambda: loky_children() <= before, 10 * UNIT)


def test_a_worker_exiting_while_loading_fails_start(make: MakeDispatcher) -> None:
    dispatcher = make(FailsToLoad(hard=True), 1, start=False)
    with pytest.raises(PoolStartError, match="died while starting"):
        dispatcher.start()


def test_start_gives_up_on_workers_that_do_not_start_in_time(
    make: MakeDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_pool, "WORKER_START_TIMEOUT_S", 0.0)
    dispatcher = make(Echo(""), 1, start=False)
    with pytest.raises(PoolStartError, match="did not start within"):
        dispatcher.start()


def test_a_pool_that_cannot_spawn_is_closed_and_start_raises(
    make: MakeDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = []
    real_close = _pool._Pool.close

    def no_processes(pool: Any) -> Any:
        raise OSError("cannot spawn")

    def recording_close(pool: Any) -> list[Any]:
        closed.append(pool)
        return real_close(pool)

    monkeypatch.setattr(_pool._Pool, "start_channel_task", no_processes)
    monkeypatch.setattr(_pool._Pool, "close", recording_close)
    dispatcher = make(Echo(""), 1, start=False)
    with pytest.raises(OSError, match="cannot spawn"):
        dispatcher.start()
    assert len(closed) == 1


def test_start_twice_is_an_error(make: MakeDispatcher) -> None:
    dispatcher = make(Echo(""), 1)
    with pytest.raises(RuntimeError, match="already"):
        dispatcher.start()


def test_a_handler_class_from_a_main_script_works(tmp_path: Path) -> None:
    script = tmp_path / "main_handler.py"
    script.write_text(
        textwrap.dedent(
            """
            import os
            from mpreqrep._pool import ProcessPoolDispatcher

            class Upper:
                def __init__(self):
                    self.suffix = "!"

                def handle_request(self, request):
                    return request.upper() + self.suffix + str(os.getpid() != PARENT)

            PARENT = os.getpid()
            if __name__ == "__main__":
                dispatcher = ProcessPoolDispatcher(
                    Upper(), 1, request_timeout_s=None, max_worker_memory=None
                )
                dispatcher.start()
                print(dispatcher.submit("hey").result(timeout=60), end="")
                dispatcher.shutdown()
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60 * UNIT, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "HEY!True"


# -- running requests -------------------------------------------------------------------


def test_up_to_n_handlers_run_at_once(make: MakeDispatcher) -> None:
    dispatcher = make(Commands(), 2)
    duration_s = 0.3 * UNIT
    futures = [dispatcher.submit(f"sleep:{duration_s}") for _ in range(6)]
    spans = [tuple(map(float, str(outcome(future)).split()[:2])) for future in futures]
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = peak = 0
    for _, step in edges:  # an end sorts before a start at the same instant
        running += step
        peak = max(peak, running)
    assert peak == 2


def test_handler_errors_fail_only_their_own_future(make: MakeDispatcher) -> None:
    dispatcher = make(Commands(), 2)
    commands = ["raise", "bytes", "raise-unpicklable", "echo:fine", "subclass"]
    futures = {command: dispatcher.submit(command) for command in commands}
    results = {command: outcome(future) for command, future in futures.items()}
    assert isinstance(results["raise"], ValueError)
    assert "do_raise" in str(results["raise"].__cause__)  # the worker's traceback
    assert isinstance(results["bytes"], HandlerReturnTypeError)
    assert isinstance(results["raise-unpicklable"], RuntimeError)
    assert "BadReplyError" in str(results["raise-unpicklable"])
    assert results["echo:fine"] == "fine"
    assert type(results["subclass"]) is str and results["subclass"] == "quiet"
    assert dispatcher.stats()["pool_rebuilds"] == 0


def test_many_waiting_requests_travel_in_batches(make: MakeDispatcher) -> None:
    dispatcher = make(Commands(), 1)
    futures = [dispatcher.submit(f"echo:{index}") for index in range(400)]
    assert [outcome(future) for future in futures] == [str(index) for index in range(400)]
    assert dispatcher.stats()["batches"] < 100


def test_a_request_cancelled_while_waiting_never_runs(make: MakeDispatcher, tmp_path: Path) -> None:
    dispatcher = make(Commands(), 1)
    busy = [dispatcher.submit(f"sleep:{0.5 * UNIT}") for _ in range(2)]
    marker = tmp_path / "ran"
    assert dispatcher.submit(f"touch:{marker}").cancel()
    assert all(not isinstance(outcome(future), BaseException) for future in busy)
    assert outcome(dispatcher.submit("echo:after")) == "after"
    assert not marker.exists()


def test_stats_report_each_worker(make: MakeDispatcher) -> None:
    dispatcher = make(Commands(), 2)
    for future in [dispatcher.submit("pid") for _ in range(20)]:
        outcome(future)
    stats = dispatcher.stats()
    assert {"crashed", "timed_out", "in_flight", "waiting", "resubmitted", "pool_rebuilds"} <= set(
        stats
    )
    assert stats["in_flight"] == stats["waiting"] == 0
    assert sum(worker["served"] for worker in stats["workers"]) == 20
    for worker in stats["workers"]:
        assert worker["rss"] > 0
        assert isinstance(worker["cpu_percent"], float)


# -- crashes ----------------------------------------------------------------------------


def test_one_poison_request_among_64_costs_only_its_own_reply(make: MakeDispatcher) -> None:
    dispatcher = make(Commands(), 2)
    old_pids = worker_pids(dispatcher)
    commands = [f"echo:{index}" if index % 2 else "sleep:0.01" for index in range(64)]
    commands[20] = "exit:1"
    started = time.perf_counter()
    futures = [dispatcher.submit(command) for command in commands]
    results = [outcome(future) for future in futures]
    elapsed_s = time.perf_counter() - started
    failures = [index for index, result in enumerate(results) if isinstance(result, BaseException)]
    assert failures == [20]
    assert isinstance(results[20], WorkerCrashError)
    assert all(results[i] == str(i) for i in range(1, 64, 2))
    stats = dispatcher.stats()
    assert (stats["crashed"], stats["pool_rebuilds"], stats["abandoned"]) == (1, 1, 0)
    assert stats["resubmitted"] > 0  # bystanders were in flight and ran again
    assert outcome(dispatcher.submit("pid")) not in {str(pid) for pid in old_pids}
    print(f"64 requests, one poison: {elapsed_s:.3f} s, {stats['resubmitted']} resubmitted")


def test_the_pool_recovers_quickly_after_a_crash(make: MakeDispatcher) -> None:
    dispatcher = make(Commands(), 2)
    crashed = dispatcher.submit("exit:1")
    assert isinstance(outcome(crashed), WorkerCrashError)
    started = time.perf_counter()
    assert outcome(dispatcher.submit("echo:back")) == "back"
    print(f"first reply after a crash: {time.perf_counter() - started:.3f} s")


@loky_recycling_warning
def test_a_pool_that_refuses_a_channel_task_is_replaced_and_requests_move(
    make: MakeDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With a cap below any RSS, each worker retires after one request and a new
    # channel task is submitted: loky refuses that one, as a pool found broken.
    dispatcher = make(Echo("moved:"), 1, max_rss=1)
    real_start = _pool._Pool.start_channel_task
    refusals = []

    def refuse_once(pool: Any) -> Any:
        if not refusals:
            refusals.append(pool)
            raise BrokenProcessPool("found broken")
        return real_start(pool)

    monkeypatch.setattr(_pool._Pool, "start_channel_task", refuse_once)
    assert outcome(dispatcher.submit("x")) == "moved:x"
    assert outcome(dispatcher.submit("y")) == "moved:y"
    assert refusals
    stats = dispatcher.stats()
    assert (stats["pool_rebuilds"], stats["resubmitted"], stats["crashed"]) == (1, 0, 0)


def test_a_request_that_breaks_the_pool_twice_is_not_retried(make: MakeDispatcher) -> None:
    dispatcher = make(Commands(), 2)
    # Its own worker lives, so nobody is to blame: it is retried once, then given up.
    killer = outcome(dispatcher.submit("kill-siblings"))
    assert isinstance(killer, WorkerCrashError)
    assert "twice" in str(killer)
    stats = dispatcher.stats()
    assert (stats["abandoned"], stats["crashed"], stats["pool_rebuilds"]) == (1, 0, 2)
    assert stats["resubmitted"] == 1
    assert outcome(dispatcher.submit("echo:after")) == "after"


# -- timeouts ---------------------------------------------------------------------------


def test_timeout_kills_the_worker_tree_and_others_go_on(
    make: MakeDispatcher, tmp_path: Path
) -> None:
    timeout_s = 1.0 * UNIT
    dispatcher = make(Commands(), 2, timeout_s=timeout_s)
    child_file = tmp_path / "child.pid"
    hung = dispatcher.submit(f"spawn-hang:{child_file}")
    assert wait_until(lambda: child_file.exists() and child_file.read_text() != "", 10 * UNIT)
    child = int(child_file.read_text())
    worker = psutil.Process(child).ppid()
    # Bystanders on the other worker, running before, during and after the kill.
    others = [dispatcher.submit(f"sleep:{0.25 * UNIT}") for _ in range(8)]
    result = outcome(hung)
    assert isinstance(result, HandlerTimeoutError)
    assert isinstance(result, TimeoutError)
    assert all(not isinstance(outcome(future), BaseException) for future in others)
    assert wait_until(lambda: not alive(child) and not alive(worker), 10 * UNIT)
    assert wait_until(lambda: dispatcher.stats()["pool_rebuilds"] == 1, 10 * UNIT)
    stats = dispatcher.stats()
    assert (stats["timed_out"], stats["crashed"]) == (1, 0)
    assert stats["resubmitted"] > 0
    assert outcome(dispatcher.submit("echo:after")) == "after"


def test_the_timeout_counts_from_the_handler_start_not_from_submit(
    make: MakeDispatcher,
) -> None:
    dispatcher = make(Commands(), 1, timeout_s=1.0 * UNIT)
    futures = [dispatcher.submit(f"sleep:{0.3 * UNIT}") for _ in range(5)]  # 1.5 units queued
    assert all(not isinstance(outcome(future), BaseException) for future in futures)
    assert dispatcher.stats()["timed_out"] == 0


# -- memory -----------------------------------------------------------------------------


@loky_recycling_warning
def test_a_worker_past_its_memory_cap_is_recycled_between_requests(
    make: MakeDispatcher,
) -> None:
    megabyte = 1024 * 1024
    dispatcher = make(Commands(), 1, max_rss=150 * megabyte)
    first = outcome(dispatcher.submit("pid"))
    assert outcome(dispatcher.submit("grow:200")) == first
    after = [outcome(dispatcher.submit("pid")) for _ in range(3)]
    assert all(not isinstance(reply, BaseException) for reply in after)
    assert after[0] != first
    assert wait_until(lambda: dispatcher.stats()["recycled"] == 1, 10 * UNIT)
    stats = dispatcher.stats()
    assert (stats["recycled"], stats["pool_rebuilds"], stats["crashed"]) == (1, 0, 0)
    assert not alive(int(str(first)))
    assert [worker["rss"] < 150 * megabyte for worker in stats["workers"]] == [True]


@loky_recycling_warning
def test_a_memory_cap_below_a_fresh_worker_recycles_after_every_task(
    make: MakeDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = make(Commands(), 1, max_rss=1)
    assert "below a fresh worker's RSS" in caplog.text
    pids = [outcome(dispatcher.submit("pid")) for _ in range(4)]
    assert all(not isinstance(pid, BaseException) for pid in pids)
    assert len(set(pids)) == 4  # each worker retires after one request
    assert dispatcher.stats()["crashed"] == 0


# -- shutdown ---------------------------------------------------------------------------


def test_shutdown_answers_every_request_and_leaves_no_worker(make: MakeDispatcher) -> None:
    before = loky_children()
    dispatcher = make(Commands(), 2)
    pids = worker_pids(dispatcher)
    futures = [dispatcher.submit(f"sleep:{0.2 * UNIT}") for _ in range(5)]
    dispatcher.shutdown()
    assert all(future.done() and future.exception() is None for future in futures)
    assert not {pid for pid in pids if alive(pid)}
    assert loky_children() <= before


def test_requests_after_shutdown_fail_and_a_second_shutdown_is_harmless(
    make: MakeDispatcher,
) -> None:
    dispatcher = make(Echo(""), 1)
    dispatcher.shutdown()
    late = dispatcher.submit("late")
    assert isinstance(late.exception(timeout=0), RuntimeError)
    dispatcher.shutdown()


# -- the supervisor giving up -----------------------------------------------------------


def test_workers_that_cannot_reload_the_handler_fail_what_is_left(
    make: MakeDispatcher, tmp_path: Path
) -> None:
    marker = tmp_path / "broken"
    dispatcher = make(FailsToLoad(str(marker)), 1)
    marker.touch()  # from now on, a new worker cannot load the handler
    crashed, stranded = dispatcher.submit("exit"), dispatcher.submit("echo")
    assert isinstance(outcome(crashed), WorkerCrashError)
    failure = outcome(stranded)
    assert isinstance(failure, RuntimeError)
    assert isinstance(failure.__cause__, PoolStartError)
    assert isinstance(dispatcher.submit("late").exception(timeout=0), RuntimeError)


def test_workers_that_keep_dying_while_loading_fail_what_is_left(
    make: MakeDispatcher, tmp_path: Path
) -> None:
    marker = tmp_path / "broken"
    dispatcher = make(FailsToLoad(str(marker), hard=True), 1)
    marker.touch()
    crashed, stranded = dispatcher.submit("exit"), dispatcher.submit("echo")
    assert isinstance(outcome(crashed), WorkerCrashError)
    failure = outcome(stranded)
    assert isinstance(failure, RuntimeError)
    assert "in a row" in str(failure.__cause__)


def test_a_supervisor_bug_fails_requests_instead_of_hanging_them(
    make: MakeDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    dispatcher = make(Echo(""), 1)

    def broken_read(link: Any) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(dispatcher, "_read_link", broken_read)
    failure = outcome(dispatcher.submit("x"))
    assert isinstance(failure, RuntimeError)
    assert isinstance(failure.__cause__, KeyError)


def test_a_channel_task_that_fails_is_a_broken_pool_and_is_replaced(
    make: MakeDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = make(Echo("e:"), 1)
    old_pids = worker_pids(dispatcher)
    task: Future[Any] = Future()
    task.set_exception(OSError("channel lost"))
    assert dispatcher._pool is not None
    dispatcher._on_channel_task_done(dispatcher._pool, task)
    assert wait_until(lambda: dispatcher.stats()["pool_rebuilds"] == 1, 30 * UNIT)
    assert outcome(dispatcher.submit("x")) == "e:x"
    assert "channel failed" in caplog.text
    assert not {pid for pid in old_pids if alive(pid)}


def test_a_reply_that_does_not_unpickle_fails_the_request_it_answers() -> None:
    head = _pool._Request(7, "x", Future())
    failed = _pool._decode_reply(b"not a pickle", head)
    assert isinstance(failed, _worker.Outcome) and failed.request_id == 7
    assert isinstance(failed.error, RuntimeError)
    assert "cannot read the worker's reply" in str(failed.error)


# -- the worker side, run in this process -----------------------------------------------


TOKEN = "t" * 32


@pytest.fixture
def parent(monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    """A channel listener standing in for the parent, with the worker globals restored."""
    monkeypatch.setattr(_worker, "_worker", None)
    for name in ("_get_memory_usage", "_MEMORY_LEAK_CHECK_DELAY", "_MAX_MEMORY_LEAK_SIZE"):
        monkeypatch.setattr(loky_executor, name, getattr(loky_executor, name))
    sigint_handler = signal.getsignal(signal.SIGINT)  # init_worker ignores SIGINT
    listener = Listener()
    listener.sock.setblocking(True)
    yield listener
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


def serve_in_thread(parent: Listener) -> tuple[socket.socket, Future[Any]]:
    """Run serve_channel in a thread; return the parent's end and the task's future."""
    result: Future[Any] = Future()

    def run() -> None:
        try:
            result.set_result(_worker.serve_channel())
        except BaseException as exc:
            result.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    sock, _ = parent.sock.accept()
    return sock, result


def test_a_worker_says_hello_then_answers_each_request_in_order(parent: Listener) -> None:
    _worker.init_worker(pickle.dumps(Commands()), parent.address, TOKEN, 3, None)
    sock, task = serve_in_thread(parent)
    with sock:
        (hello,) = read_frames(sock, 1)
        assert hello.startswith(TOKEN.encode())
        assert pickle.loads(hello[len(TOKEN) :]) == _worker.Hello(os.getpid(), 3)
        sock.sendall(encode_frame([(1, "echo:a"), (2, "raise")]) + encode_frame([(3, "echo:b")]))
        first, second, third = map(pickle.loads, read_frames(sock, 3))
    assert first._replace(elapsed_s=0.0) == _worker.Outcome(1, reply="a")
    assert first.elapsed_s > 0
    assert isinstance(second.error, ValueError) and "do_raise" in second.traceback
    assert third.reply == "b"
    assert task.result(timeout=10 * UNIT) == (os.getpid(), False)  # the parent closed it


def test_a_worker_that_cannot_load_the_handler_says_why(parent: Listener) -> None:
    with pytest.raises(pickle.UnpicklingError):
        _worker.init_worker(b"not a pickle", parent.address, TOKEN, 1, None)
    sock, _ = parent.sock.accept()
    with sock:
        (frame,) = read_frames(sock, 1)
    failure = pickle.loads(frame[len(TOKEN) :])
    assert isinstance(failure, _worker.InitFailed)
    assert (failure.pid, failure.generation) == (os.getpid(), 1)
    assert "UnpicklingError" in failure.traceback


def test_a_handler_error_that_does_not_pickle_is_sent_as_text(parent: Listener) -> None:
    _worker.init_worker(pickle.dumps(Commands()), parent.address, TOKEN, 1, None)
    sock, task = serve_in_thread(parent)
    with sock:
        read_frames(sock, 1)
        sock.sendall(encode_frame([(1, "raise-unpicklable")]))
        (frame,) = read_frames(sock, 1)
    result = pickle.loads(frame)
    assert isinstance(result.error, RuntimeError)
    assert "BadReplyError: 7: no round trip" in str(result.error)
    task.result(timeout=10 * UNIT)


def test_a_worker_past_its_memory_cap_retires_and_loky_recycles_it(parent: Listener) -> None:
    _worker.init_worker(pickle.dumps(Echo("")), parent.address, TOKEN, 1, 1)
    probe = loky_executor._get_memory_usage
    assert loky_executor._MEMORY_LEAK_CHECK_DELAY < 0  # checked after every task
    assert probe(os.getpid(), force_gc=True) == 0  # the reference, after the first task
    assert probe(os.getpid()) < loky_executor._MAX_MEMORY_LEAK_SIZE  # not retiring: stays
    sock, task = serve_in_thread(parent)
    with sock:
        read_frames(sock, 1)
        sock.sendall(encode_frame([(1, "a"), (2, "b")]))
        messages = [pickle.loads(frame) for frame in read_frames(sock, 3)]
    assert [type(message).__name__ for message in messages] == ["Retiring", "Outcome", "Outcome"]
    assert task.result(timeout=10 * UNIT) == (os.getpid(), True)
    assert probe(os.getpid()) >= loky_executor._MAX_MEMORY_LEAK_SIZE  # loky recycles it
    assert _worker.serve_channel() == (os.getpid(), True)  # a later task ends at once


# -- book-keeping and process helpers, without a pool -----------------------------------


def test_a_worker_gone_before_it_is_described_is_not_listed_or_killed() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert _pool._describe_worker((gone.pid, None, 0)) is None
    pool = _pool._Pool(executor=None, generation=1)
    link = _pool._Link(channel=None, pid=gone.pid, process=None)  # type: ignore[arg-type]
    pool.kill_worker(link)
    assert pool.killed == {gone.pid}


def test_killing_a_process_tree_that_is_gone_does_nothing() -> None:
    child = psutil.Popen([sys.executable, "-c", "pass"])
    child.wait()
    _pool._kill_process_tree(child)


def test_zombie_children_do_not_count_as_live() -> None:
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    assert wait_until(lambda: not alive(zombie.pid), 10 * UNIT)  # exited, not yet reaped
    try:
        assert zombie.pid not in _pool._live_child_pids()
    finally:
        zombie.wait()


def test_light_handlers_are_batched_and_heavy_ones_pipelined() -> None:
    sizing = _pool._TaskSizing()
    assert sizing.depth() == _pool.HEAVY_DEPTH  # unmeasured counts as heavy
    sizing.observe([])
    assert not sizing.is_light()
    sizing.observe([_worker.Outcome(1, elapsed_s=0.00001)] * 3)
    assert sizing.is_light()
    assert sizing.depth() == _pool.MAX_BATCH_SIZE
    for _ in range(20):
        sizing.observe([_worker.Outcome(1, elapsed_s=0.01)])
    assert sizing.depth() == _pool.HEAVY_DEPTH


def test_a_batch_mate_finished_before_a_hung_request_is_not_timed_out(
    make: MakeDispatcher,
) -> None:
    dispatcher = make(Commands(), 1, timeout_s=1.0 * UNIT)
    for index in range(5):  # measured as light, so waiting requests travel in batches
        assert outcome(dispatcher.submit(f"echo:{index}")) == str(index)
    busy = dispatcher.submit("sleep:0.3")
    batch = [dispatcher.submit(text) for text in ("echo:before", "hang", "echo:after")]
    assert isinstance(outcome(busy), str)
    before, hung, after = (outcome(future, 60 * UNIT) for future in batch)
    assert isinstance(hung, HandlerTimeoutError)
    assert (before, after) == ("before", "after")
    assert dispatcher.stats()["timed_out"] == 1


def test_thousands_of_requests_one_at_a_time_all_come_back(make: MakeDispatcher) -> None:
    dispatcher = make(Echo("e:"), 1)
    count = 3 * 2000
    for index in range(count):
        assert outcome(dispatcher.submit(f"{index}"), 10 * UNIT) == f"e:{index}"
