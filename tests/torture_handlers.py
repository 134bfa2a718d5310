"""The server side of the torture suite (``scripts/torture.py``).

Holds :class:`TortureServer`, a module-level handler class (so that it pickles
for loky workers), the rule that says what its reply to a request must be,
and :func:`main`, which serves it in a child process driven by the harness::

    harness (scripts/torture.py)          server child (this module's main)
    ────────────────────────────          ─────────────────────────────────
    spawn with a JSON options line ─────▶ bind 127.0.0.1:0, start serving
                      {"port", "pid"} ◀── one JSON line on stdout
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
        anything else: just the echo.

    The reply is ``"<pid> <request without its CRLF>"``, see :func:`expected_reply`.
    """

    def handle_request(self, request: str) -> str:
        """Run the request's misbehaviour, if any, then echo it after the pid."""
        text = request.removesuffix(CRLF)
        command, _, argument = text.partition(" ")
        if command == "work":
            _burn_cpu(float(argument.partition(" ")[0]) / 1000)
        elif command == "spin":
            _spin_until_released()
        elif command == "leak":
            _LEAKED.append(b"\x01" * (int(argument) * MIB))
        return f"{os.getpid()} {text}"


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
        argv: one JSON object: keyword arguments for the server.

    Returns:
        0 once stopped; 1 if the server did not stop in time.
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    server = TortureServer("127.0.0.1:0", **json.loads(argv[0]))
    server.start()
    _write_line({"port": server.port, "pid": os.getpid()})
    sys.stdin.readline()  # "stop", or EOF if the harness is gone
    _RELEASED.set()
    server.stop()
    server.join(STOP_TIMEOUT_S)
    _write_line({**server.stats(), "stopped": not server.is_alive()})
    return 1 if server.is_alive() else 0
