"""Process mode over real sockets: a loky pool behind the acceptor."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

import mpreqrep

from .conftest import UNIT, assert_all_gone_soon, running, wait_until
from .process_handlers import PidServer, RaisingServer, SlowLedgerServer
from .test_server import fire

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).resolve().parent.parent


def pid_of(reply: str | None) -> int:
    assert reply, f"no reply: {reply!r}"
    return int(reply.split()[1])


def children() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def test_handlers_run_in_other_processes_one_pid_per_worker() -> None:
    with running(PidServer, workers=2) as server:
        # 10-14 ms each: a heavy handler's requests are spread over the workers (a
        # light one's are packed on one worker while it has room)
        replies = fire(server.address, 40, "sleep 0.01")
        pids = {pid_of(reply) for reply in replies}
        assert os.getpid() not in pids
        assert len(pids) == 2
        assert pids <= children()
        assert all(reply.startswith("pid ") for reply in replies)  # type: ignore[union-attr]


def test_workers_auto_uses_physical_cores() -> None:
    expected = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    with running(PidServer, workers="auto") as server:
        assert len(server.stats()["workers"]) == expected


@pytest.mark.parametrize("workers", [0, -1, "many", 1.5])
def test_bad_worker_counts_are_value_errors(workers: object) -> None:
    with pytest.raises(ValueError):
        mpreqrep.RequestServer("localhost:0", workers=workers)  # type: ignore[arg-type]


def test_subclass_defined_in_a_main_script_works(tmp_path: Path) -> None:
    script = tmp_path / "user_script.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys
            import mpreqrep

            class Shout(mpreqrep.RequestServer):
                def __init__(self, address, **options):
                    super().__init__(address, **options)
                    self.suffix = "!"

                def handle_request(self, request):
                    return request.strip().upper() + self.suffix + str(os.getpid() != PARENT)

            PARENT = os.getpid()
            if __name__ == "__main__":
                with Shout("localhost:0", workers=1) as server:
                    print(mpreqrep.do_request(server.address, "hey", timeout=60), end="")
            """
        )
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=90 * UNIT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"HEY!True\r\n"


def test_one_poison_request_among_64_costs_only_its_own_reply() -> None:
    with running(PidServer, workers=2) as server:
        replies: list[str | None] = [None] * 64
        commands = ["sleep 0.02"] * 64
        commands[20] = "exit"

        def one(index: int) -> None:
            replies[index] = mpreqrep.do_request(server.address, commands[index], 60 * UNIT)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90 * UNIT)
        assert replies[20] == ""
        others = replies[:20] + replies[21:]
        assert all(reply and reply.endswith(" sleep 0.02\r\n") for reply in others), others
        assert mpreqrep.do_request(server.address, "after", 30 * UNIT).endswith("after\r\n")  # type: ignore[union-attr]
        assert server.stats()["crashed"] == 1


def test_request_timeout_kills_the_worker_and_others_go_on() -> None:
    with running(PidServer, workers=2, request_timeout=1.0 * UNIT) as server:
        assert wait_until(lambda: server.stats()["workers_alive"] == 2, 30 * UNIT)
        # Both workers' pids: light requests may all go to one of them (batching).
        before = {worker["pid"] for worker in server.stats()["workers"]}
        assert len(before) == 2
        hung: list[str | None] = []
        thread = threading.Thread(
            target=lambda: hung.append(mpreqrep.do_request(server.address, "hang", 60 * UNIT))
        )
        thread.start()
        assert wait_until(lambda: server.stats()["in_flight"] == 1, 10 * UNIT)
        assert mpreqrep.do_request(server.address, "beside", 30 * UNIT).endswith("beside\r\n")  # type: ignore[union-attr]
        thread.join(30 * UNIT)
        assert hung == [""]
        assert wait_until(lambda: server.stats()["timed_out"] >= 1, 10 * UNIT)
        assert all(reply for reply in fire(server.address, 10, "w"))
        # Only the hung request's worker was killed (and reaped), and it was replaced.
        assert wait_until(lambda: len(before - children()) == 1, 10 * UNIT)
        assert wait_until(lambda: server.stats()["workers_alive"] == 2, 30 * UNIT)
        assert len(before & {worker["pid"] for worker in server.stats()["workers"]}) == 1


def test_stop_drains_in_flight_requests_and_leaves_no_child() -> None:
    before = children()
    server = PidServer("localhost:0", workers=2)
    server.start()
    replies: list[str | None] = []
    thread = threading.Thread(
        target=lambda: replies.append(mpreqrep.do_request(server.address, "sleep 0.5", 60 * UNIT))
    )
    thread.start()
    assert wait_until(lambda: server.stats()["in_flight"] == 1, 10 * UNIT)
    workers = [psutil.Process(worker["pid"]) for worker in server.stats()["workers"]]
    server.stop()
    server.join(60 * UNIT)
    thread.join(10 * UNIT)
    assert replies and replies[0].endswith("sleep 0.5\r\n")  # type: ignore[union-attr]
    assert len(workers) == 2
    assert wait_until(lambda: not any(worker.is_running() for worker in workers), 20 * UNIT)
    # Only loky's resource tracker may outlive the server, as it outlives every pool.
    assert all(
        "resource_tracker" in " ".join(psutil.Process(pid).cmdline()) for pid in children() - before
    )


def test_stats_report_each_worker() -> None:
    with running(PidServer, workers=2) as server:
        fire(server.address, 20, "s")
        assert wait_until(lambda: server.stats()["served"] == 20, 10 * UNIT)
        workers = server.stats()["workers"]
    assert len(workers) == 2
    assert sum(worker["served"] for worker in workers) >= 20
    assert all(worker["rss"] > 0 and worker["pid"] > 0 for worker in workers)


@pytest.mark.parametrize("command", ["raise", "bytes"])
def test_handler_failure_in_a_worker_closes_without_reply(command: str) -> None:
    from .test_faults import Faulty

    with running(Faulty, workers=1) as server:
        assert mpreqrep.do_request(server.address, command, 30 * UNIT) == ""
        assert mpreqrep.do_request(server.address, "next", 30 * UNIT) == "echo:next\r\n"
        assert server.stats()["failed"] == 1


@pytest.mark.parametrize("name", ["SystemExit", "KeyboardInterrupt", "GeneratorExit"])
def test_a_base_exception_in_a_worker_closes_only_its_connection(name: str) -> None:
    with running(RaisingServer, workers=1) as server:
        assert mpreqrep.do_request(server.address, name, 30 * UNIT) == ""
        assert mpreqrep.do_request(server.address, "next", 30 * UNIT) == "ok:next\r\n"
        stats = server.stats()
        assert (stats["failed"], stats["restarts_crashed"]) == (1, 0)


def test_a_crash_costs_one_request_while_a_slow_replacement_loads(tmp_path: Path) -> None:
    """Issue 15's bar: 2 workers, 1.5 s to load the handler, 8 clients of 20 ms
    requests, one os._exit: every 250 ms after the crash has correct replies,
    nothing but the poison is lost, nothing runs twice."""
    ledger = tmp_path / "ledger"
    window_s, load_s = 0.25, 1.5
    with running(SlowLedgerServer, workers=2, ledger=str(ledger), load_delay_s=load_s) as server:
        crash_at: list[float] = []
        replies: list[tuple[float, str, str | None]] = []
        end_at = time.monotonic() + 0.5 + load_s + 1.0

        def client(index: int) -> None:
            count = 0
            while time.monotonic() < end_at:
                tag = f"c{index}.{count}"
                count += 1
                if index == 0 and count == 10:
                    tag = "poison"
                    crash_at.append(time.monotonic())
                request = f"{tag} exit" if tag == "poison" else f"{tag} 20"
                reply = mpreqrep.do_request(server.address, request, 30 * UNIT)
                replies.append((time.monotonic(), tag, reply))

        threads = [threading.Thread(target=client, args=(index,)) for index in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60 * UNIT)
    assert crash_at
    lost = [tag for _, tag, reply in replies if reply != f"done {tag}\r\n"]
    assert lost == ["poison"]
    runs = Counter(ledger.read_text().split())
    assert set(runs.values()) == {1} and len(runs) == len(replies)
    windows = Counter(
        int((at - crash_at[0]) // window_s) for at, tag, _ in replies if tag != "poison"
    )
    last = int((end_at - crash_at[0]) // window_s) - 1
    empty = [window for window in range(last) if windows[window] == 0]
    assert not empty, f"250 ms windows after the crash without a reply: {empty}"


SERVE = [sys.executable, "-m", "mpreqrep", "serve", "--address", "127.0.0.1:0"]


def test_a_sigkilled_serve_leaves_no_descendant_and_no_socket_directory() -> None:
    command = [*SERVE, "--workers", "2", "tests.process_handlers:PidServer"]
    serve = subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        assert serve.stderr is not None
        line = serve.stderr.readline()
        port = int(re.findall(r":(\d+)", line)[-1])
        busy = threading.Thread(  # one worker is busy in a handler at the kill
            target=mpreqrep.do_request, args=(f"127.0.0.1:{port}", "hang", 10 * UNIT), daemon=True
        )
        busy.start()
        reply = mpreqrep.do_request(f"127.0.0.1:{port}", "beside", 30 * UNIT)
        assert reply and reply.endswith("beside\r\n")  # served beside the hung one
        family = psutil.Process(serve.pid).children(recursive=True)
        directories = {_socket_directory(psutil.Process(serve.pid))} - {None}
    finally:
        serve.kill()
        serve.wait()
    assert_all_gone_soon(family, killed_at=time.monotonic())
    assert directories and not any(os.path.exists(directory) for directory in directories)


def test_a_handler_that_fails_to_load_in_workers_is_one_line_from_serve() -> None:
    command = [*SERVE, "--workers", "2", "tests.process_handlers:FailsInWorkers"]
    result = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60 * UNIT, env=_env()
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "No module named 'numpy'" in errors[0], result.stderr
    assert result.stderr.count("Traceback") == 1  # the handler's own, logged once
    assert "popen_loky" not in result.stderr and "-" * 40 not in result.stderr


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def _socket_directory(process: psutil.Process) -> str | None:
    try:
        paths = [conn.laddr for conn in process.net_connections(kind="unix") if conn.laddr]
    except psutil.Error:
        return None
    return os.path.dirname(paths[0]) if paths else None
