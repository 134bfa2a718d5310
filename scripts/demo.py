"""Thread mode against process mode on a CPU-heavy handler, over real sockets.

Starts ``workers.primes:PrimeServer`` twice with the ``mpreqrep serve``
command line (once in thread mode, once with a loky process pool), fires the
same requests at each from concurrent clients, checks every reply, and
prints requests per second and the speed-up. Each server runs in its own
process, started and stopped (SIGINT, drained) by this script.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

import mpreqrep

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers.primes import DEFAULT_LIMIT, count_primes  # noqa: E402

SERVER_START_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 60.0
SERVING_LINE = re.compile(r"serving \S+ at (\S+:\d+)")


@dataclass
class Measurement:
    """What one run of requests against one server gave."""

    mode: str
    requests: int
    correct: int
    elapsed_s: float

    @property
    def requests_per_s(self) -> float:
        return self.correct / self.elapsed_s


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per mode (300)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (8)")
    parser.add_argument("--workers", default="auto", help="process-mode workers, N or auto")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="primes limit per request")
    return parser.parse_args(argv)


def start_server(extra: list[str]) -> tuple[subprocess.Popen[str], str]:
    """Run ``mpreqrep serve`` on an ephemeral port; return it and its address."""
    command = [sys.executable, "-m", "mpreqrep", "serve", "workers.primes:PrimeServer"]
    command += ["--address", "localhost:0", "--log-level", "warning", *extra]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        match = SERVING_LINE.search(line)
        if match:
            return process, match.group(1)
    process.kill()
    raise RuntimeError(f"server did not start: {' '.join(command)}")


def stop_server(process: subprocess.Popen[str]) -> None:
    """Ask the server to drain and exit, as Ctrl-C would."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=SERVER_START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def fire(address: str, args: argparse.Namespace, mode: str) -> Measurement:
    """Send the requests from concurrent clients; count the correct replies."""
    expected = f"{count_primes(args.limit)}\r\n"
    correct = 0
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.clients) as pool:
        futures = [
            pool.submit(mpreqrep.do_request, address, str(args.limit), REQUEST_TIMEOUT_S)
            for _ in range(args.requests)
        ]
        for future in tqdm(as_completed(futures), total=args.requests, desc=mode, unit="req"):
            correct += future.result() == expected
    return Measurement(mode, args.requests, correct, time.perf_counter() - started)


def measure(mode: str, extra: list[str], args: argparse.Namespace) -> Measurement:
    """Start a server, warm it up, fire the requests, stop it."""
    process, address = start_server(extra)
    try:
        mpreqrep.do_request(address, str(args.limit), REQUEST_TIMEOUT_S)
        return fire(address, args, mode)
    finally:
        stop_server(process)


def print_table(results: list[Measurement]) -> None:
    baseline = results[0].requests_per_s
    print()
    print(f"{'mode':<26} {'correct':>9} {'seconds':>8} {'requests/s':>11} {'speed-up':>9}")
    for result in results:
        print(
            f"{result.mode:<26} {result.correct:>4}/{result.requests:<4} "
            f"{result.elapsed_s:>8.2f} {result.requests_per_s:>11.1f} "
            f"{result.requests_per_s / baseline:>8.2f}x"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(
        f"PrimeServer: count primes up to {args.limit} per request "
        f"({args.requests} requests, {args.clients} concurrent clients, {os.cpu_count()} CPUs)"
    )
    results = [
        measure("thread mode", [], args),
        measure(f"process mode (workers={args.workers})", ["--workers", args.workers], args),
    ]
    print_table(results)
    return 0 if all(result.correct == result.requests for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
