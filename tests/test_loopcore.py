"""Timers and queued calls of both selector loops: the I/O loop's Reactor and the
supervisor's SelectLoop, each driven the way its owner drives it."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from mpreqrep._loopcore import LoopCore
from mpreqrep._pool._loop import SelectLoop
from mpreqrep._reactor import Reactor

from .conftest import UNIT

pytestmark = pytest.mark.timeout(30 * UNIT)


class Driven:
    """A loop of either kind and the way to run one pass of it on this thread."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.loop: LoopCore
        if kind == "reactor":
            reactor = Reactor()
            reactor._watch_wakeups()  # this thread serves
            self.loop = reactor
        else:
            select_loop = SelectLoop()
            select_loop._bind_thread()  # as the supervisor thread does
            self.loop = select_loop

    def run_pass(self, timeout: float = 0.0) -> None:
        """One pass: wait for events up to the next timer (at most ``timeout``), run
        them, then the due timers, as the I/O loop and the supervisor do."""
        loop = self.loop
        due = loop._next_timer_at()
        wait = timeout if due is None else max(0.0, min(timeout, due - time.monotonic()))
        if isinstance(loop, SelectLoop):
            loop.run_once(wait)
            return
        assert isinstance(loop, Reactor)
        for key, _ in loop._selector.select(wait):
            key.data()
        loop._run_timers(time.monotonic())
        loop._end_pass()

    def close(self) -> None:
        loop = self.loop
        if isinstance(loop, SelectLoop):
            loop.close_loop()
        else:
            loop._refuse_calls()
            loop._close_selector()


@pytest.fixture(params=["reactor", "select_loop"])
def driven(request: pytest.FixtureRequest) -> Iterator[Driven]:
    loop = Driven(request.param)
    yield loop
    loop.close()


def run_until(driven: Driven, done: Callable[[], bool], timeout: float = 10 * UNIT) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        driven.run_pass(0.05)
    return True


def test_timers_run_in_due_order_and_ties_in_the_order_they_were_set(driven: Driven) -> None:
    ran: list[str] = []
    loop = driven.loop
    loop.call_later(0.03, lambda: ran.append("late"))
    for name in ("a", "b", "c"):  # the same delay: the order they were set
        loop.call_later(0.01, lambda name=name: ran.append(name))
    loop.call_later(-1.0, lambda: ran.append("past"))  # overdue: at the next pass
    driven.run_pass()
    assert ran == ["past"]
    assert run_until(driven, lambda: len(ran) == 5)
    assert ran == ["past", "a", "b", "c", "late"]
    assert loop._next_timer_at() is None


def test_a_timer_does_not_run_before_it_is_due(driven: Driven) -> None:
    ran: list[float] = []
    set_at = time.monotonic()
    driven.loop.call_later(0.05, lambda: ran.append(time.monotonic()))
    assert run_until(driven, lambda: bool(ran))
    assert ran[0] - set_at >= 0.05


def test_a_cancelled_timer_never_runs_even_when_cancelled_by_a_timer_due_with_it(
    driven: Driven,
) -> None:
    ran: list[str] = []
    loop = driven.loop
    loop.call_later(0.0, lambda: ran.append("cancelled")).cancel()
    first = loop.call_later(0.01, lambda: (ran.append("first"), second.cancel()))
    second = loop.call_later(0.01, lambda: ran.append("second"))
    kept = loop.call_later(0.02, lambda: ran.append("kept"))
    assert run_until(driven, lambda: "kept" in ran)
    assert ran == ["first", "kept"]
    assert first.cancelled and kept.cancelled  # run: cancelling them changes nothing
    later = loop.call_later(3600.0, lambda: ran.append("never"))
    later.cancel()
    assert loop._next_timer_at() is None  # a cancelled head leaves at once: no early wake


def test_a_failing_timer_is_logged_and_the_others_run(
    driven: Driven, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[int] = []

    def fail() -> None:
        raise ValueError("timer bug")

    driven.loop.call_later(0.0, fail)
    driven.loop.call_later(0.0, lambda: ran.append(1))
    with caplog.at_level(logging.ERROR, logger="mpreqrep"):
        driven.run_pass()
    assert ran == [1]
    assert "a timer on the" in caplog.text and "timer bug" in caplog.text


def test_a_timer_set_by_a_timer_runs_in_a_later_pass_even_with_no_delay(driven: Driven) -> None:
    ran: list[int] = []

    def again() -> None:
        ran.append(len(ran))
        driven.loop.call_later(0.0, again)  # would spin for ever within one pass

    driven.loop.call_later(0.0, again)
    driven.run_pass()
    assert ran == [0]
    driven.run_pass()
    assert ran == [0, 1]


def test_a_timer_set_from_another_thread_wakes_the_loop_and_runs_on_its_thread(
    driven: Driven,
) -> None:
    ran_on: list[int] = []
    setter = threading.Thread(
        target=driven.loop.call_later, args=(0.0, lambda: ran_on.append(threading.get_ident()))
    )
    setter.start()
    setter.join()
    started = time.monotonic()
    driven.run_pass(10 * UNIT)  # the wake-up makes the wait return: the timer is set
    assert run_until(driven, lambda: bool(ran_on))
    assert ran_on == [threading.get_ident()]
    assert time.monotonic() - started < 5 * UNIT


def test_a_timer_set_on_the_loop_thread_costs_no_wake_up(driven: Driven) -> None:
    driven.loop.call_later(3600.0, lambda: None)
    assert driven.loop._selector.select(0) == []  # no byte on the wake-up socket


def test_closing_drops_pending_timers_and_later_ones_never_run(driven: Driven) -> None:
    ran: list[str] = []
    loop = driven.loop
    due = loop.call_later(0.0, lambda: ran.append("due"))
    pending = loop.call_later(3600.0, lambda: ran.append("pending"))
    driven.close()
    assert due.cancelled and pending.cancelled
    assert loop._timers == []  # nothing kept alive by the closed loop
    assert loop.call_later(0.0, lambda: ran.append("after")).cancelled
    elsewhere: list[object] = []
    thread = threading.Thread(
        target=lambda: elsewhere.append(loop.call_later(0.0, lambda: ran.append("other")))
    )
    thread.start()
    thread.join()
    assert getattr(elsewhere[0], "cancelled", False)
    loop._run_timers(time.monotonic() + 7200)
    assert ran == []


def test_a_nan_delay_is_refused_and_an_infinite_one_never_comes_due(driven: Driven) -> None:
    with pytest.raises(ValueError, match="NaN"):
        driven.loop.call_later(math.nan, lambda: None)
    driven.loop.call_later(math.inf, lambda: None)
    assert driven.loop._next_timer_at() == math.inf
    driven.loop._run_timers(time.monotonic() + 1e300)
    assert driven.loop._next_timer_at() == math.inf  # still waiting, harmlessly


def test_a_select_loop_waits_at_most_an_hour_whatever_it_is_asked() -> None:
    loop = SelectLoop()
    loop.call_soon(lambda: None)  # the wake-up byte makes the wait return at once
    try:
        assert not loop.run_once(1e300)  # select() itself would overflow
    finally:
        loop.close_loop()


def test_a_base_exception_in_a_supervisor_timer_ends_supervision() -> None:
    loop = SelectLoop()
    loop._bind_thread()

    def end() -> None:
        raise SystemExit(3)

    loop.call_later(0.0, end)
    try:
        with pytest.raises(SystemExit):
            loop.run_once(0)
    finally:
        loop.close_loop()
