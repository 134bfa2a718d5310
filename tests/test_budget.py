"""The bound on buffered bytes, without sockets; time comes from a fake clock."""

from __future__ import annotations

import pytest

from mpreqrep import _budget
from mpreqrep._budget import REPLY_SIZE_MEMORY_S, BufferBudget
from mpreqrep._connection import Connection
from mpreqrep._framing import LineReceiver


class FakeClock:
    """Stands in for the ``time`` module: ``monotonic`` returns ``now``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(_budget, "time", fake)
    return fake


def bare_connection() -> Connection:
    return Connection(None, None, LineReceiver(10), 0.0)  # type: ignore[arg-type]


def test_held_bytes_follow_each_connection() -> None:
    budget = BufferBudget(100)
    one, two = bare_connection(), bare_connection()
    budget.hold(one, 60)
    budget.hold(two, 30)
    budget.hold(one, 10)  # part of its reply went out
    assert budget.held == 40 and budget.has_room(0)
    budget.hold(two, 90)
    assert budget.held == 100 and not budget.has_room(0)
    budget.hold(one, 0)
    budget.hold(two, 0)
    assert budget.held == 0


def test_no_bound_always_has_room() -> None:
    budget = BufferBudget(None)
    budget.hold(bare_connection(), 10**12)
    budget.note_reply(10**12)
    assert budget.has_room(10**6)


def test_requests_in_flight_count_as_the_last_large_reply(clock: FakeClock) -> None:
    budget = BufferBudget(1000)
    assert budget.has_room(5)  # no reply seen yet: in flight counts as nothing
    budget.note_reply(300)
    assert budget.has_room(3) and not budget.has_room(4)
    budget.note_reply(10)  # smaller, within the memory: the large one still counts
    assert not budget.has_room(4)
    clock.now += REPLY_SIZE_MEMORY_S
    assert budget.has_room(50)  # forgotten
    budget.note_reply(10)
    assert budget.has_room(99) and not budget.has_room(100)
