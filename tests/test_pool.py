"""Process mode's dispatcher with real loky-started workers: start-up, faults, recycling."""

from __future__ import annotations

import functools
import math
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psutil
import pytest

import mpreqrep
from mpreqrep._errors import HandlerReturnTypeError
from mpreqrep._ioloop import IOLoop
from mpreqrep._pool import (
    HandlerTimeoutError,
    PoolStartError,
    ProcessPoolDispatcher,
    WorkerCrashError,
    WorkerStartError,
    _book,
    _requests,
    _supervisor,
    resolve_worker_count,
)
from mpreqrep._worker import Outcome

from .conftest import UNIT, wait_until
from .pool_handlers import Commands, Counting, Echo, FailsToLoad, Ledger, Unpicklable

pytestmark = pytest.mark.timeout(90 * UNIT)

REPO_ROOT = Path(__file__).resolve().parent.parent

MakeDispatcher = Callable[..., ProcessPoolDispatcher]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def worker_pids(dispatcher: ProcessPoolDispatcher) -> set[int]:
    return {worker["pid"] for worker in dispatcher.stats()["workers"]}


def children() -> set[int]:
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


def ledger_runs(path: Path) -> Counter[str]:
    """How often each tag ran, from a :class:`Ledger` file."""
    return Counter(path.read_text().split()) if path.exists() else Counter()


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
    ("workers", "timeout_s", "max_rss"),
    [(0, None, None), (1, 0.0, None), (1, math.nan, None), (1, None, -5)],
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
    stats = dispatcher.stats()
    assert (stats["workers_wanted"], stats["workers_alive"], stats["workers_starting"]) == (2, 2, 0)
    workers = stats["workers"]
    assert len(workers) == 2
    assert all(alive(worker["pid"]) and worker["served"] == 0 for worker in workers)
    assert {worker["pid"] for worker in workers} <= children()


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


def test_a_request_sent_to_a_worker_cannot_be_cancelled_and_its_reply_arrives(
    make: MakeDispatcher,
) -> None:
    dispatcher = make(Commands(), 1)
    busy = dispatcher.submit("sleep:0.2")
    sent = dispatcher.submit("echo:sent")  # heavy until measured: two go to a worker
    assert busy.running() and sent.running()
    assert not busy.cancel() and not sent.cancel()
    assert outcome(sent) == "sent"
    assert not isinstance(outcome(busy), BaseException)


def test_cancelled_waiting_requests_never_run_and_the_others_run_once(
    make: MakeDispatcher, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    dispatcher = make(Ledger(str(ledger)), 1)
    busy = dispatcher.submit(f"busy/sleep:{0.3 * UNIT}")
    sent = dispatcher.submit("sent/echo:sent")  # the worker's second slot
    waiting = {tag: dispatcher.submit(f"{tag}/echo:{tag}") for tag in "abcdefgh"}
    assert not any(future.running() for future in waiting.values())
    assert dispatcher.stats()["waiting"] == len(waiting)
    cancelled = {tag for tag in "bceh" if waiting[tag].cancel()}
    assert cancelled == set("bceh")  # none could have been sent: the worker is busy
    kept = {tag: future for tag, future in waiting.items() if tag not in cancelled}
    assert {tag: outcome(future) for tag, future in kept.items()} == {tag: tag for tag in kept}
    assert outcome(sent) == "sent" and not isinstance(outcome(busy), BaseException)
    assert ledger_runs(ledger) == Counter(["busy", "sent", *kept])  # each once, none cancelled
    stats = dispatcher.stats()
    assert (stats["in_flight"], stats["waiting"], stats["cancelled"]) == (0, 0, len(cancelled))
    assert dispatcher.is_idle()
    assert all(waiting[tag].cancelled() for tag in cancelled)


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


def test_a_handler_that_workers_cannot_load_fails_start_with_one_clean_line(
    make: MakeDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    before = children()
    dispatcher = make(FailsToLoad(), 2, start=False)
    with pytest.raises(PoolStartError, match="cannot load in a worker") as caught:
        dispatcher.start()
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)
    assert caplog.text.count("could not load the handler") == 1  # its traceback, once
    assert "in __setstate__" in caplog.text
    assert wait_until(lambda: children() <= before, 10 * UNIT)


def test_a_worker_exiting_while_loading_fails_start(make: MakeDispatcher) -> None:
    dispatcher = make(FailsToLoad(hard=True), 1, start=False)
    with pytest.raises(PoolStartError, match="exit status 3"):
        dispatcher.start()


def test_start_gives_up_on_workers_that_do_not_start_in_time(
    make: MakeDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_supervisor, "WORKER_START_TIMEOUT_S", 0.0)
    dispatcher = make(Echo(""), 1, start=False)
    with pytest.raises(PoolStartError, match="did not start within"):
        dispatcher.start()


def test_a_pool_that_cannot_spawn_fails_start(
    make: MakeDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_processes(*args: Any, **kwargs: Any) -> Any:
        raise OSError("out of processes")

    monkeypatch.setattr(_supervisor, "WorkerProcess", no_processes)
    dispatcher = make(Echo(""), 1, start=False)
    with pytest.raises(PoolStartError, match="cannot start a worker process: OSError"):
        dispatcher.start()


def test_start_twice_is_an_error(make: MakeDispatcher) -> None:
    dispatcher = make(Echo(""), 1)
    with pytest.raises(RuntimeError, match="already"):
        dispatcher.start()


def test_a_dispatcher_never_started_shuts_down_quietly() -> None:
    dispatcher = ProcessPoolDispatcher(Echo(""), 1, request_timeout_s=None, max_worker_memory=None)
    dispatcher.shutdown()
    assert isinstance(dispatcher.submit("x").exception(timeout=0), RuntimeError)


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
    pids = worker_pids(dispatcher)
    commands = ["raise", "bytes", "raise-unpicklable", "echo:fine", "subclass", "surrogate"]
    futures = {command: dispatcher.submit(command) for command in commands}
    results = {command: outcome(future) for command, future in futures.items()}
    assert isinstance(results["raise"], ValueError)
    assert "do_raise" in str(results["raise"].__cause__)  # the worker's traceback
    assert isinstance(results["bytes"], HandlerReturnTypeError)
    assert isinstance(results["raise-unpicklable"], RuntimeError)
    assert "BadReplyError" in str(results["raise-unpicklable"])
    assert results["echo:fine"] == "fine"
    assert type(results["subclass"]) is str and results["subclass"] == "quiet"
    assert isinstance(results["surrogate"], ValueError)
    assert "cannot be encoded" in str(results["surrogate"])
    assert worker_pids(dispatcher) == pids and dispatcher.stats()["crashed"] == 0


@pytest.mark.parametrize("name", ["SystemExit", "KeyboardInterrupt", "GeneratorExit", "Custom"])
def test_a_base_exception_in_a_handler_fails_only_its_request(
    make: MakeDispatcher, name: str
) -> None:
    dispatcher = make(Commands(), 1)
    pids = worker_pids(dispatcher)
    failed = outcome(dispatcher.submit(f"base:{name}"))
    assert isinstance(failed, RuntimeError)  # an Exception: it cannot stop the I/O loop
    assert name.replace("Custom", "CustomBaseError") in str(failed)
    assert "do_base" in str(failed.__cause__)
    assert outcome(dispatcher.submit("echo:still")) == "still"
    assert worker_pids(dispatcher) == pids  # the same worker keeps serving


def test_many_waiting_requests_travel_in_batches(make: MakeDispatcher) -> None:
    dispatcher = make(Commands(), 1)
    futures = [dispatcher.submit(f"echo:{index}") for index in range(400)]
    assert [outcome(future) for future in futures] == [str(index) for index in range(400)]
    assert dispatcher.stats()["batches"] < 100


def test_a_request_larger_than_the_socket_buffer_is_sent_whole(make: MakeDispatcher) -> None:
    dispatcher = make(Echo(""), 1)
    big = "x" * (8 * 1024 * 1024)
    futures = [dispatcher.submit(big), dispatcher.submit("small")]
    assert [outcome(future) for future in futures] == [big, "small"]


def test_stats_report_each_worker(make: MakeDispatcher) -> None:
    dispatcher = make(Commands(), 2)
    for future in [dispatcher.submit("pid") for _ in range(20)]:
        outcome(future)
    stats = dispatcher.stats()
    expected = {"crashed", "timed_out", "in_flight", "waiting", "resent", "recycled", "shed"}
    assert expected | {"restarts_crashed", "restarts_timed_out", "start_failures"} <= set(stats)
    assert stats["in_flight"] == stats["waiting"] == 0
    assert sum(worker["served"] for worker in stats["workers"]) == 20
    for worker in stats["workers"]:
        assert worker["rss"] > 0
        assert isinstance(worker["cpu_percent"], float)


def test_thousands_of_requests_one_at_a_time_all_come_back(make: MakeDispatcher) -> None:
    dispatcher = make(Echo("e:"), 1)
    for index in range(3 * 2000):
        assert outcome(dispatcher.submit(f"{index}"), 10 * UNIT) == f"e:{index}"


def test_a_light_handler_s_requests_are_not_packed_behind_one_that_turned_slow(
    make: MakeDispatcher, tmp_path: Path
) -> None:
    """Light requests are packed on the busiest worker, but not on one whose running
    request has taken longer than STALLED_S: they go to the other worker meanwhile."""
    ledger = tmp_path / "ledger"
    dispatcher = make(Ledger(str(ledger)), 2)
    assert [outcome(dispatcher.submit(f"w{i}/echo:w")) for i in range(50)] == ["w"] * 50
    slow = dispatcher.submit(f"slow/sleep:{5 * UNIT}")
    assert wait_until(lambda: "slow" in ledger_runs(ledger), 10 * UNIT)
    started = time.monotonic()
    assert wait_until(lambda: time.monotonic() - started > 2 * _book.STALLED_S, 1.0)
    futures = [dispatcher.submit(f"e{i}/echo:{i}") for i in range(40)]
    assert [outcome(future) for future in futures] == [str(i) for i in range(40)]
    assert not slow.done()  # all forty were answered while the slow one still ran


# -- crashes: one worker at a time ------------------------------------------------------


def test_one_poison_request_among_64_costs_only_its_own_reply(
    make: MakeDispatcher, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    dispatcher = make(Ledger(str(ledger)), 2)
    old_pids = worker_pids(dispatcher)
    commands = [f"{i}/echo:{i}" if i % 2 else f"{i}/sleep:0.01" for i in range(64)]
    commands[20] = "20/exit:1"
    futures = [dispatcher.submit(command) for command in commands]
    results = [outcome(future) for future in futures]
    failures = [index for index, result in enumerate(results) if isinstance(result, BaseException)]
    assert failures == [20]
    assert isinstance(results[20], WorkerCrashError)
    assert all(results[i] == str(i) for i in range(1, 64, 2))
    assert set(ledger_runs(ledger).values()) == {1}  # nothing ran twice
    assert len(ledger_runs(ledger)) == 64
    stats = dispatcher.stats()
    assert (stats["crashed"], stats["restarts_crashed"]) == (1, 1)
    assert stats["resent"] > 0  # bystanders queued on the dead worker went elsewhere
    assert wait_until(lambda: dispatcher.stats()["workers_alive"] == 2, 30 * UNIT)
    assert len(worker_pids(dispatcher) & old_pids) == 1  # only the dead one was replaced


def test_the_others_serve_while_a_slow_replacement_loads(
    make: MakeDispatcher, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    load_s = 1.5 * UNIT
    dispatcher = make(Ledger(str(ledger), load_delay_s=load_s), 2)
    assert isinstance(outcome(dispatcher.submit("poison/exit:1")), WorkerCrashError)
    crashed_at = time.monotonic()
    replies = []
    while time.monotonic() - crashed_at < load_s:  # the replacement is still loading
        replies.append(outcome(dispatcher.submit(f"r{len(replies)}/echo:ok")))
        assert dispatcher.stats()["workers_alive"] >= 1
    assert replies and set(replies) == {"ok"}
    assert wait_until(lambda: dispatcher.stats()["workers_alive"] == 2, 30 * UNIT)
    assert set(ledger_runs(ledger).values()) == {1}


def test_sigkilled_workers_under_load_cost_at_most_one_request_each(
    make: MakeDispatcher, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    dispatcher = make(Ledger(str(ledger)), 2)
    futures = []
    rng = random.Random(15)
    for kill in range(3):
        futures += [dispatcher.submit(f"k{kill}r{i}/sleep:0.005") for i in range(60)]
        time.sleep(rng.uniform(0.02, 0.1))  # the kill lands mid-run, not at a boundary
        os.kill(rng.choice(sorted(worker_pids(dispatcher))), signal.SIGKILL)
        assert wait_until(lambda: dispatcher.stats()["workers_alive"] == 2, 30 * UNIT)
    results = [outcome(future) for future in futures]
    failed = [result for result in results if isinstance(result, BaseException)]
    assert len(failed) <= 3 and all(isinstance(error, WorkerCrashError) for error in failed)
    assert set(ledger_runs(ledger).values()) == {1}
    assert dispatcher.stats()["restarts_crashed"] == 3


def test_a_pool_whose_replacements_fail_to_load_heals_when_the_cause_goes(
    make: MakeDispatcher, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "broken"
    dispatcher = make(FailsToLoad(str(marker)), 2)
    marker.touch()  # from now on, a new worker cannot load the handler
    assert isinstance(outcome(dispatcher.submit("exit")), WorkerCrashError)
    assert wait_until(lambda: dispatcher.stats()["start_failures"] >= 3, 30 * UNIT)
    assert outcome(dispatcher.submit("echo")) == "loaded"  # the other worker serves on
    assert caplog.text.count("could not load the handler:") == 1  # the traceback, once
    marker.unlink()
    healed_by = time.monotonic() + 15 * UNIT
    assert wait_until(lambda: dispatcher.stats()["workers_alive"] == 2, 15 * UNIT)
    assert time.monotonic() < healed_by


def test_with_no_worker_alive_a_failed_start_fails_the_waiting_requests(
    make: MakeDispatcher, tmp_path: Path
) -> None:
    marker = tmp_path / "broken"
    dispatcher = make(FailsToLoad(str(marker), hard=True), 1)
    marker.touch()
    crashed, stranded = dispatcher.submit("exit"), dispatcher.submit("echo")
    given_up = dispatcher.submit("echo")  # waits behind the two on the worker
    assert given_up.cancel()
    assert isinstance(outcome(crashed), WorkerCrashError)
    assert isinstance(outcome(stranded), WorkerStartError)
    assert dispatcher.stats()["shed"] == 1  # the cancelled one is not counted as failed
    assert given_up.cancelled()
    marker.unlink()
    assert outcome(dispatcher.submit("echo")) == "loaded"  # healed: requests wait for it


def test_an_unexpected_error_in_supervision_is_logged_and_supervision_goes_on(
    make: MakeDispatcher, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = make(Commands(), 1)
    operations = dispatcher._supervisor._operations
    real_turn_over = operations.turn_over
    calls = []

    def turn_over_once_broken() -> None:
        calls.append(None)
        if len(calls) == 1:
            raise KeyError("bug")
        real_turn_over()

    monkeypatch.setattr(operations, "turn_over", turn_over_once_broken)
    dispatcher._supervisor.wake()
    assert wait_until(lambda: "supervision failed; it goes on" in caplog.text, 10 * UNIT)
    assert isinstance(outcome(dispatcher.submit("exit:1")), WorkerCrashError)
    assert outcome(dispatcher.submit("echo:on")) == "on"


def test_a_bug_reading_replies_replaces_only_that_worker(
    make: MakeDispatcher, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = make(Commands(), 1)
    real_settle = dispatcher._links._settle
    broken = [True]

    def settle_once_broken(link: Any, payloads: list[bytes]) -> None:
        if broken.pop() if broken else False:
            raise KeyError("bug")
        real_settle(link, payloads)

    monkeypatch.setattr(dispatcher._links, "_settle", settle_once_broken)
    assert isinstance(outcome(dispatcher.submit("echo:lost")), WorkerCrashError)
    assert "reading worker" in caplog.text
    assert outcome(dispatcher.submit("echo:next")) == "next"


def test_a_reply_that_does_not_unpickle_fails_the_request_it_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert _requests._decode(b"not a pickle") is None
    assert "cannot read a worker's reply" in caplog.text
    failed = _requests._undecodable(7)
    assert isinstance(failed, Outcome) and failed.request_id == 7
    assert "cannot read the worker's reply" in str(failed.error)
    assert _requests._undecodable(None).request_id == -1


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
    others = [dispatcher.submit(f"sleep:{0.25 * UNIT}") for _ in range(8)]
    result = outcome(hung)
    assert isinstance(result, HandlerTimeoutError)
    assert isinstance(result, TimeoutError)
    assert all(not isinstance(outcome(future), BaseException) for future in others)
    assert wait_until(lambda: not alive(child) and not alive(worker), 10 * UNIT)
    assert wait_until(lambda: dispatcher.stats()["restarts_timed_out"] == 1, 10 * UNIT)
    stats = dispatcher.stats()
    assert (stats["timed_out"], stats["crashed"]) == (1, 0)
    assert outcome(dispatcher.submit("echo:after")) == "after"


def test_the_timeout_counts_from_the_handler_start_not_from_submit(
    make: MakeDispatcher,
) -> None:
    dispatcher = make(Commands(), 1, timeout_s=1.0 * UNIT)
    futures = [dispatcher.submit(f"sleep:{0.3 * UNIT}") for _ in range(5)]  # 1.5 units queued
    assert all(not isinstance(outcome(future), BaseException) for future in futures)
    assert dispatcher.stats()["timed_out"] == 0


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


class AttachedLoop:
    """A real I/O loop serving in a thread, attached to a dispatcher, as a server's is.

    Requests are submitted on the I/O thread (as the loop does); each future
    records the name of the thread it ended on.
    """

    THREAD = "test-io-loop"

    def __init__(self, dispatcher: ProcessPoolDispatcher) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        self.loop = IOLoop(
            listener,
            dispatcher,
            read_timeout_s=10 * UNIT,
            request_timeout_s=None,
            max_request_size=1000,
            max_pending=None,
        )
        self.ended_on: dict[int, str] = {}
        self.address = f"127.0.0.1:{listener.getsockname()[1]}"
        self._dispatcher = dispatcher
        self._thread = threading.Thread(target=self.loop.serve, name=self.THREAD, daemon=True)
        self._thread.start()
        assert wait_until(lambda: dispatcher._links._host is self.loop, 10 * UNIT)

    def submit(self, *texts: str, then: Callable[[], None] = lambda: None) -> list[Future[str]]:
        """Submit ``texts`` in one pass of the loop (so they start together); ``then``
        runs on the I/O thread right after they were sent (and the timer set)."""
        futures: list[Future[str]] = []
        submitted = threading.Event()

        def submit_all() -> None:
            for text in texts:
                future = self._dispatcher.submit(text)
                future.add_done_callback(self._record)
                futures.append(future)
            self.loop.call_soon(then)  # queued behind the pass's top-up
            submitted.set()

        assert self.loop.call_soon(submit_all)
        assert submitted.wait(10 * UNIT)
        return futures

    def stop(self) -> None:
        self.loop.request_stop()
        self._thread.join(10 * UNIT)
        assert not self._thread.is_alive()

    def _record(self, future: Future[str]) -> None:
        self.ended_on[id(future)] = threading.current_thread().name


def test_deadlines_due_together_fail_on_the_io_thread_and_kill_only_their_workers(
    make: MakeDispatcher,
) -> None:
    dispatcher = make(Commands(), 3, timeout_s=1.0 * UNIT)
    io = AttachedLoop(dispatcher)
    try:
        futures = io.submit("hang", "hang", "echo:bystander")  # one pass: one deadline
        first, second, bystander = (outcome(future) for future in futures)
        assert isinstance(first, HandlerTimeoutError) and isinstance(second, HandlerTimeoutError)
        assert bystander == "bystander"
        assert {io.ended_on[id(future)] for future in futures[:2]} == {AttachedLoop.THREAD}
        assert wait_until(lambda: dispatcher.stats()["restarts_timed_out"] == 2, 10 * UNIT)
        assert dispatcher.stats()["timed_out"] == 2
        assert outcome(io.submit("echo:after")[0]) == "after"
    finally:
        io.stop()


def test_a_client_is_cut_off_at_the_deadline_with_no_other_event_to_wake_the_loop(
    make: MakeDispatcher,
) -> None:
    dispatcher = make(Commands(), 1, timeout_s=0.5 * UNIT)
    timed_out: list[list[int]] = []
    dispatcher._requests._kill = timed_out.append  # no kill: no end of stream wakes the loop
    io = AttachedLoop(dispatcher)
    try:
        started = time.monotonic()
        assert mpreqrep.do_request(io.address, "hang", timeout=10 * UNIT) == ""
        assert time.monotonic() - started < 5 * UNIT
        assert len(timed_out) == 1
    finally:
        dispatcher._supervisor.kill_timed_out(timed_out[0] if timed_out else [])
        io.stop()


def test_a_deadline_due_while_the_io_loop_is_busy_fires_as_soon_as_it_is_free(
    make: MakeDispatcher,
) -> None:
    dispatcher = make(Commands(), 1, timeout_s=0.3 * UNIT)
    io = AttachedLoop(dispatcher)
    release, holding = threading.Event(), threading.Event()
    try:  # held in the pass that sent it: its timer cannot come due before
        (hung,) = io.submit("hang", then=lambda: (holding.set(), release.wait(30 * UNIT)))
        assert holding.wait(10 * UNIT)
        assert not wait_until(hung.done, 1.0 * UNIT)  # the deadline's host is held up
        release.set()
        assert isinstance(outcome(hung, 5 * UNIT), HandlerTimeoutError)
        assert io.ended_on[id(hung)] == AttachedLoop.THREAD
    finally:
        release.set()
        io.stop()


@pytest.mark.parametrize("stop_at", ["before", "at"])
def test_a_deadline_handed_back_to_the_supervisor_at_stop_still_fails_its_request(
    make: MakeDispatcher, stop_at: str
) -> None:
    timeout_s = 1.0 * UNIT
    dispatcher = make(Commands(), 1, timeout_s=timeout_s)
    io = AttachedLoop(dispatcher)
    (hung,) = io.submit("hang")
    # "at": the loop ends in the pass its deadline comes due, as the channels go home
    io.loop.call_later(0.0 if stop_at == "before" else timeout_s, io.loop.request_stop)
    io.stop()
    assert io.loop._timers == []  # the ended loop keeps no timer
    stopping = threading.Thread(target=dispatcher.shutdown)
    stopping.start()
    assert isinstance(outcome(hung, 10 * UNIT), HandlerTimeoutError)
    stopping.join(30 * UNIT)
    assert not stopping.is_alive()
    threads = {AttachedLoop.THREAD, "mpreqrep-pool-supervisor"}
    assert io.ended_on[id(hung)] in (threads if stop_at == "at" else threads - {io.THREAD})
    assert dispatcher.stats()["timed_out"] == 1


def test_stopping_with_the_deadline_timer_set_leaves_no_timer_behind(
    make: MakeDispatcher,
) -> None:
    dispatcher = make(Commands(), 1, timeout_s=60 * UNIT)
    io = AttachedLoop(dispatcher)
    assert outcome(io.submit("echo:a")[0]) == "a"
    assert len(io.loop._timers) == 1  # set for the request's deadline, a minute on
    io.stop()
    assert io.loop._timers == []
    dispatcher.shutdown()
    assert dispatcher._supervisor._timers == []
    assert dispatcher.stats()["timed_out"] == 0


@pytest.mark.parametrize("timeout_s", [1e300, math.inf])
def test_a_huge_or_infinite_timeout_never_fires_and_supervision_goes_on(
    make: MakeDispatcher, timeout_s: float, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = make(Commands(), 1, timeout_s=timeout_s)
    for index in range(3):  # the supervisor hosts the timer: its waits are capped
        assert outcome(dispatcher.submit(f"echo:{index}")) == str(index)
        dispatcher._supervisor.wake()
    io = AttachedLoop(dispatcher)
    try:
        assert outcome(io.submit("echo:io")[0]) == "io"  # the I/O loop's are too
    finally:
        io.stop()
    assert "failed" not in caplog.text
    assert dispatcher.stats()["timed_out"] == 0


# -- memory -----------------------------------------------------------------------------


def test_a_worker_past_its_memory_cap_is_recycled_between_requests(
    make: MakeDispatcher,
) -> None:
    megabyte = 1024 * 1024
    dispatcher = make(Commands(), 1, max_rss=150 * megabyte)
    first = outcome(dispatcher.submit("pid"))
    assert outcome(dispatcher.submit("grow:200")) == first
    assert wait_until(lambda: dispatcher.stats()["recycled"] == 1, 10 * UNIT)  # supervisor's turn
    after = [outcome(dispatcher.submit("pid")) for _ in range(3)]
    assert all(not isinstance(reply, BaseException) for reply in after)
    assert after[0] != first
    stats = dispatcher.stats()
    assert (stats["recycled"], stats["restarts_crashed"], stats["crashed"]) == (1, 0, 0)
    assert not alive(int(str(first)))
    assert [worker["rss"] < 150 * megabyte for worker in stats["workers"]] == [True]


def test_a_memory_cap_below_a_fresh_worker_recycles_after_every_request(
    make: MakeDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = make(Commands(), 1, max_rss=1)
    assert "below a fresh worker's RSS" in caplog.text
    pids = []
    for recycled in range(1, 5):
        pids.append(outcome(dispatcher.submit("pid")))
        assert wait_until(functools.partial(recycled_is, dispatcher, recycled), 30 * UNIT)
    assert all(not isinstance(pid, BaseException) for pid in pids)
    assert len(set(pids)) == 4  # each worker retires after one request
    assert dispatcher.stats()["crashed"] == 0


def recycled_is(dispatcher: ProcessPoolDispatcher, count: int) -> bool:
    return bool(dispatcher.stats()["recycled"] == count)


# -- shutdown and orphans ---------------------------------------------------------------


def test_shutdown_answers_every_request_and_leaves_no_worker(make: MakeDispatcher) -> None:
    before = children()
    dispatcher = make(Commands(), 2)
    pids = worker_pids(dispatcher)
    futures = [dispatcher.submit(f"sleep:{0.2 * UNIT}") for _ in range(5)]
    dispatcher.shutdown()
    assert all(future.done() and future.exception() is None for future in futures)
    assert not {pid for pid in pids if alive(pid)}
    assert children() <= before


def test_requests_after_shutdown_fail_and_a_second_shutdown_is_harmless(
    make: MakeDispatcher,
) -> None:
    dispatcher = make(Echo(""), 1)
    dispatcher.shutdown()
    late = dispatcher.submit("late")
    assert isinstance(late.exception(timeout=0), RuntimeError)
    dispatcher.shutdown()


ORPHAN_SCRIPT = """
import sys, time
from mpreqrep._pool import ProcessPoolDispatcher
from tests.pool_handlers import Commands

dispatcher = ProcessPoolDispatcher(
    Commands(), 2, request_timeout_s=None, max_worker_memory=None
)
dispatcher.start()
busy = dispatcher.submit("hang")
time.sleep(0.3)
print(" ".join(str(worker["pid"]) for worker in dispatcher.stats()["workers"]), flush=True)
threading_event = __import__("threading").Event()
threading_event.wait()
"""


def test_workers_die_with_a_sigkilled_parent_even_a_busy_one() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    parent = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_SCRIPT], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert parent.stdout is not None
        pids = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(pids) == 2
        family = psutil.Process(parent.pid).children(recursive=True)
        sockets = {
            os.path.dirname(conn.laddr)
            for child in family
            for conn in _unix_connections(child)
            if conn.laddr
        }
    finally:
        parent.kill()
        parent.wait()
    killed_at = time.monotonic()
    assert wait_until(lambda: not any(alive(child.pid) for child in family), 2.0 * UNIT)
    print(f"every descendant gone {time.monotonic() - killed_at:.3f} s after the SIGKILL")
    assert not any(os.path.exists(directory) for directory in sockets)


def _unix_connections(process: psutil.Process) -> list[Any]:
    """The Unix sockets a process holds ([] if it is gone)."""
    try:
        return list(process.net_connections(kind="unix"))
    except psutil.Error:
        return []


def test_the_atexit_hook_kills_the_workers_of_pools_never_shut_down() -> None:
    script = textwrap.dedent(
        """
        from mpreqrep._pool import ProcessPoolDispatcher
        from tests.pool_handlers import Echo
        dispatcher = ProcessPoolDispatcher(
            Echo(""), 1, request_timeout_s=None, max_worker_memory=None
        )
        dispatcher.start()
        print(dispatcher.stats()["workers"][0]["pid"], flush=True)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60 * UNIT, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().isdigit()  # nothing else: no replacement was started
    assert wait_until(lambda: not alive(int(result.stdout)), 5 * UNIT)


def test_concurrent_submits_from_many_threads_all_come_back(make: MakeDispatcher) -> None:
    dispatcher = make(Echo(""), 2)
    results: list[str | BaseException] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for round_ in range(50):
            reply = outcome(dispatcher.submit(f"{index}.{round_}"))
            with lock:
                results.append(reply)

    threads = [threading.Thread(target=client, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60 * UNIT)
    assert sorted(map(str, results)) == sorted(f"{i}.{r}" for i in range(8) for r in range(50))
