"""Deadline queues and select's timeout, without sockets (the connections are bare)."""

from __future__ import annotations

import time

import pytest

from mpreqrep._connection import Connection
from mpreqrep._deadlines import MAX_SELECT_TIMEOUT_S, Deadlines, forget_deadline, select_timeout
from mpreqrep._framing import LineReceiver


def bare_connection() -> Connection:
    """A connection state with no socket: the queues only look at its ``deadlines``."""
    return Connection(None, None, LineReceiver(10), 0.0)  # type: ignore[arg-type]


def test_expired_connections_come_out_in_order_and_the_rest_stay() -> None:
    queue = Deadlines(5.0)
    first, second, third = bare_connection(), bare_connection(), bare_connection()
    queue.schedule(first, 0.0)
    queue.schedule(second, 1.0)
    queue.schedule(third, 2.0)
    assert queue.next_deadline() == 5.0
    assert queue.pop_expired(6.0) == [first, second]
    assert first.deadlines is None and third.deadlines is queue
    assert queue.next_deadline() == 7.0
    assert queue.pop_expired(6.5) == []


def test_a_new_phase_forgets_the_old_deadline() -> None:
    reading, writing = Deadlines(1.0), Deadlines(3.0)
    conn = bare_connection()
    reading.schedule(conn, 0.0)
    writing.schedule(conn, 0.0)
    assert reading.next_deadline() is None and writing.next_deadline() == 3.0
    writing.schedule(conn, 10.0)  # progress: the deadline moves back, still one entry
    assert writing.pop_expired(12.0) == [] and writing.pop_expired(13.0) == [conn]
    forget_deadline(conn)  # none held: harmless
    assert conn.deadlines is None


def test_no_duration_holds_nothing() -> None:
    queue = Deadlines(None)
    conn = bare_connection()
    queue.schedule(conn, 0.0)
    assert conn.deadlines is None and queue.next_deadline() is None
    assert queue.pop_expired(1e300) == []


def test_select_timeout_takes_the_earliest_and_clamps_it() -> None:
    near, far = Deadlines(0.0), Deadlines(1e300)
    assert select_timeout(None, (near, far)) is None
    far.schedule(bare_connection(), time.monotonic())
    assert select_timeout(None, (near, far)) == MAX_SELECT_TIMEOUT_S
    assert select_timeout(time.monotonic() + 100.0, (near, far)) == pytest.approx(100.0, abs=5.0)
    near.schedule(bare_connection(), time.monotonic() - 1.0)
    assert select_timeout(time.monotonic() + 100.0, (far, near)) == 0.0
