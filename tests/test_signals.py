"""SignalWaiter: real signals to this process (and to one of its threads) wake a
select() in the main thread through the wake-up fd; everything is put back after."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from types import FrameType

import pytest

from mpreqrep._signals import OPERATION_SIGNALS, SHUTDOWN_SIGNALS, SignalWaiter

from .conftest import UNIT

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")

USR1 = signal.SIGUSR1
USR2 = signal.SIGUSR2


@pytest.fixture(autouse=True)
def own_handlers() -> Iterator[None]:
    """Give SIGUSR1/SIGUSR2 the tests' own handlers, restored afterwards."""
    previous = {signum: signal.signal(signum, lambda s, f: None) for signum in (USR1, USR2)}
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def test_the_signal_sets_of_this_platform() -> None:
    assert SHUTDOWN_SIGNALS[:2] == (signal.SIGINT, signal.SIGTERM)
    assert OPERATION_SIGNALS == (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)


def test_signals_come_back_in_order_and_reach_on_signal() -> None:
    seen: list[int] = []
    with SignalWaiter([USR1, USR2], seen.append) as waiter:
        for signum in (USR1, USR2, USR1):
            os.kill(os.getpid(), signum)
        assert waiter.wait(10 * UNIT) == [USR1, USR2, USR1]
    assert seen == [USR1, USR2, USR1]


def test_a_signal_delivered_to_another_thread_wakes_the_main_thread() -> None:
    """The case a plain wait in the main thread misses: the kernel (here
    pthread_kill) runs the handler's C part in a thread that is not the main one."""
    with SignalWaiter([USR1]) as waiter:

        def signal_this_thread() -> None:
            signal.pthread_kill(threading.get_ident(), USR1)

        thread = threading.Thread(target=signal_this_thread)
        began = time.monotonic()
        thread.start()
        assert waiter.wait(60 * UNIT) == [USR1]
        assert time.monotonic() - began < 10 * UNIT
        thread.join(10 * UNIT)


def test_notify_wakes_the_wait_from_another_thread() -> None:
    with SignalWaiter([USR1]) as waiter:
        thread = threading.Thread(target=waiter.notify)
        began = time.monotonic()
        thread.start()
        assert waiter.wait(60 * UNIT) == []
        assert time.monotonic() - began < 10 * UNIT
        thread.join(10 * UNIT)


def test_a_wait_times_out_and_a_zero_wait_only_collects() -> None:
    with SignalWaiter([USR1]) as waiter:
        began = time.monotonic()
        assert waiter.wait(0.05 * UNIT) == []
        assert time.monotonic() - began >= 0.05 * UNIT
        os.kill(os.getpid(), USR1)
        assert waiter.wait(-1.0) == [USR1]
        assert waiter.wait(0) == []


def test_other_signals_with_python_handlers_are_not_reported() -> None:
    with SignalWaiter([USR1]) as waiter:
        os.kill(os.getpid(), USR2)  # written to the wake-up fd too: it has a Python handler
        assert waiter.wait(0) == []
        os.kill(os.getpid(), USR1)
        assert waiter.wait(10 * UNIT) == [USR1]


def test_notify_never_blocks_nor_fails_when_nobody_reads_or_after_the_end() -> None:
    with SignalWaiter([USR1]) as waiter:
        for _ in range(20_000):  # far more than the socket buffer holds
            waiter.notify()
        assert waiter.wait(0) == []
        os.kill(os.getpid(), USR1)
        assert waiter.wait(10 * UNIT) == [USR1]
    waiter.notify()  # the sockets are closed: a late notify from a thread is harmless


def test_the_previous_handlers_and_wakeup_fd_are_put_back() -> None:
    def previous_handler(signum: int, frame: FrameType | None) -> None: ...

    signal.signal(USR1, previous_handler)
    receiver, sender = socket.socketpair()
    sender.setblocking(False)
    with receiver, sender:
        signal.set_wakeup_fd(sender.fileno())
        try:
            with SignalWaiter([USR1]):
                assert signal.getsignal(USR1) is not previous_handler
            assert signal.getsignal(USR1) is previous_handler
        finally:
            assert signal.set_wakeup_fd(-1) == sender.fileno()


def test_a_failure_to_install_puts_everything_back() -> None:
    before = signal.getsignal(USR1)
    with pytest.raises((OSError, ValueError)), SignalWaiter([USR1, signal.SIGKILL]):
        pass  # SIGKILL cannot be handled
    assert signal.getsignal(USR1) is before
    assert signal.set_wakeup_fd(-1) == -1
