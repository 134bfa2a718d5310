"""Benchmark ``executor=``: what each executor costs per request, over loopback.

Two tables, in Markdown on stdout:

1. Throughput. For the echo and the CPU-heavy primes handler, closed-loop
   clients (one, then ``--clients``) drive a server in thread mode (the
   handler inline in the I/O thread, the baseline) and with each executor:
   a stdlib thread pool, loky and stdlib process pools built by the server
   from a factory, and a Dask ``LocalCluster`` (``--workers`` processes of
   one thread each). The overhead column is the extra time one sequential
   request takes compared with thread mode.
2. Delivery. Echo servers on the process pools and Dask, one bare and one
   carrying ``--ballast-kib`` of data: the time per sequential request after
   a warm-up, the difference (what each request pays for the bigger server:
   nothing if the server reached each worker once), and the copies the
   workers report in all, beside what a call that shipped the server every
   time pays for the same difference.

Every row is bounded in time (``--seconds``) and everything runs on this
machine. Run with the project's venv: ``.venv/bin/python scripts/bench_executors.py``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import multiprocessing
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
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


ExecutorOption = Executor | Callable[[], Executor] | None


def server_rates(handler: str, executor: ExecutorOption, settings: Settings) -> tuple[float, float]:
    """Requests/s with one client and with ``settings.clients`` clients."""
    server_class, request = HANDLERS[handler]
    with server_class("127.0.0.1:0", executor=executor) as server:
        closed_loop_rate(server.address, request, settings.clients, settings.seconds / 4)
        return (
            closed_loop_rate(server.address, request, 1, settings.seconds),
            closed_loop_rate(server.address, request, settings.clients, settings.seconds),
        )


def throughput_table(executors: dict[str, ExecutorOption], settings: Settings) -> str:
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


def served_request_s(
    factory: Callable[[], Executor], ballast: int, settings: Settings
) -> tuple[float, int]:
    """Seconds per sequential request to an echo server carrying ``ballast`` bytes,
    after a warm-up, and the server copies its workers report at the end."""
    server = EchoServer("127.0.0.1:0", executor=factory)
    server.ballast = os.urandom(ballast)  # type: ignore[attr-defined]
    with server:
        closed_loop_rate(server.address, "x", settings.clients, settings.seconds / 4)
        rate = closed_loop_rate(server.address, "x", 1, settings.seconds)
        copies: int = server.stats()["server_copies_sent"]
    return 1 / rate, copies


def shipped_call_s(factory: Callable[[], Executor], ballast: int, settings: Settings) -> float:
    """Seconds per call that ships a server carrying ``ballast`` bytes with it."""
    server = EchoServer("127.0.0.1:0")
    server.ballast = os.urandom(ballast)  # type: ignore[attr-defined]
    executor = factory()
    try:
        call = functools.partial(executor.submit, run_handler, server, "x")
        mean_call_s(lambda: call().result(REQUEST_TIMEOUT_S), settings.calls // 4)
        return mean_call_s(lambda: call().result(REQUEST_TIMEOUT_S), settings.calls)
    finally:
        executor.shutdown(wait=True)
        server.stop()
        server.run()  # stopped before serving: closes the listening socket and returns


def delivery_row(name: str, factory: Callable[[], Executor], settings: Settings) -> str:
    """Per-request cost of a bigger server through mpreqrep, and shipped every call."""
    ballast = settings.ballast_kib * 1024
    bare_s, bare_copies = served_request_s(factory, 0, settings)
    big_s, big_copies = served_request_s(factory, ballast, settings)
    shipped = shipped_call_s(factory, ballast, settings) - shipped_call_s(factory, 0, settings)
    size = len(pickle.dumps(os.urandom(ballast)))
    return (
        f"| {name} | {size:,} B | {bare_s * 1e6:,.0f} µs | {big_s * 1e6:,.0f} µs "
        f"| {(big_s - bare_s) * 1e6:+,.0f} µs | {bare_copies} / {big_copies} "
        f"| {shipped * 1e6:+,.0f} µs |"
    )


def delivery_table(factories: dict[str, Callable[[], Executor]], settings: Settings) -> str:
    """The Markdown table of what a bigger server costs per request after warm-up."""
    lines = [
        "| executor | ballast pickled | per request, bare server | per request, with ballast "
        "| difference | copies in all (bare / ballast) | difference if shipped every call |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines.extend(delivery_row(name, factory, settings) for name, factory in factories.items())
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------


@contextmanager
def executors(settings: Settings) -> Iterator[dict[str, ExecutorOption]]:
    """The thread pool, the process pool factories and a Dask cluster's, closed afterwards."""
    cluster = distributed.LocalCluster(
        n_workers=settings.workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    )
    spawn = multiprocessing.get_context("spawn")
    threads = ThreadPoolExecutor(settings.workers)
    made: dict[str, ExecutorOption] = {
        f"ThreadPoolExecutor({settings.workers})": threads,
        f"loky, {settings.workers} processes": functools.partial(
            loky.ProcessPoolExecutor, settings.workers
        ),
        f"stdlib ProcessPoolExecutor, {settings.workers} processes": functools.partial(
            ProcessPoolExecutor, settings.workers, mp_context=spawn
        ),
        f"Dask LocalCluster, {settings.workers} processes": functools.partial(
            mpreqrep.dask_executor, cluster.scheduler_address
        ),
    }
    try:
        yield made
    finally:
        threads.shutdown(wait=True)
        cluster.close()


def main(argv: list[str] | None = None) -> int:
    """Run both tables and print them."""
    settings = parse_args(argv)
    print(f"# executors: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {settings}\n")
    with executors(settings) as made:
        print(throughput_table({BASELINE: None, **made}, settings), end="\n\n")
        remote = {name: ex for name, ex in made.items() if callable(ex)}
        print(delivery_table(remote, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
