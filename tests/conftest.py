"""Shared helpers: the timeout unit, yoton, and servers that clean up after themselves."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import psutil
import pytest

import mpreqrep

# Every timeout in the tests is a multiple of this; raise it on slow machines.
UNIT = float(os.environ.get("MPREQREP_TEST_TIMEOUT_UNIT", "1.0"))


def pytest_configure(config: pytest.Config) -> None:
    """Let Ctrl-C be Ctrl-C, even in a run started in the background.

    A non-interactive shell starts a background job with SIGINT ignored, and
    Python then keeps it ignored, in this process and in every child it
    starts: the Ctrl-C tests (here and in subprocesses) would wait for an
    interrupt that never comes. Python's own handler is put in place instead;
    on exec a child gets the default action back, so it installs its own.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def import_yoton() -> ModuleType:
    """The real yoton, from the pyzo package installed as a test dependency."""
    import pyzo

    folder = os.path.dirname(pyzo.__file__)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import yoton

    return yoton


@pytest.fixture(scope="session")
def yoton() -> ModuleType:
    return import_yoton()


@contextmanager
def running(
    server_class: type[mpreqrep.RequestServer] = mpreqrep.RequestServer, **options: Any
) -> Iterator[mpreqrep.RequestServer]:
    """Start a server on an ephemeral loopback port; stop and join it afterwards."""
    server = server_class("127.0.0.1:0", **options)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        server.join(timeout=30 * UNIT)
        assert not server.is_alive(), "server did not stop"


def serve_once(reply: bytes | None) -> tuple[int, threading.Thread, list[bytes]]:
    """Accept one connection, record what the client sent, send ``reply`` and close."""
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def handle() -> None:
        with listener, listener.accept()[0] as conn:
            conn.settimeout(10 * UNIT)
            chunks = []
            while chunk := conn.recv(4096):
                chunks.append(chunk)
            received.append(b"".join(chunks))
            if reply is not None:
                conn.sendall(reply)

    thread = threading.Thread(target=handle, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread, received


def ask_all(address: str, requests: list[str], timeout: float = 30 * UNIT) -> list[str | None]:
    """Send the requests at once, each from its own thread; the replies in order."""
    replies: list[str | None] = [None] * len(requests)

    def one(index: int) -> None:
        replies[index] = mpreqrep.do_request(address, requests[index], timeout=timeout)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(2 * timeout)
    return replies


def assert_exits_promptly(argv: list[str], within_s: float = 1 * UNIT) -> None:
    """Run ``argv``, a program that prints ``exiting`` when it is about to exit with
    work still running (a daemon thread, a handler): from that line on, it must exit
    0 within ``within_s`` seconds, the running work notwithstanding."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "exiting\n"
        began = time.monotonic()
        assert process.wait(timeout=30 * UNIT) == 0
        assert time.monotonic() - began < within_s
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def alive(process: psutil.Process) -> bool:
    """Whether a process runs (a zombie, waiting for init to reap it, does not)."""
    try:
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def assert_all_gone_soon(family: list[psutil.Process], killed_at: float) -> None:
    """Every process of ``family`` (a killed server's descendants, at least a worker
    and a helper) ends within 2 s of ``killed_at``; prints how soon."""
    assert len(family) >= 2
    assert wait_until(lambda: not any(map(alive, family)), 2.0), [
        (child.pid, child.cmdline()) for child in family if alive(child)
    ]
    print(f"no descendant left {time.monotonic() - killed_at:.3f} s after SIGKILL")
