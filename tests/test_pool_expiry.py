"""The deadline timer of a pool, with hosts that only record what is asked of them."""

from __future__ import annotations

import time
from collections.abc import Callable

from mpreqrep._pool._expiry import DeadlineTimer


class Handle:
    def __init__(self, delay_s: float, callback: Callable[[], None]) -> None:
        self.delay_s = delay_s
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class RecordingHost:
    """A loop that keeps the timers set on it; the test makes them come due."""

    def __init__(self) -> None:
        self.timers: list[Handle] = []

    def call_soon(self, callback: Callable[[], None]) -> bool:
        raise AssertionError("the timer needs no queued call")

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Handle:
        self.timers.append(Handle(delay_s, callback))
        return self.timers[-1]

    def add_reader(self, fileobj: object, callback: Callable[[], None]) -> None:
        raise AssertionError("not a reader")

    def remove_reader(self, fileobj: object) -> None:
        raise AssertionError("not a reader")

    def live(self) -> list[Handle]:
        return [timer for timer in self.timers if not timer.cancelled]


def test_the_timer_is_set_once_for_the_earliest_deadline_and_again_only_when_earlier() -> None:
    host, fired = RecordingHost(), []
    timer = DeadlineTimer(host, fired.append)
    now = time.monotonic()
    timer.moved(None)  # no deadline: nothing to set
    assert host.timers == []
    timer.moved(now + 10)
    for later in (now + 10, now + 11, now + 12):  # what every later request brings
        timer.moved(later)
    assert len(host.timers) == 1 and 9 < host.timers[0].delay_s <= 10
    timer.moved(now + 5)  # earlier: the old timer goes, a new one is set
    assert host.timers[0].cancelled and len(host.live()) == 1
    assert 4 < host.live()[0].delay_s <= 5


def test_a_fired_timer_is_set_again_for_the_next_deadline_and_a_stale_one_does_nothing() -> None:
    host, fired = RecordingHost(), []
    timer = DeadlineTimer(host, fired.append)
    now = time.monotonic()
    timer.moved(now - 1)  # overdue already: due at once
    assert host.timers[0].delay_s <= -1
    host.timers[0].callback()
    (number,) = fired
    assert timer.fired(number)
    assert not timer.fired(number)  # twice: not the one set any more
    timer.moved(now + 3)  # the next deadline, later than the one that fired
    assert len(host.timers) == 2 and 2 < host.timers[1].delay_s <= 3
    host.timers[1].callback()
    assert timer.fired(fired[1])


def test_rehosting_cancels_the_old_host_s_timer_and_sets_one_on_the_new_host() -> None:
    home, io_loop, fired = RecordingHost(), RecordingHost(), []
    timer = DeadlineTimer(home, fired.append)
    deadline = time.monotonic() + 30
    timer.moved(deadline)
    timer.rehost(io_loop, deadline)
    assert home.timers[0].cancelled and len(io_loop.live()) == 1
    home.timers[0].callback()  # cancelled too late: it started on the old host anyway
    assert not timer.fired(fired[0])  # ... and does nothing
    io_loop.live()[0].callback()
    assert timer.fired(fired[1])
    timer.rehost(home, None)  # handed back with nothing running: nothing set
    assert home.live() == []
