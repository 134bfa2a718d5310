"""Closed-loop load generator speaking the mpreqrep wire protocol (SPEC section 1).

Every simulated client repeats one exchange on a fresh TCP connection to
127.0.0.1: connect, send the request (CRLF-terminated), shut down the write
side, read to the first CRLF or EOF, close. There are no retries: a request
that fails is counted under its error kind and the client goes on with the
next one. A run is bounded both by a request budget and by a duration, and
every request by a timeout, so a refusing or hung server cannot stall it.

Clients run as ``asyncio`` protocols on one event loop per process (uvloop
when installed: about twice the connections per second of plain asyncio).
When one core is not enough, :class:`GeneratorPool` splits the clients over
several processes::

    bench.py ──LoadSpec──▶ generator process 1 ── clients/P ──┐
             ──LoadSpec──▶ generator process 2 ── clients/P ──┴─▶ server
             ◀─LoadResult── counts, errors, latencies, CPU seconds

This module knows nothing about which server it is talking to.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import multiprocessing
import time
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import cast

HOST = "127.0.0.1"
CRLF = b"\r\n"
LOOPS = ("uvloop", "asyncio")
DEFAULT_LOOP = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


@dataclass(frozen=True)
class LoadSpec:
    """One load run against one server.

    Attributes:
        port: the server's TCP port on 127.0.0.1.
        request: the request text; CRLF is appended unless present.
        expected_reply: the exact reply text (CRLF included) that counts as a
            success; ``None`` accepts any non-empty reply.
        clients: concurrent closed-loop clients.
        duration_s: no request starts after this many seconds.
        max_requests: no more requests than this are started.
        timeout_s: a request not answered within this many seconds, connect
            included, is abandoned and counted as ``"timeout"``.
        loop: ``"uvloop"`` or ``"asyncio"``.
    """

    port: int
    request: str
    expected_reply: str | None
    clients: int
    duration_s: float
    max_requests: int
    timeout_s: float
    loop: str = DEFAULT_LOOP


@dataclass
class LoadResult:
    """What one or more generator processes measured.

    Attributes:
        ok: requests answered with the expected reply.
        errors: failed requests by kind: an errno name (``"ECONNREFUSED"``),
            ``"timeout"``, ``"empty"`` (closed without a reply) or
            ``"mismatch"`` (an unexpected reply).
        latencies_s: the latency of every successful request.
        rate: successful requests per second within the measuring window.
        wall_s: seconds from the first request until the last one ended.
        cpu_s: CPU seconds (user + system) the generator processes used.
    """

    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies_s: array[float] = field(default_factory=lambda: array("d"))
    rate: float = 0.0
    wall_s: float = 0.0
    cpu_s: float = 0.0

    @property
    def error_count(self) -> int:
        """All failed requests, whatever their kind."""
        return sum(self.errors.values())


def merge_results(results: Iterable[LoadResult]) -> LoadResult:
    """Combine the results of generator processes that ran side by side."""
    merged = LoadResult()
    errors: Counter[str] = Counter()
    for result in results:
        merged.ok += result.ok
        errors.update(result.errors)
        merged.latencies_s.extend(result.latencies_s)
        merged.rate += result.rate
        merged.wall_s = max(merged.wall_s, result.wall_s)
        merged.cpu_s += result.cpu_s
    merged.errors = dict(errors)
    return merged


def split_spec(spec: LoadSpec, parts: int) -> list[LoadSpec]:
    """Share a spec's clients and request budget among ``parts`` processes.

    Processes that would get no client are left out, so the list may be
    shorter than ``parts``.
    """
    specs = []
    for index in range(min(parts, spec.clients)):
        clients = _share(spec.clients, parts, index)
        budget = _share(spec.max_requests, parts, index)
        specs.append(replace(spec, clients=clients, max_requests=budget))
    return specs


def _share(total: int, parts: int, index: int) -> int:
    """The ``index``-th of ``parts`` near-equal integer shares of ``total``."""
    return total // parts + (1 if index < total % parts else 0)


class _Exchange(asyncio.Protocol):
    """One request on one connection: send, half-close, collect the reply."""

    def __init__(self, payload: bytes, reply: asyncio.Future[bytes]) -> None:
        self._payload = payload
        self._reply = reply
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the whole request and shut down the write side."""
        writer = cast(asyncio.WriteTransport, transport)  # uvloop's is no subclass
        writer.write(self._payload)
        writer.write_eof()

    def data_received(self, data: bytes) -> None:
        """Collect bytes; the reply is complete at its first CRLF."""
        start = max(0, len(self._buffer) - 1)
        self._buffer += data
        end = self._buffer.find(CRLF, start)
        if end >= 0:
            self._finish(self._buffer[: end + len(CRLF)])

    def eof_received(self) -> None:
        """The server closed its side: whatever arrived is the reply."""
        self._finish(self._buffer)

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail the exchange if the connection broke before a reply."""
        if exc is not None and not self._reply.done():
            self._reply.set_exception(exc)
        self._finish(self._buffer)

    def _finish(self, reply: bytes) -> None:
        if not self._reply.done():
            self._reply.set_result(reply)


class _Run:
    """The shared state of the clients of one process during one run."""

    def __init__(self, spec: LoadSpec, loop: asyncio.AbstractEventLoop) -> None:
        self.spec = spec
        self.loop = loop
        self.payload = _encode(spec.request)
        self.expected = None if spec.expected_reply is None else _encode(spec.expected_reply)
        self.started = 0
        self.done_at_s: array[float] = array("d")
        self.latencies_s: array[float] = array("d")
        self.errors: Counter[str] = Counter()
        self.start_s = time.perf_counter()
        self.end_s = self.start_s + spec.duration_s

    def may_start(self) -> bool:
        """Whether the budget and the clock allow one more request."""
        return self.started < self.spec.max_requests and time.perf_counter() < self.end_s

    async def client(self) -> None:
        """One closed-loop client: a request at a time until the run is over."""
        while self.may_start():
            self.started += 1
            await self._timed_request()

    async def _timed_request(self) -> None:
        sent_s = time.perf_counter()
        kind = await self._request_with_timeout()
        done_s = time.perf_counter()
        if kind:
            self.errors[kind] += 1
            return
        self.latencies_s.append(done_s - sent_s)
        self.done_at_s.append(done_s)

    async def _request_with_timeout(self) -> str:
        """Run one exchange; return ``""`` on success, else the error kind."""
        task = asyncio.current_task()
        assert task is not None
        timer = self.loop.call_later(self.spec.timeout_s, task.cancel)
        try:
            return self._check(await self._exchange())
        except asyncio.CancelledError:
            return "timeout"
        except OSError as exc:
            return errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        finally:
            timer.cancel()

    async def _exchange(self) -> bytes:
        reply: asyncio.Future[bytes] = self.loop.create_future()
        transport, _ = await self.loop.create_connection(
            lambda: _Exchange(self.payload, reply), HOST, self.spec.port
        )
        try:
            return await reply
        finally:
            transport.close()

    def _check(self, reply: bytes) -> str:
        if not reply:
            return "empty"
        if self.expected is not None and reply != self.expected:
            return "mismatch"
        return ""

    def result(self, cpu_s: float) -> LoadResult:
        """Summarise the run once every client has returned."""
        done = self.done_at_s
        last_s = max(done, default=self.start_s)
        window_end_s = min(self.end_s, last_s)
        in_window = sum(1 for done_s in done if done_s <= window_end_s)
        window_s = window_end_s - self.start_s
        return LoadResult(
            ok=len(done),
            errors=dict(self.errors),
            latencies_s=self.latencies_s,
            rate=in_window / window_s if window_s > 0 else 0.0,
            wall_s=time.perf_counter() - self.start_s,
            cpu_s=cpu_s,
        )


def _encode(text: str) -> bytes:
    """Wire bytes of a message: UTF-8, CRLF appended unless present."""
    return (text if text.endswith("\r\n") else text + "\r\n").encode()


async def _run_clients(spec: LoadSpec) -> LoadResult:
    cpu_before_s = time.process_time()
    run = _Run(spec, asyncio.get_running_loop())
    await asyncio.gather(*(run.client() for _ in range(spec.clients)))
    return run.result(time.process_time() - cpu_before_s)


def new_event_loop(name: str) -> asyncio.AbstractEventLoop:
    """A fresh event loop: ``"uvloop"`` or the standard ``"asyncio"`` one.

    Raises:
        ValueError: an unknown loop name.
        ImportError: uvloop was asked for but is not installed.
    """
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    if name == "asyncio":
        return asyncio.new_event_loop()
    raise ValueError(f"unknown event loop {name!r}; choose from {', '.join(LOOPS)}")


def run_load(spec: LoadSpec) -> LoadResult:
    """Run one load spec in this process and return what it measured.

    The run ends when the duration is over or the budget spent and every
    started request has ended (each within ``spec.timeout_s``).
    """
    loop = new_event_loop(spec.loop)
    try:
        return loop.run_until_complete(_run_clients(spec))
    finally:
        loop.close()


def _serve_specs(conn: Connection) -> None:
    """Generator process body: run each spec received, send back its result."""
    while (spec := conn.recv()) is not None:
        conn.send(run_load(spec))


class GeneratorPool:
    """Long-lived generator processes that run a spec's share side by side.

    Processes are started once (spawn) and reused for every run; use it as
    a context manager, or call :meth:`close`, to end them by pid.
    Not thread safe: call :meth:`run` from one thread.
    """

    def __init__(self, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[BaseProcess] = []
        for _ in range(processes):
            parent_conn, child_conn = context.Pipe()
            proc = context.Process(target=_serve_specs, args=(child_conn,), daemon=True)
            proc.start()
            child_conn.close()
            self._conns.append(parent_conn)
            self._procs.append(proc)

    @property
    def pids(self) -> list[int]:
        """Process ids of the generator processes."""
        return [proc.pid for proc in self._procs if proc.pid is not None]

    def run(self, spec: LoadSpec) -> LoadResult:
        """Run ``spec`` split over the processes and merge their results."""
        parts = split_spec(spec, len(self._conns))
        for index, part in enumerate(parts):
            self._conns[index].send(part)
        return merge_results(conn.recv() for conn in self._conns[: len(parts)])

    def close(self) -> None:
        """Ask every process to exit, then terminate any that did not."""
        for conn in self._conns:
            conn.send(None)
            conn.close()
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join()

    def __enter__(self) -> GeneratorPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
