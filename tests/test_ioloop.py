"""The I/O loop with fakes: accept errors, back-pressure, deadlines."""

from __future__ import annotations

import errno
import logging
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest

import mpreqrep
from mpreqrep._deadlines import MAX_SELECT_TIMEOUT_S
from mpreqrep._dispatch import Dispatcher
from mpreqrep._ioloop import IOLoop

from .conftest import UNIT, wait_until
from .test_faults import raw_exchange


class FlakyListener:
    """A listening socket whose first ``failures`` accepts raise ``error``."""

    def __init__(self, error: int, failures: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.error = error
        self.failures = failures

    def fileno(self) -> int:
        return self.sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def accept(self) -> tuple[socket.socket, object]:
        if self.failures:
            self.failures -= 1
            raise OSError(self.error, "injected")
        return self.sock.accept()

    def close(self) -> None:
        self.sock.close()


class ManualDispatcher(Dispatcher):
    """Hands out futures that the test completes by hand."""

    def __init__(self) -> None:
        self.futures: list[tuple[str, Future[str]]] = []

    def submit(self, request: str) -> Future[str]:
        future: Future[str] = Future()
        self.futures.append((request, future))
        return future


@pytest.fixture
def serving() -> Iterator[list[IOLoop]]:
    """Run loops in threads; stop and join them afterwards."""
    loops: list[IOLoop] = []
    threads: list[threading.Thread] = []
    yield loops
    for loop in loops:
        loop.request_stop()
    for thread in threading.enumerate():
        if thread.name.startswith("test-loop"):
            threads.append(thread)
    for thread in threads:
        thread.join(10 * UNIT)
        assert not thread.is_alive()


def start_loop(
    loops: list[IOLoop], listener: object, dispatcher: Dispatcher, **options: object
) -> IOLoop:
    settings: dict[str, object] = {
        "read_timeout_s": 10 * UNIT,
        "request_timeout_s": None,
        "max_request_size": 1000,
        "max_pending": None,
    }
    settings.update(options)
    loop = IOLoop(listener, dispatcher, **settings)  # type: ignore[arg-type]
    loops.append(loop)
    threading.Thread(target=loop.serve, name=f"test-loop-{len(loops)}", daemon=True).start()
    return loop


@pytest.mark.parametrize("error", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])
def test_resource_errors_on_accept_back_off_and_recover(
    serving: list[IOLoop], error: int, caplog: pytest.LogCaptureFixture
) -> None:
    listener = FlakyListener(error, failures=3)
    server = mpreqrep.RequestServer("localhost:0")  # only its echo handler is used
    from mpreqrep._dispatch import InlineDispatcher

    with caplog.at_level(logging.WARNING, logger="mpreqrep"):
        start_loop(serving, listener, InlineDispatcher(server))
        address = f"localhost:{listener.sock.getsockname()[1]}"
        assert mpreqrep.do_request(address, "a", 10 * UNIT) == "Requested: a\r\n"
    assert listener.failures == 0
    assert sum("pausing accepts" in r.getMessage() for r in caplog.records) == 3
    server.stop()
    server.run()


def test_aborted_accept_is_ignored(serving: list[IOLoop]) -> None:
    from mpreqrep._dispatch import InlineDispatcher

    listener = FlakyListener(errno.ECONNABORTED, failures=1)
    server = mpreqrep.RequestServer("localhost:0")
    start_loop(serving, listener, InlineDispatcher(server))
    address = f"localhost:{listener.sock.getsockname()[1]}"
    assert mpreqrep.do_request(address, "b", 10 * UNIT) == "Requested: b\r\n"
    server.stop()
    server.run()


def test_max_pending_pauses_accepting_until_a_reply_is_written(serving: list[IOLoop]) -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    dispatcher = ManualDispatcher()
    loop = start_loop(serving, listener, dispatcher, max_pending=2)
    address = f"localhost:{listener.getsockname()[1]}"
    replies: dict[int, str | None] = {}
    clients = [
        threading.Thread(
            target=lambda i=i: replies.__setitem__(
                i, mpreqrep.do_request(address, f"r{i}", 20 * UNIT)
            )
        )
        for i in range(4)
    ]
    for client in clients:
        client.start()
    assert wait_until(lambda: len(dispatcher.futures) == 2, 10 * UNIT)
    assert not wait_until(lambda: len(dispatcher.futures) > 2, 0.3 * UNIT)
    assert loop.counts()[0] == 2
    assert sum(loop.counts()[:2]) <= 4
    dispatcher.futures[0][1].set_result("first")
    assert wait_until(lambda: len(dispatcher.futures) == 3, 10 * UNIT)
    for _, future in dispatcher.futures[1:]:
        future.set_result("later")
    assert wait_until(lambda: len(dispatcher.futures) == 4, 10 * UNIT)
    dispatcher.futures[3][1].set_result("last")
    for client in clients:
        client.join(10 * UNIT)
    assert sorted(replies.values()) == ["first\r\n", "last\r\n", "later\r\n", "later\r\n"]


def test_replies_are_written_in_completion_order(serving: list[IOLoop]) -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    dispatcher = ManualDispatcher()
    start_loop(serving, listener, dispatcher)
    address = f"localhost:{listener.getsockname()[1]}"
    order: list[str] = []
    clients = [
        threading.Thread(
            target=lambda i=i: order.append(str(mpreqrep.do_request(address, f"{i}", 20 * UNIT)))
        )
        for i in range(3)
    ]
    for client in clients:
        client.start()
    assert wait_until(lambda: len(dispatcher.futures) == 3, 10 * UNIT)
    for request, future in reversed(sorted(dispatcher.futures)):
        future.set_result("done " + request.strip())
        assert wait_until(lambda r=request: f"done {r.strip()}\r\n" in order, 10 * UNIT)
    for client in clients:
        client.join(10 * UNIT)
    assert order == ["done 2\r\n", "done 1\r\n", "done 0\r\n"]


def test_large_reply_is_written_in_parts(serving: list[IOLoop]) -> None:
    class Big(mpreqrep.RequestServer):
        def handle_request(self, request: str) -> str:
            return "b" * 5_000_000

    with Big("localhost:0", async_val=True) as server:
        reply = mpreqrep.do_request(server.address, "big", 30 * UNIT)
    assert reply == "b" * 5_000_000 + "\r\n"


def test_submit_failure_closes_that_connection_only(
    serving: list[IOLoop], caplog: pytest.LogCaptureFixture
) -> None:
    class Refusing(ManualDispatcher):
        def submit(self, request: str) -> Future[str]:
            if request.startswith("refuse"):
                raise RuntimeError("executor is shut down")
            future: Future[str] = Future()
            future.set_result("fine")
            return future

    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    start_loop(serving, listener, Refusing())
    address = f"localhost:{listener.getsockname()[1]}"
    with caplog.at_level(logging.ERROR, logger="mpreqrep"):
        assert mpreqrep.do_request(address, "refuse", 10 * UNIT) == ""
    assert mpreqrep.do_request(address, "ok", 10 * UNIT) == "fine\r\n"
    failures = [r for r in caplog.records if "error serving the connection" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None


def test_cancelled_future_closes_that_connection_and_serving_goes_on(
    serving: list[IOLoop],
) -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    dispatcher = ManualDispatcher()
    loop = start_loop(serving, listener, dispatcher)
    address = f"localhost:{listener.getsockname()[1]}"
    replies: list[str | None] = []
    client = threading.Thread(
        target=lambda: replies.append(mpreqrep.do_request(address, "c", 20 * UNIT))
    )
    client.start()
    assert wait_until(lambda: len(dispatcher.futures) == 1, 10 * UNIT)
    dispatcher.futures[0][1].cancel()
    client.join(10 * UNIT)
    assert replies == [""]
    assert loop.stats.failed == 1
    client = threading.Thread(
        target=lambda: replies.append(mpreqrep.do_request(address, "d", 20 * UNIT))
    )
    client.start()
    assert wait_until(lambda: len(dispatcher.futures) == 2, 10 * UNIT)
    dispatcher.futures[1][1].set_result("alive")
    client.join(10 * UNIT)
    assert replies == ["", "alive\r\n"]


def test_answered_connections_hold_no_deadline(serving: list[IOLoop]) -> None:
    """A finished connection must not wait in a deadline queue (and keep its buffers)."""
    from mpreqrep._dispatch import InlineDispatcher

    server = mpreqrep.RequestServer("localhost:0")
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    loop = start_loop(serving, listener, InlineDispatcher(server), request_timeout_s=60 * UNIT)
    address = f"localhost:{listener.getsockname()[1]}"
    for index in range(20):
        assert mpreqrep.do_request(address, f"{index}", 10 * UNIT) == f"Requested: {index}\r\n"
    queues = (loop._read_deadlines, loop._request_deadlines, loop._write_deadlines)
    assert wait_until(lambda: not any(queue._entries for queue in queues), 10 * UNIT)
    assert loop._select_timeout() is None
    server.stop()
    server.run()


class AttachingDispatcher(ManualDispatcher):
    """Remembers the loop it was attached to."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: IOLoop | None = None
        self.attached = threading.Event()

    def attach(self, loop: Any) -> None:
        self.loop = loop
        self.attached.set()


def test_an_attached_dispatcher_can_run_callbacks_and_read_sockets_on_the_io_thread(
    serving: list[IOLoop], caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = AttachingDispatcher()
    loop = start_loop(serving, socket.create_server(("127.0.0.1", 0)), dispatcher)
    assert dispatcher.attached.wait(10 * UNIT) and dispatcher.loop is loop
    ran_on: list[str] = []
    readable = threading.Event()
    reader, writer = socket.socketpair()

    def watch() -> None:
        ran_on.append(threading.current_thread().name)
        loop.add_reader(reader, lambda: (readable.set(), loop.remove_reader(reader)))

    def fail() -> None:
        raise KeyError("callback bug")

    assert loop.call_soon(fail)  # logged; the loop goes on
    assert loop.call_soon(watch)
    writer.send(b"x")
    assert readable.wait(10 * UNIT)
    assert len(ran_on) == 1 and ran_on[0].startswith("test-loop")
    assert "a callback queued on the I/O loop failed" in caplog.text
    loop.remove_reader(reader)  # not watched any more: harmless
    loop.request_stop()
    assert wait_until(lambda: not loop.call_soon(watch), 10 * UNIT)  # stopped: run it yourself
    reader.close()
    writer.close()


class StepFault(BaseException):
    """Raised by a socket method the test picked; a BaseException on purpose."""


class FaultySocket:
    """An accepted socket whose method ``failing`` raises :class:`StepFault`."""

    def __init__(self, sock: socket.socket, failing: str) -> None:
        self._sock = sock
        self._failing = failing

    def __getattr__(self, name: str) -> Any:
        if name == self._failing:
            raise StepFault(f"{name} exploded")
        return getattr(self._sock, name)


class FaultyListener:
    """A listener whose next accepted socket fails in the method named by ``failing``."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.failing: str | None = None
        self.accepted: list[socket.socket] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def accept(self) -> tuple[object, object]:
        sock, peer = self.sock.accept()
        self.accepted.append(sock)
        failing, self.failing = self.failing, None
        return (sock if failing is None else FaultySocket(sock, failing)), peer

    def close(self) -> None:
        self.sock.close()


class EchoDispatcher(Dispatcher):
    """Replies at once: ``surrogate`` gets an unencodable reply, ``exit`` a SystemExit."""

    def submit(self, request: str) -> Future[str]:
        if request.startswith("exit"):
            raise SystemExit("submit exploded")
        if request.startswith("interrupt"):
            raise KeyboardInterrupt  # off the main thread: not Ctrl-C, a fault like any
        future: Future[str] = Future()
        future.set_result("name-\udcff" if request.startswith("surrogate") else "echo " + request)
        return future


@pytest.mark.parametrize(
    ("failing", "request_text"),
    [
        ("setblocking", "a"),  # accept
        ("recv", "b"),  # read
        (None, "exit"),  # dispatch
        (None, "interrupt"),  # dispatch
        (None, "surrogate"),  # encode
        ("send", "c"),  # write
        ("shutdown", "d"),  # close
    ],
)
def test_a_fault_in_any_step_costs_only_that_connection(
    serving: list[IOLoop], failing: str | None, request_text: str, caplog: pytest.LogCaptureFixture
) -> None:
    listener = FaultyListener()
    loop = start_loop(serving, listener, EchoDispatcher())
    address = f"localhost:{listener.sock.getsockname()[1]}"
    listener.failing = failing
    with caplog.at_level(logging.ERROR, logger="mpreqrep"):
        reply = raw_exchange(listener.sock.getsockname()[1], f"{request_text}\r\n".encode())
    # The close step fails after the reply went out; every other step before.
    assert reply.decode() == ("echo d\r\n" if failing == "shutdown" else "")
    assert mpreqrep.do_request(address, "next", 10 * UNIT) == "echo next\r\n"
    assert loop.stats.failed == 1
    assert wait_until(lambda: all(sock.fileno() == -1 for sock in listener.accepted), 5 * UNIT)
    assert [r for r in caplog.records if r.exc_info], "no traceback logged"


def test_ctrl_c_on_the_main_thread_ends_serving_and_closes_every_socket() -> None:
    assert threading.current_thread() is threading.main_thread()
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    loop = IOLoop(
        listener,
        EchoDispatcher(),
        read_timeout_s=10 * UNIT,
        request_timeout_s=None,
        max_request_size=1000,
        max_pending=None,
    )
    port = listener.getsockname()[1]
    replies: list[bytes] = []
    client = threading.Thread(target=lambda: replies.append(raw_exchange(port, b"interrupt\r\n")))
    client.start()
    with pytest.raises(KeyboardInterrupt):
        loop.serve()
    client.join(10 * UNIT)
    assert replies == [b""]
    assert listener.fileno() == -1


def test_a_failing_reader_callback_is_logged_and_the_loop_goes_on(
    serving: list[IOLoop], caplog: pytest.LogCaptureFixture
) -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    dispatcher = AttachingDispatcher()
    loop = start_loop(serving, listener, dispatcher)
    reader, writer = socket.socketpair()

    def explode() -> None:
        reader.recv(1)
        raise SystemExit("reader bug")

    with caplog.at_level(logging.ERROR, logger="mpreqrep"):
        assert loop.call_soon(lambda: loop.add_reader(reader, explode))
        writer.send(b"x")
        assert wait_until(
            lambda: "a reader callback on the I/O loop failed" in caplog.text, 5 * UNIT
        )
    address = f"localhost:{listener.getsockname()[1]}"
    replies: list[str | None] = []
    client = threading.Thread(target=lambda: replies.append(mpreqrep.do_request(address, "r")))
    client.start()
    assert wait_until(lambda: len(dispatcher.futures) == 1, 10 * UNIT)
    dispatcher.futures[0][1].set_result("still serving")
    client.join(10 * UNIT)
    assert replies == ["still serving\r\n"]
    loop.call_soon(lambda: loop.remove_reader(reader))
    reader.close()
    writer.close()


def test_requests_in_flight_count_as_large_as_the_last_large_reply(serving: list[IOLoop]) -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    dispatcher = ManualDispatcher()
    loop = start_loop(serving, listener, dispatcher, max_buffered_bytes=100_000)
    address = f"localhost:{listener.getsockname()[1]}"
    replies: list[str | None] = []

    def ask(text: str) -> threading.Thread:
        thread = threading.Thread(
            target=lambda: replies.append(mpreqrep.do_request(address, text, 20 * UNIT))
        )
        thread.start()
        return thread

    first = ask("large")
    assert wait_until(lambda: len(dispatcher.futures) == 1, 10 * UNIT)
    dispatcher.futures[0][1].set_result("a" * 300_000)  # read at once, in full
    first.join(10 * UNIT)
    # The client has its reply once the last byte is sent; the loop then closes.
    assert wait_until(lambda: loop.buffered_bytes == 0, 10 * UNIT)
    second, third = ask("b"), ask("c")
    assert wait_until(lambda: len(dispatcher.futures) == 2, 10 * UNIT)
    # One in flight may bring 300 kB: past the bound, so the other one waits.
    assert not wait_until(lambda: len(dispatcher.futures) > 2, 0.3 * UNIT)
    dispatcher.futures[1][1].set_result("small")
    assert wait_until(lambda: len(dispatcher.futures) == 3, 10 * UNIT)
    dispatcher.futures[2][1].set_result("small")
    second.join(10 * UNIT)
    third.join(10 * UNIT)
    assert sorted(replies, key=len) == ["small\r\n", "small\r\n", "a" * 300_000 + "\r\n"]


def test_a_far_deadline_never_overflows_select(serving: list[IOLoop]) -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    loop = start_loop(serving, listener, EchoDispatcher(), read_timeout_s=1e300)
    with socket.create_connection(listener.getsockname(), timeout=10 * UNIT):
        assert wait_until(lambda: loop.counts()[2] == 1, 10 * UNIT)  # reading, 1e300 s left
        assert loop._select_timeout() == MAX_SELECT_TIMEOUT_S
    address = f"localhost:{listener.getsockname()[1]}"
    assert mpreqrep.do_request(address, "alive", 10 * UNIT) == "echo alive\r\n"
