"""``mpreqrep serve`` operated as with gunicorn: SIGHUP, SIGTTIN/SIGTTOU, --max-requests,
--graceful-timeout and --metrics, on real processes under load from 8 clients."""

from __future__ import annotations

import re
import signal
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import mpreqrep

from .conftest import UNIT, wait_until
from .test_cli import ServeProcess, serve_cli, start
from .test_operations import load, request_in_thread

__all__ = ["serve_cli"]  # the fixture, used by name

pytestmark = pytest.mark.timeout(120 * UNIT)

VERSIONED_MODULE = """
import os
import mpreqrep

VERSION = {version!r}


class VersionServer(mpreqrep.RequestServer):
    def handle_request(self, request):
        return VERSION + " " + str(os.getpid())
"""


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
        child.send(signal.SIGHUP)

        def replaced() -> bool:  # old workers serve v1: every one was replaced
            recent = clients.replies[-16:]
            new = [reply for reply in recent if reply and reply.startswith("v2 (edited) ")]
            return len(new) == 16 and len({reply.split()[-1] for reply in new}) == 2

        assert wait_until(replaced, 60 * UNIT)
    assert clients.failures() == 0
    assert clients.replies[-1] and clients.replies[-1].startswith("v2 (edited) ")
    child.send(signal.SIGTERM)
    assert child.wait() == 0


def test_sigttin_adds_a_worker_and_sigttou_removes_one(serve_cli: list[ServeProcess]) -> None:
    child = start(
        serve_cli,
        "tests.ops_handlers:OpsServer",
        "--workers",
        "2",
        "--metrics",
        "127.0.0.1:0",
    )
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
    assert clients.failures() == 0
    child.send(signal.SIGTERM)
    assert child.wait() == 0


def test_max_requests_rotates_pids_and_loses_nothing(serve_cli: list[ServeProcess]) -> None:
    child = start(
        serve_cli,
        "tests.ops_handlers:OpsServer",
        "--workers",
        "2",
        "--max-requests",
        "20",
        "--max-requests-jitter",
        "5",
    )
    address = child.read_address()
    with load(address, clients=8) as clients:  # until the pids rotated twice over
        assert wait_until(lambda: len(clients.pids()) >= 4, 60 * UNIT)
    assert clients.failures() == 0
    child.send(signal.SIGTERM)
    assert child.wait() == 0


def test_graceful_timeout_kills_a_long_handler_and_exits(
    tmp_path: Path, serve_cli: list[ServeProcess]
) -> None:
    child = start(
        serve_cli, "tests.ops_handlers:OpsServer", "--workers", "2", "--graceful-timeout", "1"
    )
    address = child.read_address()
    marker = tmp_path / "held"
    thread, replies = request_in_thread(address, f"hold:{marker}")  # a minute, unless killed
    assert wait_until(marker.exists, 30 * UNIT)
    child.record_descendants()
    started = time.monotonic()
    child.send(signal.SIGTERM)
    assert child.wait() == 0
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
    child.send(signal.SIGTERM)
    assert child.wait() == 0


def test_sigttou_keeps_the_last_worker(serve_cli: list[ServeProcess]) -> None:
    child = start(serve_cli, "tests.ops_handlers:OpsServer", "--workers", "1")
    address = child.read_address()
    child.wait_for_stderr("serving at")  # signals before that are ignored (logged)
    child.send(signal.SIGTTOU)
    child.wait_for_stderr("the last worker stays")
    assert mpreqrep.do_request(address, "pid", timeout=30 * UNIT)
    child.send(signal.SIGTERM)
    assert child.wait() == 0


def test_bad_operation_options_are_one_line_errors(serve_cli: list[ServeProcess]) -> None:
    for option, value in (("--max-requests", "0"), ("--max-requests-jitter", "-1")):
        child = start(serve_cli, "workers.echo:EchoServer", option, value)
        assert child.wait() == 2
        assert textwrap.dedent("".join(child.stderr)).count("\n") == 1, child.stderr
