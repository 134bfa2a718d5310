"""Prometheus metrics over a server's figures: a collector, and an HTTP endpoint for the CLI.

Needs the optional extra ``mpreqrep[metrics]`` (prometheus-client), imported
only when a collector is made, so ``import mpreqrep`` stays light. The
collector owns no counter of its own: each scrape reads
:meth:`RequestServer.stats` once and turns it into metric families, so the
figures are those the server keeps anyway (and ``--stats-interval`` logs)::

    scrape ──▶ registry.collect() ──▶ ServerCollector.collect()
                                          └─▶ server.stats() (any thread)
                                               ├─ I/O loop: outcomes, latencies,
                                               │            in flight, queued
                                               └─ pool: workers, restarts

Knows nothing of sockets, pools or processes beyond the stats' keys.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from ._server import RequestServer

NAMESPACE = "mpreqrep"

OUTCOMES = ("served", "failed", "timed_out", "crashed", "dropped")
"""Request outcomes counted in ``mpreqrep_requests_total{outcome=...}``."""

RESTART_CAUSES = ("crashed", "timed_out", "recycled", "reloaded", "killed")
"""Causes counted in ``mpreqrep_worker_restarts_total{cause=...}``."""


def _import_prometheus() -> Any:
    """The prometheus_client module, or an ImportError that names the extra."""
    try:
        import prometheus_client
    except ImportError as exc:
        raise ImportError(
            "metrics need prometheus-client: pip install 'mpreqrep[metrics]'"
        ) from exc
    return prometheus_client


class ServerCollector:
    """A prometheus-client collector of one server's request and worker figures.

    Register it in a registry of your own (``registry.register(collector)``)
    or in ``prometheus_client.REGISTRY``. Every scrape calls the server's
    :meth:`~mpreqrep.RequestServer.stats` once; before the server serves,
    it yields nothing. Thread-safe, as ``stats()`` is.

    Metrics (prefix ``mpreqrep_``): ``requests_total{outcome}``
    (served, failed, timed_out, crashed, dropped; ``failed`` excludes the
    requests lost with a crashed worker), ``request_duration_seconds``
    (a histogram, from accept to reply, of the requests served),
    ``requests_in_flight``, ``requests_queued``; in process mode also
    ``workers``, ``worker_rss_bytes{worker}``, ``worker_cpu_percent{worker}``,
    ``worker_requests_served_total{worker}`` (``worker`` is the pid) and
    ``worker_restarts_total{cause}``.

    Args:
        server: the server to report on.

    Raises:
        ImportError: prometheus-client is not installed.
    """

    def __init__(self, server: RequestServer) -> None:
        _import_prometheus()
        self._server = server

    def collect(self) -> Iterator[Metric]:
        """The metric families of one scrape (prometheus-client's collector protocol)."""
        stats = self._server.stats()
        if not stats:
            return
        yield self._outcomes(stats)
        yield self._durations(stats)
        yield self._gauge("requests_in_flight", "Requests handed to a handler.", stats["in_flight"])
        yield self._gauge("requests_queued", "Requests waiting for a handler.", stats["queued"])
        if "workers" in stats:
            yield from self._workers(stats)

    def describe(self) -> list[Metric]:
        """Nothing: the registry then learns the names from :meth:`collect` when needed."""
        return []

    def _outcomes(self, stats: Mapping[str, Any]) -> Metric:
        from prometheus_client.metrics_core import CounterMetricFamily

        counter = CounterMetricFamily(
            f"{NAMESPACE}_requests", "Requests accepted, by outcome.", labels=["outcome"]
        )
        crashed = int(stats.get("crashed", 0))
        values = {
            "served": stats["served"],
            "failed": max(0, int(stats["failed"]) - crashed),
            "timed_out": stats["timed_out"],
            "crashed": crashed,
            "dropped": stats["dropped"],
        }
        for outcome in OUTCOMES:
            counter.add_metric([outcome], values[outcome])
        return counter

    def _durations(self, stats: Mapping[str, Any]) -> Metric:
        from prometheus_client.metrics_core import HistogramMetricFamily

        histogram = HistogramMetricFamily(
            f"{NAMESPACE}_request_duration_seconds",
            "Seconds from accepting a request to writing its reply, for the requests served.",
        )
        buckets = [(_bound(bound), count) for bound, count in stats["latency_histogram"]]
        histogram.add_metric([], buckets, sum_value=stats["latency_sum_s"])
        return histogram

    def _gauge(self, name: str, documentation: str, value: float) -> Metric:
        from prometheus_client.metrics_core import GaugeMetricFamily

        gauge = GaugeMetricFamily(f"{NAMESPACE}_{name}", documentation)
        gauge.add_metric([], value)
        return gauge

    def _workers(self, stats: Mapping[str, Any]) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        yield self._gauge("workers", "Worker processes serving.", stats["workers_alive"])
        rss = GaugeMetricFamily(
            f"{NAMESPACE}_worker_rss_bytes", "Resident memory of a worker.", labels=["worker"]
        )
        cpu = GaugeMetricFamily(
            f"{NAMESPACE}_worker_cpu_percent",
            "CPU use of a worker, in percent of one CPU, over its last sampling window.",
            labels=["worker"],
        )
        served = CounterMetricFamily(
            f"{NAMESPACE}_worker_requests_served",
            "Requests a worker answered.",
            labels=["worker"],
        )
        for worker in stats["workers"]:
            label = [str(worker["pid"])]
            rss.add_metric(label, worker["rss"])
            cpu.add_metric(label, worker["cpu_percent"])
            served.add_metric(label, worker["served"])
        yield from (rss, cpu, served)
        restarts = CounterMetricFamily(
            f"{NAMESPACE}_worker_restarts", "Workers replaced, by cause.", labels=["cause"]
        )
        for cause in RESTART_CAUSES:
            restarts.add_metric([cause], stats.get(f"restarts_{cause}", 0))
        yield restarts


def _bound(bound: float) -> str:
    """A bucket's upper bound as Prometheus writes it (``+Inf`` for the last)."""
    return "+Inf" if bound == float("inf") else repr(bound)


def server_registry(server: RequestServer) -> CollectorRegistry:
    """A registry of its own holding a :class:`ServerCollector` of ``server``.

    Raises:
        ImportError: prometheus-client is not installed.
    """
    collector = ServerCollector(server)
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def start_metrics_server(server: RequestServer, host: str, port: int) -> tuple[Any, int]:
    """Serve ``/metrics`` for ``server`` with prometheus-client's own HTTP server.

    Args:
        server: the server to report on.
        host: the address to listen at.
        port: the port; 0 picks a free one.

    Returns:
        The HTTP server (call its ``shutdown()`` and ``server_close()`` to
        stop it) and the port it listens at. It serves on a daemon thread.

    Raises:
        ImportError: prometheus-client is not installed.
        OSError: the address cannot be bound.
    """
    prometheus = _import_prometheus()
    http_server, _thread = prometheus.start_http_server(
        port, addr=host, registry=server_registry(server)
    )
    return http_server, int(http_server.server_port)
