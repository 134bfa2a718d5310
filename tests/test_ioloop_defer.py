"""The listener defers accepting until a client's first bytes (Linux)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

import mpreqrep
from mpreqrep._dispatch import InlineDispatcher
from mpreqrep._ioloop import DEFER_ACCEPT_S, IOLoop

from .conftest import UNIT, wait_until

pytestmark = pytest.mark.skipif(
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
