"""Benchmark ``executor=``: what each executor costs per request, over loopback.

Two tables, in Markdown on stdout:

1. Throughput. For the echo and the CPU-heavy primes handler, closed-loop
   clients (one, then ``--clients``) drive a server in thread mode (the
   handler inline in the I/O thread, the baseline) and with each executor:
   a stdlib thread pool, a loky process pool and a Dask ``LocalCluster``
   (``--workers`` processes of one thread each). The overhead column is the
   extra time one sequential request takes compared with thread mode.
2. Delivery. Submit-and-wait calls straight to loky and Dask, with the
   server shipped with every call versus sent once per worker and named by
   a token (what mpreqrep does), for a bare server and one carrying
   ``--ballast-kib`` of data.

Every row is bounded in time (``--seconds``) and everything runs on this
machine. Run with the project's venv: ``.venv/bin/python scripts/bench_executors.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))  # the handlers live in workers/, beside mpreqrep/

import distributed  # noqa: E402
import loky  # noqa: E402

import mpreqrep  # noqa: E402
from mpreqrep._dispatch import run_handler  # noqa: E402
from mpreqrep._remote import CacheMiss, run_cached  # noqa: E402
from workers.echo import EchoServer  # noqa: E402
from workers.primes import DEFAULT_LIMIT, PrimeServer  # noqa: E402

HANDLERS: dict[str, tuple[type[mpreqrep.RequestServer], str]] = {
    "echo": (EchoServer, "hello"),
    "primes": (PrimeServer, str(DEFAULT_LIMIT)),
}
BASELINE = "thread mode"
REQUEST_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Settings:
    """What one run measures, from the command line."""

    workers: int
    clients: int
    seconds: float
    calls: int
    ballast_kib: int


def parse_args(argv: list[str] | None = None) -> Settings:
    """Read the command line (``--quick`` shortens every row)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="0.5 s per row, 30 calls")
    parser.add_argument("--workers", type=int, default=2, help="pool / cluster processes")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients, 2nd column")
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each row")
    parser.add_argument("--calls", type=int, default=200, help="calls per delivery row")
    parser.add_argument("--ballast-kib", type=int, default=1024, help="data the server carries")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.calls = 0.5, 30
    return Settings(args.workers, args.clients, args.seconds, args.calls, args.ballast_kib)


# -- throughput -------------------------------------------------------------------------


def closed_loop_rate(address: str, request: str, clients: int, seconds: float) -> float:
    """Requests per second that ``clients`` sequential clients get for ``seconds``."""
    deadline = time.monotonic() + seconds
    counts = [0] * clients
    failures = [0] * clients

    def client(index: int) -> None:
        while time.monotonic() < deadline:
            if mpreqrep.do_request(address, request, timeout=REQUEST_TIMEOUT_S):
                counts[index] += 1
            else:
                failures[index] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if sum(failures):
        raise RuntimeError(f"{sum(failures)} requests to {address} got no reply")
    return sum(counts) / (time.monotonic() - started)


def server_rates(
    handler: str, executor: Executor | None, settings: Settings
) -> tuple[float, float]:
    """Requests/s with one client and with ``settings.clients`` clients."""
    server_class, request = HANDLERS[handler]
    with server_class("127.0.0.1:0", executor=executor) as server:
        closed_loop_rate(server.address, request, settings.clients, settings.seconds / 4)
        return (
            closed_loop_rate(server.address, request, 1, settings.seconds),
            closed_loop_rate(server.address, request, settings.clients, settings.seconds),
        )


def throughput_table(executors: dict[str, Executor | None], settings: Settings) -> str:
    """The Markdown table of requests/s and per-request overhead."""
    lines = [
        f"| handler | executor | req/s, 1 client | req/s, {settings.clients} clients "
        "| overhead per request vs thread mode |",
        "|---|---|---:|---:|---:|",
    ]
    for handler in HANDLERS:
        baseline_s = 0.0
        for name, executor in executors.items():
            one, many = server_rates(handler, executor, settings)
            if name == BASELINE:
                baseline_s = 1 / one
            overhead = f"{(1 / one - baseline_s) * 1e6:+,.0f} µs" if name != BASELINE else "-"
            lines.append(f"| {handler} | {name} | {one:,.0f} | {many:,.0f} | {overhead} |")
    return "\n".join(lines)


# -- delivery ---------------------------------------------------------------------------


def mean_call_s(call: Callable[[], Any], calls: int) -> float:
    """Mean seconds of ``call()``, run ``calls`` times in a row."""
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls


def shipped_call(executor: Executor, server: EchoServer) -> Callable[[], Any]:
    """One request with the server pickled into it, as a naive dispatcher would."""
    return lambda: executor.submit(run_handler, server, "x").result(REQUEST_TIMEOUT_S)


def cached_call(executor: Executor, server: EchoServer, token: str) -> Callable[[], Any]:
    """One request naming the server by token, resent with it on a miss (mpreqrep's way)."""

    def call() -> Any:
        reply = executor.submit(run_cached, token, None, "x").result(REQUEST_TIMEOUT_S)
        if isinstance(reply, CacheMiss):
            reply = executor.submit(run_cached, token, server, "x").result(REQUEST_TIMEOUT_S)
        return reply

    return call


def delivery_row(name: str, executor: Executor, server: EchoServer, settings: Settings) -> str:
    """Per-call cost of shipping ``server`` every time versus once per worker."""
    token = uuid.uuid4().hex
    for future in [
        executor.submit(run_cached, token, server, "x") for _ in range(4 * settings.workers)
    ]:
        future.result(REQUEST_TIMEOUT_S)
    shipped = mean_call_s(shipped_call(executor, server), settings.calls)
    cached = mean_call_s(cached_call(executor, server, token), settings.calls)
    size = len(pickle.dumps(server))
    return (
        f"| {name} | {size:,} B | {shipped * 1e6:,.0f} µs | {cached * 1e6:,.0f} µs "
        f"| {(shipped - cached) * 1e6:,.0f} µs |"
    )


def delivery_table(executors: dict[str, Executor], settings: Settings) -> str:
    """The Markdown table comparing per-call delivery with once-per-worker delivery."""
    lines = [
        "| executor | pickled server | shipped with every call | once per worker "
        "| saved per call |",
        "|---|---:|---:|---:|---:|",
    ]
    for ballast in (0, settings.ballast_kib * 1024):
        with ballasted_echo(ballast) as server:
            lines.extend(delivery_row(name, ex, server, settings) for name, ex in executors.items())
    return "\n".join(lines)


@contextmanager
def ballasted_echo(size: int) -> Iterator[EchoServer]:
    """An echo server object carrying ``size`` random bytes, never started."""
    server = EchoServer("127.0.0.1:0")
    server.ballast = os.urandom(size)  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()
        server.run()  # stopped before serving: closes the listening socket and returns


# -- main -------------------------------------------------------------------------------


@contextmanager
def executors(settings: Settings) -> Iterator[dict[str, Executor]]:
    """The thread pool, loky pool and Dask cluster under test, shut down afterwards."""
    cluster = distributed.LocalCluster(
        n_workers=settings.workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    )
    client = distributed.Client(cluster, set_as_default=False)
    made: dict[str, Executor] = {
        f"ThreadPoolExecutor({settings.workers})": ThreadPoolExecutor(settings.workers),
        f"loky, {settings.workers} processes": loky.ProcessPoolExecutor(settings.workers),
        f"Dask LocalCluster, {settings.workers} processes": client.get_executor(pure=False),
    }
    try:
        yield made
    finally:
        for executor in made.values():
            executor.shutdown(wait=True)
        client.close()
        cluster.close()


def main(argv: list[str] | None = None) -> int:
    """Run both tables and print them."""
    settings = parse_args(argv)
    print(f"# executors: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {settings}\n")
    with executors(settings) as made:
        print(throughput_table({BASELINE: None, **made}, settings), end="\n\n")
        remote = {name: ex for name, ex in made.items() if "Thread" not in name}
        print(delivery_table(remote, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
