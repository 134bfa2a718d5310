"""The loop core alone: queued calls, the wake-up socket, readers."""

from __future__ import annotations

import logging
import socket
import threading

import pytest

from mpreqrep._reactor import MAX_GATHERED_PASSES, Reactor, log_failure


def test_queued_calls_run_in_order_and_a_failing_one_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    core = Reactor()
    ran: list[int] = []

    def fail() -> None:
        raise ValueError("callback bug")

    assert core.call_soon(lambda: ran.append(1))
    assert core.call_soon(fail)
    assert core.call_soon(lambda: ran.append(2))
    core._watch_wakeups()
    with caplog.at_level(logging.ERROR, logger="mpreqrep"):
        for key, _ in core._selector.select(0):  # the wake-up socket is readable
            key.data()
    assert ran == [1, 2]
    assert "a callback queued on the I/O loop failed" in caplog.text
    assert core._selector.select(0) == []  # drained
    core._refuse_calls()
    assert not core.call_soon(lambda: ran.append(3))  # closed: the caller runs it
    core._close_selector()
    core._wake_nowait()  # after the close: harmless


def test_a_call_queued_on_the_loop_thread_costs_no_wake_up_and_runs_at_the_pass_end() -> None:
    core = Reactor()
    core._watch_wakeups()  # this thread serves from now on
    ran: list[int] = []
    assert core.call_soon(lambda: ran.append(1))
    assert core._selector.select(0) == []  # no wake-up byte was written
    core._end_pass()  # what the loop does at the end of each pass: nothing else is ready
    assert ran == [1]
    other = threading.Thread(target=core.call_soon, args=(lambda: ran.append(2),))
    other.start()
    other.join()
    assert len(core._selector.select(0)) == 1  # another thread's call wakes the loop
    core._refuse_calls()
    assert ran == [1, 2]
    assert not core.call_soon(lambda: ran.append(3))  # closed, on the loop thread too
    core._close_selector()
    assert ran == [1, 2]


def test_calls_queued_on_the_loop_thread_wait_while_events_keep_coming_up_to_a_bound() -> None:
    core = Reactor()
    core._watch_wakeups()
    ran: list[int] = []
    reader, writer = socket.socketpair()
    with reader, writer:
        core.add_reader(reader, lambda: None)
        writer.send(b"x")  # an event is ready: the next pass takes it first
        assert core.call_soon(lambda: ran.append(1))
        for _ in range(MAX_GATHERED_PASSES):
            core._end_pass()
            assert ran == []
        core._end_pass()  # put off long enough: it runs although events keep coming
        assert ran == [1]
        assert core.call_soon(lambda: ran.append(2))
        reader.recv(1)  # nothing ready any more
        core._end_pass()
        assert ran == [1, 2]
        core._end_pass()  # nothing queued: harmless
    core._refuse_calls()
    core._close_selector()


def test_readers_are_added_and_removed_harmlessly() -> None:
    core = Reactor()
    reader, writer = socket.socketpair()
    with reader, writer:
        core.add_reader(reader, lambda: None)
        writer.send(b"x")
        assert [key.fileobj for key, _ in core._selector.select(0)] == [reader]
        core.remove_reader(reader)
        core.remove_reader(reader)  # unwatched: harmless
        core._close_selector()
        core.remove_reader(reader)  # closed: harmless


def test_ctrl_c_propagates_only_on_the_main_thread(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(KeyboardInterrupt):
        log_failure(KeyboardInterrupt(), "not logged")
    thread = threading.Thread(target=log_failure, args=(KeyboardInterrupt(), "logged %s", "off"))
    with caplog.at_level(logging.ERROR, logger="mpreqrep"):
        thread.start()
        thread.join()
    assert "logged off" in caplog.text
