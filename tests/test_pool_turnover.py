"""Worker turnover without processes: rolling replacement, recycling, resizing."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mpreqrep._pool._turnover import Plan, Turnover


@dataclass
class W:
    pid: int
    ready: bool = True
    retired: bool = False
    started_at: float = 0.0


def apply(plan: Plan, table: dict[int, W]) -> None:
    for pid in plan.retire:
        table[pid].retired = True
    for pid in plan.drop:
        del table[pid]


def test_a_rolling_replacement_goes_one_worker_at_a_time() -> None:
    turnover = Turnover(2)
    table = {1: W(1), 2: W(2)}
    for pid in (1, 2):
        turnover.replace(pid, recycling=False)
    assert turnover.plan(list(table.values())) == Plan((), ())  # nobody else serves yet
    assert turnover.missing(table.values()) == 1
    table[3] = W(3, ready=False, started_at=1)
    assert turnover.missing(table.values()) == 0  # one at a time
    table[3].ready = True
    plan = turnover.plan(list(table.values()))
    assert plan == Plan((1,), ())  # the new one serves: the oldest retires
    apply(plan, table)
    assert turnover.missing(table.values()) == 1
    table[4] = W(4, started_at=2)
    apply(turnover.plan(list(table.values())), table)
    assert [pid for pid, w in table.items() if not w.retired] == [3, 4]
    assert turnover.awaiting() == 0


def test_recycling_retires_at_once_when_another_worker_serves() -> None:
    turnover = Turnover(2)
    table = {1: W(1), 2: W(2)}
    turnover.replace(1, recycling=True)
    apply(turnover.plan(list(table.values())), table)
    assert table[1].retired and turnover.missing(table.values()) == 1
    turnover.replace(2, recycling=True)  # the last one serving: it waits
    assert turnover.plan(list(table.values())) == Plan((), ())
    table[3] = W(3, ready=False)
    assert turnover.plan(list(table.values())) == Plan((), ())
    table[3].ready = True
    assert turnover.plan(list(table.values())) == Plan((2,), ())


def test_a_single_worker_recycles_at_once() -> None:
    turnover = Turnover(1)
    turnover.replace(1, recycling=True)
    assert turnover.plan([W(1)]) == Plan((1,), ())


def test_resizing_down_drops_starting_workers_first_then_the_oldest() -> None:
    turnover = Turnover(3)
    table = [W(1, started_at=1), W(2, started_at=2), W(3, ready=False, started_at=3)]
    turnover.resize(1)
    assert turnover.plan(table) == Plan((1,), (3,))
    assert turnover.missing(table) == 0
    turnover.resize(4)
    assert turnover.missing(table) == 1


def test_gone_workers_are_forgotten_and_bad_sizes_refused() -> None:
    turnover = Turnover(1)
    turnover.replace(7, recycling=False)
    turnover.forget(7)
    assert turnover.awaiting() == 0
    turnover.replace(8, recycling=False)
    assert turnover.plan([W(9, ready=False)]) == Plan((), ())  # 8 is not in the table
    with pytest.raises(ValueError, match="at least 1"):
        turnover.resize(0)
