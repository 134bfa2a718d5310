"""The server side of the torture suite (``scripts/torture.py``).

Holds :class:`TortureServer`, a module-level handler class (so that it pickles
for loky workers), the rule that says what its reply to a request must be,
and :func:`main`, which serves it in a child process driven by the harness::

    harness (scripts/torture.py)          server child (this module's main)
    ────────────────────────────          ─────────────────────────────────
    spawn with a JSON options line ─────▶ bind 127.0.0.1:0, start serving
                      {"port", "pid"} ◀── one JSON line on stdout
    "misuse" (any number of times) ─────▶ misuse the life cycle (see misuse())
                   {"misuse": {...}}  ◀── one JSON line: what each misuse raised
    "stop" (or EOF) ────────────────────▶ release spinners, stop, join
                      server.stats()  ◀── one JSON line, then exit

Running the server in its own process keeps the harness's client threads off
its GIL and lets the harness measure it (RSS, descriptors, threads, child
processes) and kill its workers with psutil.

Every reply carries the pid of the process that ran the handler, so the
harness can tell which worker served a request and which workers it may kill.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import mpreqrep

CRLF = "\r\n"
MIB = 1 << 20
STOP_TIMEOUT_S = 60.0

# Set when the server is told to stop, so that spinning handler threads
# (thread mode cannot kill them) let the child process exit. Worker
# processes never see it set: there the request timeout kills the spinner.
_RELEASED = threading.Event()
_LEAKED: list[bytes] = []


class TortureServer(mpreqrep.RequestServer):
    """Echoes each request after its pid; some requests misbehave first.

    Requests (without their CRLF):
        ``work <ms> <tag>``: burn the CPU for ``ms`` milliseconds.
        ``spin``: loop without end (until the child is told to stop).
        ``leak <mib>``: keep ``mib`` MiB of touched memory for good.
        ``big <bytes>``: reply ``"<pid> "`` and that many ``b``.
        ``fault <kind>``: commit one of :data:`FAULTS`.
        anything else: just the echo.

    The reply is ``"<pid> <request without its CRLF>"``, see :func:`expected_reply`.
    """

    def handle_request(self, request: str) -> str:
        """Run the request's misbehaviour, if any, then echo it after the pid."""
        text = request.removesuffix(CRLF)
        command, _, argument = text.partition(" ")
        if command == "big":
            return f"{os.getpid()} " + "b" * int(argument)
        if command == "fault":
            return FAULTS[argument](f"{os.getpid()} {text}")
        if command == "work":
            _burn_cpu(float(argument.partition(" ")[0]) / 1000)
        elif command == "spin":
            _spin_until_released()
        elif command == "leak":
            _LEAKED.append(b"\x01" * (int(argument) * MIB))
        return f"{os.getpid()} {text}"


class HostileStr(str):
    """A reply whose own methods misbehave: none of them may run on the I/O thread."""

    def encode(self, *args: Any, **kwargs: Any) -> bytes:
        raise SystemExit("encode() of a str subclass ran on the I/O thread")

    def endswith(self, *args: Any, **kwargs: Any) -> bool:
        raise SystemExit("endswith() of a str subclass ran on the I/O thread")


class HostileBaseError(BaseException):
    """A BaseException of the handler's own."""


def _exit(echo: str) -> str:
    raise SystemExit(3)


def _interrupt(echo: str) -> str:
    raise KeyboardInterrupt


def _base(echo: str) -> str:
    raise HostileBaseError(echo)


def _raise(echo: str) -> str:
    raise RuntimeError(echo)


def _surrogate(echo: str) -> str:
    return echo + " \udcff"  # what os.fsdecode makes of a non-UTF-8 file name


def _bytes(echo: str) -> str:
    return echo.encode()  # type: ignore[return-value]


# The faults a handler can commit (``fault <kind>``), from the echo it owes.
# Each costs its client the reply (""), except a str subclass: a valid reply.
FAULTS: dict[str, Callable[[str], str]] = {
    "SystemExit": _exit,
    "KeyboardInterrupt": _interrupt,
    "BaseException": _base,
    "RuntimeError": _raise,
    "unencodable": _surrogate,
    "bytes": _bytes,
    "str-subclass": HostileStr,
}
ANSWERED_FAULTS = frozenset({"str-subclass"})


class _Unpicklable(TortureServer):
    """Holds a lock, so its process workers cannot get a copy: start() fails."""

    def __init__(self, address: str, **options: Any) -> None:
        super().__init__(address, **options)
        self.lock = threading.Lock()


def _outcome(call: Callable[[], object]) -> str:
    """``"ok"``, or the name of the exception ``call`` raised."""
    try:
        call()
    except Exception as exc:
        return type(exc).__name__
    return "ok"


def misuse(server: mpreqrep.RequestServer, options: dict[str, Any]) -> dict[str, str]:
    """Misuse the life cycle of a serving ``server`` (and of fresh ones beside it).

    Returns:
        What each misuse raised, by name (see ``LIFECYCLE_EXPECTED`` in the
        harness); a failed ``start()`` is followed by a client, which must
        get ``NoServerError`` within a second.
    """
    results = {
        "second start()": _outcome(server.start),
        "run() while serving": _outcome(server.run),
        "second server on the port": _outcome(lambda: TortureServer(server.address)),
        "stats() from another thread": _outcome(server.stats),
    }
    stopped = TortureServer("127.0.0.1:0")
    stopped.stop()
    stopped.run()  # stop() before run(): returns at once
    results["start() after run() returned"] = _outcome(stopped.start)
    if "workers" in options:
        failed = _Unpicklable("127.0.0.1:0", **options)
        results["start() that fails"] = _outcome(failed.start)
        started = time.monotonic()
        outcome = _outcome(lambda: mpreqrep.do_request(failed.address, "x", 10))
        late = time.monotonic() - started > 1.0
        results["client after a failed start()"] = f"{outcome}{' (late)' if late else ''}"
    return results


def _burn_cpu(seconds: float) -> None:
    """Keep the CPU busy (no sleeping) for ``seconds``."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


def _spin_until_released() -> None:
    """``while True: pass``, except that the serving child can end it on stop."""
    while not _RELEASED.is_set():
        pass


def expected_reply(received: str, pid: int) -> str:
    """The reply a client reads when process ``pid`` handled ``received``.

    Args:
        received: the request text as the server decoded it (CRLF kept).
        pid: the process that ran the handler.

    Returns:
        The reply up to its first CRLF, as a client reads it (SPEC section 1):
        a request whose invalid bytes were dropped between ``\\r`` and ``\\n``
        can hold a CRLF before its end, and the reply is cut there.
    """
    wire = f"{pid} {received.removesuffix(CRLF)}"
    if not wire.endswith(CRLF):
        wire += CRLF
    return wire[: wire.index(CRLF) + len(CRLF)]


def reply_pid(received: str, reply: str | None) -> int | None:
    """The pid in ``reply`` if it is the right reply to ``received``, else ``None``."""
    if not reply:
        return None
    head = reply.partition(" ")[0]
    if not head.isdigit():
        return None
    pid = int(head)
    return pid if reply == expected_reply(received, pid) else None


def _write_line(payload: dict[str, Any]) -> None:
    """One JSON line to the harness."""
    sys.stdout.write(json.dumps(payload, default=str) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    """Serve a :class:`TortureServer` until the harness says stop.

    Args:
        argv: one JSON object: keyword arguments for the server, where
            ``"executor": "loky"`` stands for a loky pool of two workers.

    Returns:
        0 once stopped; 1 if the server did not stop in time.
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    options = json.loads(argv[0])
    executor = _make_executor(options.pop("executor", None))
    server = TortureServer("127.0.0.1:0", executor=executor, **options)
    server.start()
    _write_line({"port": server.port, "pid": os.getpid()})
    for line in sys.stdin:  # "misuse" any number of times; then "stop", or EOF
        if line.strip() != "misuse":
            break
        _write_line({"misuse": misuse(server, options)})
    _RELEASED.set()
    server.stop()
    server.join(STOP_TIMEOUT_S)
    _write_line({**server.stats(), "stopped": not server.is_alive()})
    if executor is not None:
        executor.shutdown(wait=False)
    return 1 if server.is_alive() else 0


def _make_executor(kind: str | None) -> Executor | None:
    """The executor an options line names: ``None``, or ``"loky"``."""
    if kind is None:
        return None
    import loky

    pool: Executor = loky.ProcessPoolExecutor(max_workers=2)
    return pool
