"""Measure process mode's faults, one worker at a time (issue 15's "Done when" figures).

Scenarios, each printed as one line of figures:

- ``crash``: 2 workers whose handler takes ``--load-s`` to load, 8 clients
  sending 20 ms requests, one request that calls ``os._exit``: replies in
  every 250 ms window after the crash, requests lost, requests run twice
  (a side-effect ledger counts runs);
- ``kills``: three random SIGKILLs of workers under load: requests run
  twice, requests without a reply;
- ``sigkill-serve``: SIGKILL of ``mpreqrep serve --workers 2`` (one worker
  busy in a handler): seconds until no descendant is left, socket
  directory left behind;
- ``heal``: replacement workers fail to load for ``--fail-s``, then can:
  seconds from then until every worker serves again.

Usage: ``python scripts/pool_faults.py [--scenarios NAME ...]``
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psutil

import mpreqrep

WINDOW_S = 0.25
CLIENTS = 8
SETTLE_TIMEOUT_S = 30.0


class LedgerServer(mpreqrep.RequestServer):
    """``tag ms`` appends ``tag`` to a ledger, then sleeps ``ms``; ``tag exit``
    kills the worker. Loading a copy in a worker takes ``load_s``, and fails
    while the file ``broken`` exists."""

    def __init__(self, address: str, ledger: str, load_s: float, broken: str, **options: object):
        super().__init__(address, **options)  # type: ignore[arg-type]
        self.ledger, self.load_s, self.broken = ledger, load_s, broken
        self.parent_pid = os.getpid()

    def __setstate__(self, state: dict[str, object]) -> None:
        super().__setstate__(state)
        if os.getpid() != self.parent_pid:
            if os.path.exists(self.broken):
                raise ImportError("the handler's module cannot be imported right now")
            time.sleep(self.load_s)

    def handle_request(self, request: str) -> str:
        tag, _, command = request.strip().partition(" ")
        with open(self.ledger, "a") as ledger:
            ledger.write(tag + "\n")
        if command == "exit":
            os._exit(1)
        time.sleep(int(command) / 1000)
        return f"done {tag}"


def run_clients(
    address: str, duration_s: float, ms: int, poison_after_s: float | None = None
) -> tuple[list[tuple[float, str, str | None]], float | None]:
    """8 clients in a loop for ``duration_s``; client 0 may send one poison."""
    replies: list[tuple[float, str, str | None]] = []
    poisoned: list[float] = []
    started = time.monotonic()

    def client(index: int) -> None:
        count = 0
        while time.monotonic() - started < duration_s:
            tag = f"c{index}.{count}"
            count += 1
            request = f"{tag} {ms}"
            due = poison_after_s is not None and time.monotonic() - started >= poison_after_s
            if index == 0 and due and not poisoned:
                tag, request = "poison", "poison exit"
                poisoned.append(time.monotonic())
            reply = mpreqrep.do_request(address, request, SETTLE_TIMEOUT_S)
            replies.append((time.monotonic(), tag, reply))

    threads = [threading.Thread(target=client, args=(index,)) for index in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return replies, (poisoned[0] if poisoned else None)


def ledger_duplicates(ledger: Path) -> int:
    """Requests that ran more than once."""
    runs = Counter(ledger.read_text().split()) if ledger.exists() else Counter()
    return sum(1 for count in runs.values() if count > 1)


def scenario_crash(folder: Path, args: argparse.Namespace) -> str:
    """One os._exit among 8 clients' 20 ms requests, 2 workers loading slowly."""
    ledger = folder / "crash.ledger"
    server = LedgerServer("127.0.0.1:0", str(ledger), args.load_s, str(folder / "never"), workers=2)
    with server:
        replies, crash_at = run_clients(server.address, 0.5 + args.load_s + 1.5, 20, 0.5)
    assert crash_at is not None
    lost = [tag for _, tag, reply in replies if tag != "poison" and reply != f"done {tag}\r\n"]
    good = [at for at, tag, reply in replies if tag != "poison" and reply == f"done {tag}\r\n"]
    end = max(at for at, _, _ in replies)
    windows = Counter(int((at - crash_at) // WINDOW_S) for at in good if at >= crash_at)
    count = int((end - crash_at) // WINDOW_S)
    per_window = [windows[index] for index in range(count)]
    return (
        f"crash: {count} windows of {WINDOW_S * 1000:.0f} ms after the crash, "
        f"replies per window min {min(per_window)} max {max(per_window)}, "
        f"empty windows {per_window.count(0)}; lost besides the poison {len(lost)}; "
        f"ran twice {ledger_duplicates(ledger)}; {len(replies)} requests"
    )


def scenario_kills(folder: Path, args: argparse.Namespace) -> str:
    """Three random SIGKILLs of workers under load."""
    ledger = folder / "kills.ledger"
    rng = random.Random(args.seed)
    server = LedgerServer("127.0.0.1:0", str(ledger), 0.0, str(folder / "never"), workers=2)
    with server:
        killer = threading.Thread(target=kill_three, args=(server, rng))
        killer.start()
        replies, _ = run_clients(server.address, 4.0, 5)
        killer.join()
        restarts = server.stats()["restarts_crashed"]
    empty = [tag for _, tag, reply in replies if reply != f"done {tag}\r\n"]
    return (
        f"kills: 3 SIGKILLs ({restarts} workers replaced), {len(replies)} requests, "
        f"without a reply {len(empty)}, ran twice {ledger_duplicates(ledger)}"
    )


def kill_three(server: mpreqrep.RequestServer, rng: random.Random) -> None:
    """SIGKILL a random worker three times, at random moments."""
    for _ in range(3):
        time.sleep(rng.uniform(0.5, 1.0))
        pids = [worker["pid"] for worker in server.stats()["workers"]]
        os.kill(rng.choice(pids), signal.SIGKILL)
        wait_for(lambda: server.stats()["workers_alive"] == 2, SETTLE_TIMEOUT_S)


def scenario_sigkill_serve(folder: Path, args: argparse.Namespace) -> str:
    """SIGKILL of ``mpreqrep serve --workers 2`` while a worker runs a handler."""
    command = [sys.executable, "-m", "mpreqrep", "serve", "workers.slow_io:SlowIOServer"]
    command += ["--workers", "2", "--address", "127.0.0.1:0"]
    serve = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert serve.stderr is not None
    port = int(re.findall(r":(\d+)", serve.stderr.readline())[-1])
    threading.Thread(
        target=mpreqrep.do_request, args=(f"127.0.0.1:{port}", "30", 5.0), daemon=True
    ).start()
    time.sleep(0.3)
    family = psutil.Process(serve.pid).children(recursive=True)
    directories = {
        os.path.dirname(conn.laddr)
        for conn in psutil.Process(serve.pid).net_connections(kind="unix")
        if conn.laddr
    }
    serve.kill()
    serve.wait()
    killed_at = time.monotonic()
    wait_for(lambda: not any(map(alive, family)), 10.0)
    gone_s = time.monotonic() - killed_at
    left = [directory for directory in directories if os.path.exists(directory)]
    return (
        f"sigkill-serve: {len(family)} descendants, none alive {gone_s:.3f} s after the "
        f"SIGKILL; socket directories left {len(left)}"
    )


def scenario_heal(folder: Path, args: argparse.Namespace) -> str:
    """Replacement starts fail for ``--fail-s``, then can succeed."""
    broken = folder / "broken"
    server = LedgerServer("127.0.0.1:0", str(folder / "heal.ledger"), 0.0, str(broken), workers=2)
    with server:
        broken.touch()
        mpreqrep.do_request(server.address, "poison exit", SETTLE_TIMEOUT_S)
        time.sleep(args.fail_s)
        failures = server.stats()["start_failures"]
        broken.unlink()
        fixed_at = time.monotonic()
        healed = wait_for(lambda: server.stats()["workers_alive"] == 2, SETTLE_TIMEOUT_S)
        healed_s = time.monotonic() - fixed_at
        reply = mpreqrep.do_request(server.address, "after 1", SETTLE_TIMEOUT_S)
    return (
        f"heal: {failures} failed starts in {args.fail_s} s; 2 workers serving again "
        f"{healed_s:.2f} s after the cause went away ({'yes' if healed else 'NO'}); "
        f"then {reply!r}"
    )


def alive(process: psutil.Process) -> bool:
    """Whether a process runs (a zombie does not)."""
    try:
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``predicate`` every 10 ms until true or ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


SCENARIOS = {
    "crash": scenario_crash,
    "kills": scenario_kills,
    "sigkill-serve": scenario_sigkill_serve,
    "heal": scenario_heal,
}


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios asked for and print one line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--load-s", type=float, default=1.5, help="handler load time (crash)")
    parser.add_argument("--fail-s", type=float, default=3.0, help="how long starts fail (heal)")
    parser.add_argument("--seed", type=int, default=15, help="random seed (kills)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        for name in args.scenarios:
            print(SCENARIOS[name](Path(folder), args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
