"""Prometheus metrics: the collector in a registry of one's own, and ``serve --metrics``."""

from __future__ import annotations

import re
import signal
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import mpreqrep
from mpreqrep._metrics import ServerCollector, server_registry

from .conftest import UNIT, running, wait_until
from .ops_handlers import OpsServer
from .test_cli import ServeProcess, serve_cli, start

__all__ = ["serve_cli"]  # the fixture, used by name


def scrape(registry: CollectorRegistry) -> dict[str, Any]:
    """The registry's exposition, parsed back by prometheus-client's own parser."""
    return families(generate_latest(registry).decode())


def families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(family: Any, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for sample in family.samples
        if sample.name == name
    }


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    yield CollectorRegistry(auto_describe=True)


def test_process_mode_figures_parse_back(registry: CollectorRegistry) -> None:
    with running(OpsServer, workers=2) as server:
        registry.register(ServerCollector(server))
        replies = [mpreqrep.do_request(server.address, "hi", timeout=30 * UNIT) for _ in range(6)]
        assert mpreqrep.do_request(server.address, "exit", timeout=30 * UNIT) == ""
        assert wait_until(lambda: server.stats()["restarts_crashed"] == 1, 30 * UNIT)
        parsed = scrape(registry)
        pids = {str(worker["pid"]) for worker in server.stats()["workers"]}
    assert all(reply and reply.strip().isdigit() for reply in replies)
    outcomes = samples(parsed["mpreqrep_requests"], "mpreqrep_requests_total")
    assert outcomes[(("outcome", "served"),)] == 6
    assert outcomes[(("outcome", "crashed"),)] == 1
    assert outcomes[(("outcome", "failed"),)] == 0  # the crash is counted once
    assert {outcomes[(("outcome", name),)] for name in ("timed_out", "dropped")} == {0}
    durations = parsed["mpreqrep_request_duration_seconds"]
    buckets = samples(durations, "mpreqrep_request_duration_seconds_bucket")
    assert buckets[(("le", "+Inf"),)] == 6
    assert samples(durations, "mpreqrep_request_duration_seconds_count")[()] == 6
    assert samples(durations, "mpreqrep_request_duration_seconds_sum")[()] > 0
    assert list(buckets.values()) == sorted(buckets.values())  # cumulative
    assert samples(parsed["mpreqrep_requests_in_flight"], "mpreqrep_requests_in_flight")[()] == 0
    assert samples(parsed["mpreqrep_requests_queued"], "mpreqrep_requests_queued")[()] == 0
    rss = samples(parsed["mpreqrep_worker_rss_bytes"], "mpreqrep_worker_rss_bytes")
    assert {labels[0][1] for labels in rss} <= pids and all(value > 0 for value in rss.values())
    cpu = samples(parsed["mpreqrep_worker_cpu_percent"], "mpreqrep_worker_cpu_percent")
    assert all(0 <= value <= 100 * 1.5 for value in cpu.values())
    served = parsed["mpreqrep_worker_requests_served"]
    assert served.type == "counter"
    restarts = samples(parsed["mpreqrep_worker_restarts"], "mpreqrep_worker_restarts_total")
    assert restarts[(("cause", "crashed"),)] == 1


def test_thread_mode_has_no_worker_figures_and_an_idle_server_none() -> None:
    server = mpreqrep.RequestServer("127.0.0.1:0")
    own = server_registry(server)
    assert scrape(own) == {}  # not serving yet: nothing to report
    server.start()
    try:
        assert mpreqrep.do_request(server.address, "x", timeout=30 * UNIT) == "Requested: x\r\n"
        parsed = scrape(own)
    finally:
        server.stop()
        server.join(30 * UNIT)
    assert "mpreqrep_worker_rss_bytes" not in parsed
    outcomes = samples(parsed["mpreqrep_requests"], "mpreqrep_requests_total")
    assert outcomes[(("outcome", "served"),)] == 1


def test_without_prometheus_client_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    server = mpreqrep.RequestServer("127.0.0.1:0")
    try:
        with pytest.raises(ImportError, match=re.escape("mpreqrep[metrics]")):
            ServerCollector(server)
    finally:
        server.stop()  # never started: nothing else to release


def read_metrics_url(child: ServeProcess) -> str:
    line = child.stdout.get(timeout=60 * UNIT)
    match = re.fullmatch(r"mpreqrep: metrics at (\S+)\n", line)
    assert match, line
    return match.group(1)


@pytest.mark.timeout(120 * UNIT)
def test_serve_metrics_over_http(serve_cli: list[ServeProcess]) -> None:
    child = start(
        serve_cli, "tests.ops_handlers:OpsServer", "--workers", "2", "--metrics", "127.0.0.1:0"
    )
    address = child.read_address()
    url = read_metrics_url(child)
    for _ in range(5):
        assert mpreqrep.do_request(address, "hi", timeout=30 * UNIT)
    with urllib.request.urlopen(url, timeout=30 * UNIT) as response:
        assert response.status == 200
        parsed = families(response.read().decode())
    outcomes = samples(parsed["mpreqrep_requests"], "mpreqrep_requests_total")
    assert outcomes[(("outcome", "served"),)] == 5
    rss = samples(parsed["mpreqrep_worker_rss_bytes"], "mpreqrep_worker_rss_bytes")
    assert len(rss) == 2
    child.send(signal.SIGTERM)
    assert child.wait() == 0


def test_serve_metrics_at_a_taken_port_is_exit_1(serve_cli: list[ServeProcess]) -> None:
    with running() as other:
        child = start(serve_cli, "workers.echo:EchoServer", "--metrics", other.address)
        assert child.wait() == 1
    assert any("cannot serve metrics" in line for line in child.stderr), child.stderr
