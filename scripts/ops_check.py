"""Measure process mode's operations (issue 13's "Done when" figures).

Each scenario runs ``mpreqrep serve workers.whoami:WhoAmIServer --workers 2``
under load from ``--clients`` client threads and prints one line of figures:

- ``hup``: SIGHUP: failed requests, whether every worker pid was replaced;
- ``ttin``: SIGTTIN: seconds until 3 workers answer; then SIGTTOU: seconds
  until 2 are left (both under 5 ms requests, see :data:`BUSY`);
- ``max-requests``: ``--max-requests 40 --max-requests-jitter 10`` over 600
  requests of an instant handler, then of a 5 ms one: failed requests,
  distinct worker pids (a replacement serves once it has started: about
  0.5 s on a busy 2-core machine, while the other worker serves alone);
- ``graceful``: ``--graceful-timeout 2`` with a 60 s request in flight,
  SIGTERM: seconds until the server exits, children left;
- ``metrics``: ``--metrics``: whether /metrics parses with prometheus-client's
  own parser, and its number of families.

Usage: ``python scripts/ops_check.py [--scenarios NAME ...] [--clients N]``
"""

from __future__ import annotations

import argparse
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil

import mpreqrep

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for tests.client_load

from tests.client_load import Load  # noqa: E402

TARGET = "workers.whoami:WhoAmIServer"
DEADLINE_S = 60.0


class Serve:
    """An ``mpreqrep serve`` child with its stdout lines queued."""

    def __init__(self, *options: str) -> None:
        argv = [sys.executable, "-m", "mpreqrep", "serve", TARGET, "--address", "127.0.0.1:0"]
        self.process = subprocess.Popen(
            [*argv, "--log-level", "WARNING", *options],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.address = self._line(r"mpreqrep: serving \S+ at (\S+)")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def _line(self, pattern: str) -> str:
        match = re.fullmatch(pattern, self.lines.get(timeout=DEADLINE_S).strip())
        assert match, pattern
        return match.group(1)

    def metrics_url(self) -> str:
        return self._line(r"mpreqrep: metrics at (\S+)")

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self) -> float:
        """SIGTERM; seconds until it exited."""
        started = time.monotonic()
        self.signal(signal.SIGTERM)
        self.process.wait(timeout=DEADLINE_S)
        return time.monotonic() - started


def wait_for(predicate: Callable[[], bool], timeout_s: float = DEADLINE_S) -> float | None:
    """Seconds until ``predicate`` held, ``None`` if it did not within ``timeout_s``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.01)
    return None


BUSY = "0.005"
"""The request of the hup and ttin loads: a 5 ms handler, which process mode spreads
over every worker (an instant one's requests are packed on one, so the others would
not show in the replies)."""


def hup(clients: int) -> str:
    serve = Serve("--workers", "2")
    load = Load(serve.address, clients, text=BUSY)
    wait_for(lambda: len(load.replies) >= 100)
    old = load.pids(0.0)
    sent = time.monotonic()
    serve.signal(signal.SIGHUP)

    def replaced() -> bool:
        recent = load.pids(time.monotonic() - 0.5)
        return time.monotonic() - sent > 0.5 and len(recent) == 2 and not recent & old

    took = wait_for(replaced, 30)
    after = load.pids(time.monotonic() - 0.5)
    load.finish()
    serve.stop()
    return (
        f"hup: {len(load.replies)} requests, failed={load.failures()}, old pids={sorted(old)}, "
        f"pids answering after={sorted(after)}, every pid replaced={took is not None} "
        f"(within {took and round(took, 2)} s)"
    )


def ttin(clients: int) -> str:
    serve = Serve("--workers", "2")
    load = Load(serve.address, clients, text=BUSY)
    wait_for(lambda: len(load.replies) >= 50)
    sent = time.monotonic()
    serve.signal(signal.SIGTTIN)
    three = wait_for(lambda: len(load.pids(sent)) >= 3, 30)
    sent = time.monotonic()
    serve.signal(signal.SIGTTOU)

    def two_left() -> bool:
        now = time.monotonic()
        return len(load.pids(now - 0.5)) == 2 and now - sent > 0.5

    two = wait_for(two_left, 30)
    load.finish()
    serve.stop()
    return (
        f"ttin: 3 workers answering after {three and round(three, 2)} s; ttou: 2 answering "
        f"after {two and round(two, 2)} s; failed={load.failures()} of {len(load.replies)}"
    )


def max_requests(clients: int) -> str:
    figures = []
    for text, handler in (("", "an instant handler"), ("0.005", "a 5 ms handler")):
        serve = Serve("--workers", "2", "--max-requests", "40", "--max-requests-jitter", "10")
        load = Load(serve.address, clients, limit=600 // clients, text=text)
        load.wait()
        serve.stop()
        figures.append(
            f"{handler}: {len(load.replies)} requests, failed={load.failures()}, "
            f"distinct worker pids={len(load.pids(0.0))}"
        )
    return "max-requests 40 jitter 10: " + "; ".join(figures)


def graceful(clients: int) -> str:
    serve = Serve("--workers", "2", "--graceful-timeout", "2")
    held: list[str | None] = []
    thread = threading.Thread(target=lambda: held.append(mpreqrep.do_request(serve.address, "60")))
    thread.start()
    load = Load(serve.address, clients - 1)
    wait_for(lambda: len(load.replies) >= 50)
    family = serve.descendants()
    names = {p.pid: p.name() for p in family}
    load.finish()
    exited = serve.stop()
    thread.join(DEADLINE_S)
    at_exit = [p.pid for p in family if _alive(p)]
    gone = wait_for(lambda: not any(_alive(p) for p in family), 10)
    return (
        f"graceful-timeout 2, a 60 s request in flight: exit after {exited:.2f} s, "
        f"code {serve.process.returncode}, its reply {held!r}, descendants alive at exit: "
        f"{[(pid, names[pid]) for pid in at_exit]}, "
        f"none left {gone and round(gone, 2)} s later"
    )


def _alive(process: psutil.Process) -> bool:
    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def metrics(clients: int) -> str:
    from prometheus_client.parser import text_string_to_metric_families

    serve = Serve("--workers", "2", "--metrics", "127.0.0.1:0")
    url = serve.metrics_url()
    load = Load(serve.address, clients, limit=25)
    load.wait()
    with urllib.request.urlopen(url, timeout=DEADLINE_S) as response:
        text = response.read().decode()
    families = list(text_string_to_metric_families(text))
    serve.stop()
    served = [s.value for f in families for s in f.samples if s.labels.get("outcome") == "served"]
    return (
        f"metrics: {url} parsed by prometheus_client.parser: {len(families)} families, "
        f"served={served}"
    )


SCENARIOS = {
    "hup": hup,
    "ttin": ttin,
    "max-requests": max_requests,
    "graceful": graceful,
    "metrics": metrics,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    for name in args.scenarios:
        print(SCENARIOS[name](args.clients), flush=True)


if __name__ == "__main__":
    main()
