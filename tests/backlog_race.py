"""The backlog-close race, for real: a listener closed with a connection still queued."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable

from .conftest import UNIT

# How long after the connection reaches the backlog the listener closes: before the
# client sends, while it sends or half-closes, or while it waits for the reply.
CLOSE_DELAYS_S = (0.0, 0.0002, 0.001, 0.005)


def close_with_connection_in_backlog(call: Callable[[str], object], rounds: int) -> list[object]:
    """Run ``call(address)`` against listeners that never accept and close under it.

    Returns:
        What each call returned, or the exception it raised.
    """
    outcomes: list[object] = []
    for index in range(rounds):
        listener = socket.create_server(("127.0.0.1", 0), backlog=8)
        address = f"localhost:{listener.getsockname()[1]}"
        outcome: list[object] = []

        def client(address: str = address, outcome: list[object] = outcome) -> None:
            try:
                outcome.append(call(address))
            except Exception as exc:
                outcome.append(exc)

        thread = threading.Thread(target=client)
        thread.start()
        readable, _, _ = select.select([listener], [], [], 10 * UNIT)
        assert readable, "the client never connected"
        time.sleep(CLOSE_DELAYS_S[index % len(CLOSE_DELAYS_S)])
        listener.close()  # the kernel resets the queued connection
        thread.join(10 * UNIT)
        assert not thread.is_alive()
        outcomes.extend(outcome)
    return outcomes
