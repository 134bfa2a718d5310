"""The acceptor: deferred accepts (Linux), and stopping: the linger that answers
yoton's trigger idiom, the drain, the backlog sweep."""

from __future__ import annotations

import socket
import threading
import time

import pytest

import mpreqrep
from mpreqrep._acceptor import DEFER_ACCEPT_S, STOP_LINGER_S
from mpreqrep._dispatch import InlineDispatcher
from mpreqrep._ioloop import IOLoop

from .conftest import UNIT, running, wait_until


class Gated(mpreqrep.RequestServer):
    """Requests named ``hold...`` wait until the test opens their gate."""

    def __init__(self, address: str, **options: object) -> None:
        super().__init__(address, **options)  # type: ignore[arg-type]
        self.gates: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    def gate(self, name: str) -> threading.Event:
        with self.lock:
            self.started.setdefault(name, threading.Event())
            return self.gates.setdefault(name, threading.Event())

    def handle_request(self, request: str) -> str:
        name = request.strip()
        if name.startswith("hold"):
            gate = self.gate(name)
            self.started[name].set()
            gate.wait(30 * UNIT)
        return "done " + name


def ask_in_thread(address: str, text: str) -> tuple[threading.Thread, list[str | None]]:
    replies: list[str | None] = []
    thread = threading.Thread(
        target=lambda: replies.append(mpreqrep.do_request(address, text, 30 * UNIT))
    )
    thread.start()
    return thread, replies


def refuses(address: str) -> bool:
    try:
        mpreqrep.do_request(address, "probe", 10 * UNIT)
    except mpreqrep.NoServerError:
        return True
    return False


@pytest.mark.parametrize("async_val", [False, True])
def test_a_request_right_after_stop_is_answered(async_val: bool) -> None:
    """yoton's idiom (pyzo uses it): stop(), then at once a request as a trigger."""
    for _ in range(10):
        server = mpreqrep.RequestServer("localhost:0", async_val=async_val)
        server.start()
        server.stop()
        assert mpreqrep.do_request(server.address, "trigger", 10 * UNIT) == "Requested: trigger\r\n"
        server.join(10 * UNIT)
        assert not server.is_alive()
        assert refuses(server.address)


def test_stopping_an_idle_server_takes_about_the_linger() -> None:
    server = mpreqrep.RequestServer("localhost:0")
    server.start()
    began = time.monotonic()
    server.stop()
    server.join(10 * UNIT)
    elapsed = time.monotonic() - began
    assert STOP_LINGER_S <= elapsed < 1 * UNIT
    assert refuses(server.address)


def test_stop_twice_and_from_a_handler_is_harmless() -> None:
    class StopsItself(mpreqrep.RequestServer):
        def handle_request(self, request: str) -> str:
            self.stop()  # pyzo's "stopserver" command does this
            return "stopping"

    with running(StopsItself) as server:
        server.stop()
        assert mpreqrep.do_request(server.address, "stop", 10 * UNIT) == "stopping\r\n"
        server.stop()
    assert refuses(server.address)


def test_the_listener_stays_open_while_earlier_requests_drain() -> None:
    with running(Gated, async_val=True) as server:
        early, early_reply = ask_in_thread(server.address, "hold-early")
        assert server.gate("hold-early") and server.started["hold-early"].wait(10 * UNIT)
        server.stop()
        time.sleep(2 * STOP_LINGER_S)  # past the linger, the drain still runs
        assert mpreqrep.do_request(server.address, "late", 10 * UNIT) == "done late\r\n"
        server.gate("hold-early").set()
        early.join(10 * UNIT)
        assert early_reply == ["done hold-early\r\n"]
    assert refuses(server.address)


def test_connections_during_the_drain_do_not_keep_the_listener_open() -> None:
    with running(Gated, async_val=True) as server:
        first, first_reply = ask_in_thread(server.address, "hold-first")
        assert server.gate("hold-first") and server.started["hold-first"].wait(10 * UNIT)
        server.stop()
        time.sleep(2 * STOP_LINGER_S)
        second, second_reply = ask_in_thread(server.address, "hold-second")
        assert server.gate("hold-second") and server.started["hold-second"].wait(10 * UNIT)
        server.gate("hold-first").set()
        first.join(10 * UNIT)
        # The request accepted before stop() is done: the listener closes, though
        # the one accepted while stopping still runs (and will be answered).
        assert wait_until(lambda: refuses(server.address), 10 * UNIT)
        assert server.is_alive()
        server.gate("hold-second").set()
        second.join(10 * UNIT)
    assert first_reply == ["done hold-first\r\n"]
    assert second_reply == ["done hold-second\r\n"]


def test_connections_waiting_in_the_backlog_at_close_are_answered() -> None:
    """Sync mode: the loop is busy in a handler past the linger; what queued meanwhile
    in the kernel's backlog is still accepted and answered before the listener closes."""
    with running(Gated) as server:
        # The busy request comes in two parts, so its handler runs from a read event
        # (not from an accept batch, which would pick up the backlog by itself).
        busy = socket.create_connection(("127.0.0.1", server.port), timeout=10 * UNIT)
        busy.sendall(b"hold-")
        assert wait_until(lambda: server.stats().get("reading") == 1, 10 * UNIT)
        busy.sendall(b"busy\r\n")
        assert server.gate("hold-busy") and server.started["hold-busy"].wait(10 * UNIT)
        server.stop()
        waiting = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
        for index, sock in enumerate(waiting):
            sock.sendall(f"queued{index}\r\n".encode())
            sock.shutdown(socket.SHUT_WR)
        time.sleep(2 * STOP_LINGER_S)  # the linger ends while the loop is busy
        server.gate("hold-busy").set()
        for index, sock in enumerate([busy, *waiting]):
            with sock:
                sock.settimeout(10 * UNIT)
                name = "hold-busy" if index == 0 else f"queued{index - 1}"
                assert sock.recv(100) == f"done {name}\r\n".encode()


@pytest.mark.skipif(
    not hasattr(socket, "TCP_DEFER_ACCEPT"), reason="TCP_DEFER_ACCEPT is Linux only"
)
def test_serving_sets_defer_accept_and_silent_clients_are_still_dropped() -> None:
    server = mpreqrep.RequestServer("localhost:0")  # only its echo handler is used
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    loop = IOLoop(
        listener,
        InlineDispatcher(server),
        read_timeout_s=0.2 * UNIT,
        request_timeout_s=None,
        max_request_size=1000,
        max_pending=None,
    )
    thread = threading.Thread(target=loop.serve, daemon=True)
    thread.start()
    try:
        option = (socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT)
        assert wait_until(lambda: listener.getsockopt(*option) > 0, 5 * UNIT)
        address = f"localhost:{listener.getsockname()[1]}"
        assert mpreqrep.do_request(address, "a", 5 * UNIT) == "Requested: a\r\n"
        with socket.create_connection(listener.getsockname()) as silent:
            started = time.monotonic()
            silent.settimeout(DEFER_ACCEPT_S * 5 + 5 * UNIT)
            assert silent.recv(1) == b""
            assert time.monotonic() - started < DEFER_ACCEPT_S * 5 + 5 * UNIT
        assert wait_until(lambda: loop.stats.dropped == 1, 5 * UNIT)
    finally:
        loop.request_stop()
        thread.join(10 * UNIT)
        server.stop()
        server.run()
    assert not thread.is_alive()
