"""``mpreqrep serve`` operated as with gunicorn: SIGHUP, SIGTTIN/SIGTTOU, --max-requests,
--graceful-timeout and --metrics, on real processes under load from 8 clients."""

from __future__ import annotations

import re
import signal
import textwrap
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

import mpreqrep

from .conftest import UNIT, alive, wait_until
from .test_cli import ServeProcess, serve_cli, start
from .test_operations import load, request_in_thread

__all__ = ["serve_cli"]  # the fixture, used by name

pytestmark = pytest.mark.timeout(120 * UNIT)

# 5 ms a request: a heavy handler, whose requests are shared out over both workers
# (a light one's are packed on one worker), so the replies name every worker.
VERSIONED_MODULE = """
import os
import time
import mpreqrep

VERSION = {version!r}


class VersionServer(mpreqrep.RequestServer):
    def handle_request(self, request):
        time.sleep(0.005)
        return VERSION + " " + str(os.getpid())
"""


# Each worker's copy of the server waits for a release file while it loads, so the
# workers are still starting for as long as the test wants.
SLOW_BOOT_MODULE = """
import os
import pathlib
import time

import mpreqrep


class SlowBootServer(mpreqrep.RequestServer):
    def __init__(self, address, *args, **kwargs):
        super().__init__(address, *args, **kwargs)
        self.folder = os.getcwd()

    def __setstate__(self, state):
        super().__setstate__(state)
        folder = pathlib.Path(self.folder)
        (folder / f"booting-{os.getpid()}").touch()
        deadline = time.monotonic() + 50
        while not (folder / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    def handle_request(self, request):
        return str(os.getpid())
"""


def start_booting(serve_cli: list[ServeProcess], tmp_path: Path, *options: str) -> ServeProcess:
    """``serve`` SlowBootServer with ``options``, returned once its first worker is
    loading (the server is not serving yet, and holds there until ``release``)."""
    (tmp_path / "slow_boot.py").write_text(SLOW_BOOT_MODULE)
    child = start(serve_cli, "slow_boot:SlowBootServer", *options, cwd=tmp_path)
    assert wait_until(lambda: booted_pids(tmp_path), 60 * UNIT)
    return child


def booted_pids(folder: Path) -> set[str]:
    return {path.name.removeprefix("booting-") for path in folder.glob("booting-*")}


def send_and_wait_until_queued(child: ServeProcess, signum: int) -> None:
    """Send ``signum`` once the previous one was seen: the kernel merges a signal
    sent while the same one is still pending."""
    queued = "".join(child.stderr).count("queued until")
    child.send(signum)
    assert wait_until(lambda: "".join(child.stderr).count("queued until") > queued, 30 * UNIT)


def latest_stats(child: ServeProcess) -> dict[str, str]:
    """The figures of the last stats line ``serve`` logged."""
    lines = [line for line in child.stderr if " stats " in line]
    if not lines:
        return {}
    return dict(pair.split("=", 1) for pair in lines[-1].split(" stats ", 1)[1].split())


def start_ops_server(serve_cli: list[ServeProcess], *options: str) -> ServeProcess:
    """``serve`` OpsServer with 2 workers (unless ``options`` say otherwise)."""
    return start(serve_cli, "tests.ops_handlers:OpsServer", "--workers", "2", *options)


def read_metrics_url(child: ServeProcess) -> str:
    line = child.stdout.get(timeout=60 * UNIT)
    match = re.fullmatch(r"mpreqrep: metrics at (\S+)\n", line)
    assert match, line
    return match.group(1)


def workers_gauge(url: str) -> tuple[float, set[str]]:
    """The ``mpreqrep_workers`` gauge and the worker labels of one scrape."""
    with urllib.request.urlopen(url, timeout=30 * UNIT) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    gauge = families["mpreqrep_workers"].samples[0].value
    labels = {sample.labels["worker"] for sample in families["mpreqrep_worker_rss_bytes"].samples}
    return gauge, labels


def test_sighup_reloads_the_code_one_worker_at_a_time(
    tmp_path: Path, serve_cli: list[ServeProcess]
) -> None:
    module = tmp_path / "versioned.py"
    module.write_text(VERSIONED_MODULE.format(version="v1"))
    child = start(serve_cli, "versioned:VersionServer", "--workers", "2", cwd=tmp_path)
    address = child.read_address()
    assert mpreqrep.do_request(address, "x", timeout=30 * UNIT).startswith("v1 ")  # type: ignore[union-attr]
    module.write_text(VERSIONED_MODULE.format(version="v2 (edited)"))  # another size too
    with load(address, clients=8) as clients:
        assert wait_until(lambda: len(clients.replies) >= 40, 30 * UNIT)
        old_pids = {int(reply.split()[-1]) for reply in clients.replies if reply}
        child.send(signal.SIGHUP)
        # Done when every old worker has drained and exited (a retiring one may still
        # answer what was queued on it after its replacement's first replies).
        assert wait_until(lambda: not old_pids & worker_pids(child.process.pid), 60 * UNIT)
        seen = len(clients.replies)
        assert wait_until(lambda: len(clients.replies) >= seen + 32, 30 * UNIT)
    assert clients.failures() == 0, clients.errors
    recent = clients.replies[-16:]  # past any reply already on its way at the exit
    assert all(reply and reply.startswith("v2 (edited) ") for reply in recent), recent
    new_pids = {int(reply.split()[-1]) for reply in clients.replies[seen:] if reply}
    assert len(new_pids) == 2 and not new_pids & old_pids
    assert child.stop() == 0


def worker_pids(pid: int) -> set[int]:
    """The pids of a process's live children (a zombie, not yet reaped, is not live)."""
    children = psutil.Process(pid).children()
    return {child.pid for child in children if alive(child)}


def test_sigttin_adds_a_worker_and_sigttou_removes_one(serve_cli: list[ServeProcess]) -> None:
    child = start_ops_server(serve_cli, "--metrics", "127.0.0.1:0")
    address = child.read_address()
    url = read_metrics_url(child)
    # 5 ms handlers: busy enough that a third worker gets requests (the pool batches
    # light ones onto the workers it has).
    with load(address, clients=8, text="sleep:0.005") as clients:
        assert wait_until(lambda: len(clients.replies) >= 20, 30 * UNIT)  # serving
        child.send(signal.SIGTTIN)
        assert wait_until(lambda: workers_gauge(url)[0] == 3, 5 * UNIT)
        seen = len(clients.replies)
        assert wait_until(lambda: len(set(clients.replies[seen:])) >= 3, 10 * UNIT)
        child.send(signal.SIGTTOU)
        assert wait_until(lambda: workers_gauge(url)[0] == 2, 10 * UNIT)
        assert wait_until(lambda: len(workers_gauge(url)[1]) == 2, 30 * UNIT)
    assert clients.failures() == 0, clients.errors
    assert child.stop() == 0


def test_max_requests_rotates_pids_and_loses_nothing(serve_cli: list[ServeProcess]) -> None:
    child = start_ops_server(serve_cli, "--max-requests", "20", "--max-requests-jitter", "5")
    address = child.read_address()
    with load(address, clients=8) as clients:  # until the pids rotated twice over
        assert wait_until(lambda: len(clients.pids()) >= 4, 60 * UNIT)
    assert clients.failures() == 0, clients.errors
    assert child.stop() == 0


def test_graceful_timeout_kills_a_long_handler_and_exits(
    tmp_path: Path, serve_cli: list[ServeProcess]
) -> None:
    child = start_ops_server(serve_cli, "--graceful-timeout", "1")
    address = child.read_address()
    marker = tmp_path / "held"
    thread, replies = request_in_thread(address, f"hold:{marker}")  # a minute, unless killed
    assert wait_until(marker.exists, 30 * UNIT)
    child.record_descendants()
    started = time.monotonic()
    assert child.stop() == 0
    assert time.monotonic() - started < 1 + 3 * UNIT
    thread.join(30 * UNIT)
    assert replies == [""]
    child.assert_no_descendants_left()


def test_operation_signals_outside_process_mode_are_ignored(
    serve_cli: list[ServeProcess],
) -> None:
    child = start(serve_cli, "workers.echo:EchoServer")
    address = child.read_address()
    child.wait_for_stderr("serving at")
    for signum in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        child.send(signum)
    child.wait_for_stderr("SIGTTOU ignored")
    assert mpreqrep.do_request(address, "still", timeout=30 * UNIT) == "still\r\n"
    assert child.stop() == 0


def test_sigttou_keeps_the_last_worker(serve_cli: list[ServeProcess]) -> None:
    child = start_ops_server(serve_cli, "--workers", "1")
    address = child.read_address()
    child.wait_for_stderr("serving at")
    child.send(signal.SIGTTOU)
    child.wait_for_stderr("the last worker stays")
    assert mpreqrep.do_request(address, "pid", timeout=30 * UNIT)
    assert child.stop() == 0


def test_bad_operation_options_are_one_line_errors(serve_cli: list[ServeProcess]) -> None:
    for option, value in (("--max-requests", "0"), ("--max-requests-jitter", "-1")):
        child = start(serve_cli, "workers.echo:EchoServer", option, value)
        assert child.wait() == 2
        assert textwrap.dedent("".join(child.stderr)).count("\n") == 1, child.stderr


# -- operation signals while the workers start ----------------------------------------


def test_ttin_and_ttou_while_the_workers_start_take_effect_in_order_once_serving(
    tmp_path: Path, serve_cli: list[ServeProcess]
) -> None:
    child = start_booting(serve_cli, tmp_path, "--workers", "1", "--stats-interval", "0.1")
    # In order: 1 -> 2 -> 3 -> 2 (the TTOU first would leave the last worker, then 3).
    for signum in (signal.SIGTTIN, signal.SIGTTIN, signal.SIGTTOU):
        send_and_wait_until_queued(child, signum)
    assert not any("workers ->" in line for line in child.stderr)  # nothing done yet
    (tmp_path / "release").touch()
    address = child.read_address()
    child.wait_for_stderr("SIGTTOU: 3 workers -> 2")
    log = "".join(child.stderr)
    assert log.index("SIGTTIN: 1 workers -> 2") < log.index("SIGTTIN: 2 workers -> 3")
    assert wait_until(lambda: latest_stats(child).get("workers_alive") == "2", 30 * UNIT)
    assert latest_stats(child)["workers_wanted"] == "2"
    assert mpreqrep.do_request(address, "x", timeout=30 * UNIT).strip() in booted_pids(tmp_path)  # type: ignore[union-attr]
    assert child.stop() == 0


def test_sighups_while_the_workers_start_make_one_restart_once_serving(
    tmp_path: Path, serve_cli: list[ServeProcess]
) -> None:
    """The code may have changed after the first worker imported it: a SIGHUP that
    came while it started still loads the code afresh, once, however many came."""
    child = start_booting(serve_cli, tmp_path, "--workers", "1")
    (first,) = booted_pids(tmp_path)
    send_and_wait_until_queued(child, signal.SIGHUP)
    send_and_wait_until_queued(child, signal.SIGHUP)
    (tmp_path / "release").touch()
    address = child.read_address()

    def replaced() -> bool:
        reply = mpreqrep.do_request(address, "x", timeout=30 * UNIT)
        return bool(reply) and reply.strip() != first  # type: ignore[union-attr]

    assert wait_until(replaced, 60 * UNIT)
    assert "".join(child.stderr).count("SIGHUP: replacing the 1 workers") == 1
    assert child.stop() == 0
    assert len(booted_pids(tmp_path)) == 2  # the first worker and its one replacement


def test_sigterm_while_the_workers_start_stops_once_they_started(
    tmp_path: Path, serve_cli: list[ServeProcess]
) -> None:
    child = start_booting(serve_cli, tmp_path, "--workers", "1")
    child.send(signal.SIGTERM)
    child.wait_for_stderr("received SIGTERM: draining")
    (tmp_path / "release").touch()
    assert child.wait() == 0
