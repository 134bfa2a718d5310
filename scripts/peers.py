"""The servers the benchmark measures, each run in a process of its own.

Every peer binds 127.0.0.1 on an ephemeral port and serves one of the
:data:`HANDLERS` until it is terminated. :class:`PeerProcess` starts one as a
subprocess, learns its port through an inherited pipe, measures the CPU time
of its whole process tree and ends it by pid::

    bench.py ── PeerProcess.start ──▶ python -c "peers.main()" --server S --handler H
        ▲                                  │ binds 127.0.0.1:0
        └──────── port number ◀── pipe ────┘ then serves until SIGTERM

Adding a server is one entry in :data:`PEERS`. The CPU handler is
``workers.primes.count_primes``, shared with the examples.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import select
import socket
import socketserver
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, cast

import psutil

SCRIPTS_DIR = Path(__file__).resolve().parent
REPO_DIR = SCRIPTS_DIR.parent
sys.path.insert(0, str(REPO_DIR))  # the handlers live in workers/, beside mpreqrep/
import mpreqrep  # noqa: E402
from workers.primes import DEFAULT_LIMIT, count_primes, parse_limit  # noqa: E402

_PYZO_SPEC = importlib.util.find_spec("pyzo")
assert _PYZO_SPEC is not None and _PYZO_SPEC.submodule_search_locations, "pyzo is not installed"
sys.path.insert(0, _PYZO_SPEC.submodule_search_locations[0])  # yoton ships inside pyzo
import yoton  # noqa: E402

HOST = "127.0.0.1"
CRLF = b"\r\n"
RECV_CHUNK_SIZE = 65536
BACKLOG = 128  # socketserver's request_queue_size, for a fair comparison
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
PROBE_RETRY_S = 0.05


# -- handlers -----------------------------------------------------------------------------


def echo(request: str) -> str:
    """yoton's default reply."""
    return "Requested: " + request


def primes(request: str) -> str:
    """About 10 ms of CPU at the default limit: the number of primes up to the limit."""
    return str(count_primes(parse_limit(request)))


@dataclass(frozen=True)
class Handler:
    """A request handler and the request the benchmark sends it."""

    handle: Callable[[str], str]
    request: str

    def expected_reply(self) -> str:
        """The reply a correct server sends, CRLF included."""
        reply = self.handle(self.request + "\r\n")
        return reply if reply.endswith("\r\n") else reply + "\r\n"


HANDLERS: dict[str, Handler] = {
    "echo": Handler(echo, "hello"),
    "primes": Handler(primes, str(DEFAULT_LIMIT)),
}


# -- the servers --------------------------------------------------------------------------


class Serving(NamedTuple):
    """A bound server: its port, and the call that serves until the process ends."""

    port: int
    serve: Callable[[], object]


class YotonPeer(yoton.RequestServer):
    """yoton's own server (listen(1), 10 ms polling) with a benchmark handler."""

    def __init__(self, handler_name: str, *, async_val: bool) -> None:
        super().__init__(f"{HOST}:0", async_val=async_val)
        self.handler_name = handler_name

    def handle_request(self, request: str) -> str:
        """Reply with the benchmark handler."""
        return HANDLERS[self.handler_name].handle(request)


class MpreqrepPeer(mpreqrep.RequestServer):
    """mpreqrep's server with a benchmark handler; module-level so workers unpickle it."""

    def __init__(self, handler_name: str, **options: Any) -> None:
        super().__init__(f"{HOST}:0", **options)
        self.handler_name = handler_name

    def handle_request(self, request: str) -> str:
        """Reply with the benchmark handler."""
        return HANDLERS[self.handler_name].handle(request)


class LineRequestHandler(socketserver.BaseRequestHandler):
    """Serves one connection the yoton way: read to CRLF or EOF, reply, close."""

    server: LinePeerMixin

    def handle(self) -> None:
        """Read the request, reply; socketserver then shuts down and closes."""
        request = _read_request(self.request)
        reply = HANDLERS[self.server.handler_name].handle(request)
        self.request.sendall(_encode(reply))


class LinePeerMixin:
    """Settings shared by the socketserver peers."""

    request_queue_size = BACKLOG
    allow_reuse_address = True
    daemon_threads = True
    handler_name = "echo"


class ThreadingPeer(LinePeerMixin, socketserver.ThreadingTCPServer):
    """socketserver's thread-per-connection server."""


class ForkingPeer(LinePeerMixin, socketserver.ForkingTCPServer):
    """socketserver's fork-per-connection server."""


def _read_request(sock: socket.socket) -> str:
    """Read up to the first CRLF (kept) or EOF; decode as yoton does."""
    data = b""
    while (end := data.find(CRLF)) < 0:
        chunk = sock.recv(RECV_CHUNK_SIZE)
        if not chunk:
            return data.decode("utf-8", "ignore")
        data += chunk
    return data[: end + len(CRLF)].decode("utf-8", "ignore")


def _encode(text: str) -> bytes:
    return (text if text.endswith("\r\n") else text + "\r\n").encode()


def start_yoton(handler_name: str, *, async_val: bool) -> Serving:
    """yoton's RequestServer; it only listens once ``run`` has begun."""
    server = YotonPeer(handler_name, async_val=async_val)
    return Serving(server._bsd_socket.getsockname()[1], server.run)  # yoton has no port API


def start_socketserver(server_class: type[socketserver.TCPServer], handler_name: str) -> Serving:
    """A socketserver TCP server with :class:`LineRequestHandler`."""
    server = server_class((HOST, 0), LineRequestHandler)
    server.handler_name = handler_name  # type: ignore[attr-defined]
    return Serving(server.server_address[1], server.serve_forever)


def start_mpreqrep(
    handler_name: str, make_executor: Callable[[], Executor] | None = None, **options: Any
) -> Serving:
    """mpreqrep's RequestServer in the mode ``options`` select.

    Args:
        handler_name: a key of :data:`HANDLERS`.
        make_executor: builds the ``executor=`` to serve with, in the peer
            process, e.g. ``partial(loky.get_reusable_executor, 2)``.
        options: ``RequestServer`` keywords such as ``workers=2``.
    """
    if make_executor is not None:
        options["executor"] = make_executor()
    server = MpreqrepPeer(handler_name, **options)
    return Serving(server.port, server.run)


class UvloopProtocol(asyncio.Protocol):
    """The calibration peer's connection: reply at the first CRLF or at EOF."""

    def __init__(self, handler_name: str) -> None:
        self._handle = HANDLERS[handler_name].handle
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport to reply on."""
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        """Reply once the request's CRLF has arrived."""
        self._buffer += data
        end = self._buffer.find(CRLF)
        if end >= 0:
            self._reply(self._buffer[: end + len(CRLF)])

    def eof_received(self) -> bool:
        """Reply to a request that ended without CRLF; keep open until replied."""
        if self._transport is not None and not self._transport.is_closing():
            self._reply(self._buffer)
        return True

    def _reply(self, request: bytes) -> None:
        assert self._transport is not None
        self._transport.write(_encode(self._handle(request.decode("utf-8", "ignore"))))
        self._transport.close()


def start_uvloop(handler_name: str) -> Serving:
    """A minimal asyncio server on uvloop, to measure the load generator's ceiling."""
    import uvloop

    listener = socket.create_server((HOST, 0), backlog=4096)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: UvloopProtocol(handler_name), sock=listener)
        await server.serve_forever()

    return Serving(listener.getsockname()[1], lambda: uvloop.run(serve()))


@dataclass(frozen=True)
class Peer:
    """A server the benchmark can start: a description and a starter."""

    description: str
    start: Callable[[str], Serving]


PEERS: dict[str, Peer] = {
    "yoton-sync": Peer("yoton, sync", partial(start_yoton, async_val=False)),
    "yoton-async": Peer("yoton, async_val=True", partial(start_yoton, async_val=True)),
    "threading": Peer("socketserver, threads", partial(start_socketserver, ThreadingPeer)),
    "forking": Peer("socketserver, forks", partial(start_socketserver, ForkingPeer)),
    "mpreqrep-thread": Peer("mpreqrep, thread mode", start_mpreqrep),
    "mpreqrep-async": Peer("mpreqrep, async_val=True", partial(start_mpreqrep, async_val=True)),
    "mpreqrep-proc1": Peer("mpreqrep, workers=1", partial(start_mpreqrep, workers=1)),
    "mpreqrep-proc2": Peer("mpreqrep, workers=2", partial(start_mpreqrep, workers=2)),
    "uvloop": Peer("asyncio protocol server on uvloop (calibration)", start_uvloop),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Serve one peer; run as ``python -c "import sys, peers; peers.main()" ...``.

    Run through ``import peers`` rather than as ``__main__`` so process
    workers can unpickle :class:`MpreqrepPeer` by reference.
    """
    parser = argparse.ArgumentParser(description="Serve one benchmark peer on 127.0.0.1.")
    parser.add_argument("--server", choices=sorted(PEERS), required=True)
    parser.add_argument("--handler", choices=sorted(HANDLERS), required=True)
    parser.add_argument("--port-fd", type=int, required=True, help="write the port here")
    args = parser.parse_args(argv)
    serving = PEERS[args.server].start(args.handler)
    with os.fdopen(args.port_fd, "w") as port_file:
        port_file.write(f"{serving.port}\n")
    serving.serve()
    return 0


# -- the benchmark's side -----------------------------------------------------------------


class PeerError(RuntimeError):
    """A peer did not start, or died.

    Args:
        reason: what went wrong, e.g. ``"threading exited (1)"``.
        log: the end of the peer's output.
    """

    def __init__(self, reason: str, log: str) -> None:
        super().__init__(f"{reason}:\n{log}" if log else reason)
        self.reason = reason
        self.log = log

    @property
    def summary(self) -> str:
        """One line: the reason and the last line of output (usually the exception)."""
        lines = self.log.strip().splitlines()
        return f"{self.reason}: {lines[-1]}" if lines else self.reason


class PeerProcess:
    """One peer subprocess, started and ended by pid.

    Its output goes to a temporary file that :meth:`log_tail` reads. Use it
    as a context manager, or call :meth:`stop`, to end its process tree.
    """

    def __init__(self, server: str, handler: str) -> None:
        self.server = server
        self.handler = handler
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        self._proc = self._spawn()
        self._root = psutil.Process(self._proc.pid)
        self.port = 0

    def _spawn(self) -> subprocess.Popen[bytes]:
        read_fd, write_fd = os.pipe()
        self._port_fd = read_fd
        code = "import sys, peers; sys.exit(peers.main(sys.argv[1:]))"
        argv = ["--server", self.server, "--handler", self.handler, "--port-fd", str(write_fd)]
        try:
            return subprocess.Popen(
                [sys.executable, "-c", code, *argv],
                env=_peer_env(),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
            )
        finally:
            os.close(write_fd)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> int:
        """Wait until the peer answers its handler's request; return its port.

        Raises:
            PeerError: it exited, or did not answer within ``timeout_s``.
        """
        deadline_s = time.monotonic() + timeout_s
        self.port = self._read_port(deadline_s)
        handler = HANDLERS[self.handler]
        expected = handler.expected_reply()
        while (reply := _probe(self.port, handler.request, deadline_s)) is None:
            self.check_alive()
            if time.monotonic() > deadline_s:
                raise PeerError(f"{self.server} did not answer in {timeout_s} s", self.log_tail())
            time.sleep(PROBE_RETRY_S)  # yoton listens only once its run() has begun
        if reply != expected:
            raise PeerError(f"{self.server} replied {reply!r}, not {expected!r}", self.log_tail())
        return self.port

    def _read_port(self, deadline_s: float) -> int:
        with os.fdopen(self._port_fd, "rb") as port_pipe:
            wait_s = max(0.0, deadline_s - time.monotonic())
            ready, _, _ = select.select([port_pipe], [], [], wait_s)
            line = port_pipe.readline() if ready else b""
        if not line.strip():
            raise PeerError(f"{self.server} did not report its port", self.log_tail())
        return int(line)

    def check_alive(self) -> None:
        """Raise :class:`PeerError` if the peer process has exited."""
        if self._proc.poll() is not None:
            raise PeerError(f"{self.server} exited ({self._proc.returncode})", self.log_tail())

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the peer and every descendant, reaped ones included."""
        total = 0.0
        for proc in [self._root, *self._root.children(recursive=True)]:
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system + times.children_user + times.children_system
        return total

    def log_tail(self, max_chars: int = 2000) -> str:
        """The end of the peer's output ("" once stopped)."""
        if self._log.closed:
            return ""
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-max_chars:]

    def stop(self) -> None:
        """Terminate the peer and its descendants by pid, killing stragglers."""
        try:
            procs = [self._root, *self._root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=STOP_TIMEOUT_S)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        self._proc.wait()
        self._log.close()

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _peer_env() -> dict[str, str]:
    """The environment with ``scripts/`` and the repository importable, also by workers."""
    paths = [str(SCRIPTS_DIR), str(REPO_DIR), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in paths if path)}


def _probe(port: int, request: str, deadline_s: float) -> str | None:
    """One blocking exchange; ``None`` if the connection failed."""
    timeout_s = max(0.1, deadline_s - time.monotonic())
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s) as sock:
            sock.sendall(_encode(request))
            sock.shutdown(socket.SHUT_WR)
            return _read_request(sock)
    except OSError:
        return None
