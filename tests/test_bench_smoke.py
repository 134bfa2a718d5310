"""The benchmark harness: load generator counts, peer processes, reports, ``--help``.

Every load here is bounded to a few hundred requests against stdlib peers,
so the file runs in a few seconds.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from .conftest import UNIT

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import loadgen  # noqa: E402
import peers  # noqa: E402

LOOPS = [
    pytest.param(
        "uvloop",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("uvloop") is None, reason="uvloop not installed"
        ),
    ),
    "asyncio",
]
ECHO = peers.HANDLERS["echo"]


def echo_spec(port: int, **changes: object) -> loadgen.LoadSpec:
    """A few hundred echo requests from 8 clients, bounded in time too."""
    spec = loadgen.LoadSpec(
        port=port,
        request=ECHO.request,
        expected_reply=ECHO.expected_reply(),
        clients=8,
        duration_s=20 * UNIT,
        max_requests=300,
        timeout_s=5 * UNIT,
        loop="asyncio",
    )
    return replace(spec, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def threading_peer() -> Iterator[peers.PeerProcess]:
    """socketserver's ThreadingTCPServer serving echo, in its own process."""
    with peers.PeerProcess("threading", "echo") as peer:
        peer.wait_ready(timeout_s=30 * UNIT)
        yield peer


@pytest.mark.parametrize("loop", LOOPS)
def test_every_request_answered(threading_peer: peers.PeerProcess, loop: str) -> None:
    result = loadgen.run_load(echo_spec(threading_peer.port, loop=loop))
    assert (result.ok, result.errors) == (300, {})
    assert len(result.latencies_s) == 300
    assert result.rate > 0
    assert result.cpu_s > 0


def test_processes_share_the_budget(threading_peer: peers.PeerProcess) -> None:
    with loadgen.GeneratorPool(2) as pool:
        result = pool.run(echo_spec(threading_peer.port, clients=3, max_requests=201))
        assert len(pool.pids) == 2
    assert (result.ok, result.errors) == (201, {})


def test_wrong_replies_are_counted(threading_peer: peers.PeerProcess) -> None:
    result = loadgen.run_load(echo_spec(threading_peer.port, expected_reply="nope\r\n"))
    assert (result.ok, result.errors) == (0, {"mismatch": 300})


def test_refused_connections_are_counted() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        closed_port = probe.getsockname()[1]
    result = loadgen.run_load(echo_spec(closed_port, max_requests=50))
    assert (result.ok, result.errors) == (0, {"ECONNREFUSED": 50})


def test_silent_server_times_out() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:  # listens, never accepts
        spec = echo_spec(listener.getsockname()[1], clients=2, max_requests=4, timeout_s=0.2)
        result = loadgen.run_load(spec)
    assert (result.ok, result.errors) == (0, {"timeout": 4})


def test_split_spec_shares_clients_and_budget() -> None:
    parts = loadgen.split_spec(echo_spec(1, clients=3, max_requests=10), 4)
    assert [(part.clients, part.max_requests) for part in parts] == [(1, 3), (1, 3), (1, 2)]


def test_peer_is_ended_with_its_tree() -> None:
    peer = peers.PeerProcess("forking", "echo")
    peer.wait_ready(timeout_s=30 * UNIT)
    assert peer.cpu_seconds() > 0
    peer.stop()
    with pytest.raises(peers.PeerError):
        peer.check_alive()


def test_quick_bench_writes_reports(tmp_path: Path) -> None:
    pytest.importorskip("tqdm")
    pytest.importorskip("matplotlib")
    import bench

    options = {
        "--servers": "threading", "--handlers": "echo", "--clients": "2", "--duration": "0.3",
        "--max-requests": "200", "--warmup": "0.1", "--ceiling": "0", "--loop": "asyncio",
        "--json": tmp_path / "bench.json", "--markdown": tmp_path / "bench.md",
        "--plot": tmp_path / "bench.png",
    }  # fmt: skip
    argv = [str(item) for pair in options.items() for item in pair] + ["--no-progress"]
    assert bench.main(argv) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(row["server"], row["clients"], row["errors"]) for row in rows] == [("threading", 2, 0)]
    assert rows[0]["ok"] > 0 and rows[0]["ratio"] == 1.0
    assert "| threading | echo | 2 |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG")


def test_wrapper_help() -> None:
    completed = subprocess.run(
        [str(SCRIPTS / "bench"), "--help"],
        capture_output=True,
        text=True,
        timeout=300 * UNIT,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    for option in ("--servers", "--clients", "--processes", "--quick", "--markdown"):
        assert option in completed.stdout


def test_rounds_of_a_cell_add_up_and_a_failed_round_fails_the_cell() -> None:
    import bench

    def part(rate: float, wall_s: float, ok: int, latency_s: float) -> bench.Measurement:
        result = loadgen.LoadResult(ok=ok, rate=rate, wall_s=wall_s, cpu_s=0.5)
        result.latencies_s.extend([latency_s] * ok)
        return bench.Measurement("threading", "echo", 4, result, server_cpu_s=0.25)

    row = bench.combine_rounds([part(100.0, 1.0, 100, 0.001), part(300.0, 3.0, 900, 0.003)], 1)
    assert row.requests_per_s == pytest.approx(250.0)  # (100 x 1 + 300 x 3) / 4 s
    assert (row.ok, row.server_cpu_s, row.generator_cpu_s, row.wall_s) == (1000, 0.5, 1.0, 4.0)
    assert row.p50_ms == pytest.approx(3.0)
    failed = bench.Measurement("threading", "echo", 4, note="peer died")
    assert bench.combine_rounds([part(100.0, 1.0, 100, 0.001), failed], 1).note == "peer died"
