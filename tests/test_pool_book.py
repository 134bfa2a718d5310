"""The pool's sans-I/O book, without a process, socket or thread (like h11's state tests)."""

from __future__ import annotations

import pytest

from mpreqrep._pool._book import HEAVY_DEPTH, MAX_BATCH_SIZE, STALLED_S, Book, Loss, Send, Sizing


def light(book: Book) -> None:
    """Make the book measure the handler as light (batching)."""
    for _ in range(3):
        book.sizing.observe(0.00001)


def test_a_request_goes_to_the_least_busy_worker_then_waits() -> None:
    book = Book()
    assert book.submit(0, 0.0) == []  # no worker yet: it waits
    assert book.add_worker(10, 0.0) == [Send(10, (0,))]
    assert book.add_worker(11, 0.0) == []
    assert book.submit(1, 0.0) == [Send(11, (1,))]
    assert book.submit(2, 0.0) == [Send(10, (2,))]
    assert book.submit(3, 0.0) == [Send(11, (3,))]
    assert book.submit(4, 0.0) == []  # heavy until measured: two per worker
    assert (book.in_flight(), book.waiting()) == (4, 1)
    assert book.running(10) == 0 and book.running(11) == 1


def test_a_reply_delivers_and_tops_the_worker_up() -> None:
    book = Book()
    book.add_worker(10, 0.0)
    for request in range(3):
        book.submit(request, 0.0)
    settled = book.settle(10, 0, 0.5, 0.0)
    assert settled.deliver and not settled.retired
    assert book.top_up(0.0) == [Send(10, (2,))]
    assert book.served(10) == 1 and book.running(10) == 1


def test_replies_out_of_order_or_from_strangers_are_ignored() -> None:
    book = Book()
    book.add_worker(10, 0.0)
    book.submit(0, 0.0)
    book.submit(1, 0.0)
    assert not book.settle(10, 1, 0.1, 0.0).deliver  # not the one it runs
    assert not book.settle(99, 0, 0.1, 0.0).deliver  # not a worker in the book
    assert book.running(10) == 0 and book.served(99) == 0


def test_waiting_requests_are_shared_out_in_batches_once_the_handler_is_light() -> None:
    book = Book()
    light(book)
    assert book.sizing.depth() == MAX_BATCH_SIZE
    for request in range(40):
        book.submit(request, 0.0)
    sends = book.add_worker(10, 0.0)
    assert sends == [Send(10, tuple(range(MAX_BATCH_SIZE)))]
    assert book.batches == 1
    sends = book.add_worker(11, 0.0)  # the first is full: the newcomer takes what fits
    assert sends == [Send(11, tuple(range(MAX_BATCH_SIZE, 2 * MAX_BATCH_SIZE)))]
    assert book.waiting() == 8


def test_a_light_handler_s_requests_are_packed_on_the_busiest_worker_with_room() -> None:
    book = Book()
    light(book)
    book.add_worker(10, 0.0)
    book.add_worker(11, 0.0)
    book.submit(0, 0.0)  # to an idle worker at once
    busy = next(worker for worker in book.workers() if book.running(worker) == 0)
    for request in range(1, 4):
        book.queue(request)
    assert book.top_up(0.0) == [Send(busy, (1, 2, 3))]  # the idle one stays asleep
    for request in range(4, 4 + MAX_BATCH_SIZE):
        book.queue(request)
    sends = book.top_up(0.0)  # the busy one up to its depth, the rest to the other
    assert [len(send.request_ids) for send in sends] == [MAX_BATCH_SIZE - 4, 4]
    assert sends[0].worker == busy and sends[1].worker != busy


def test_nothing_is_packed_behind_a_light_handler_s_request_that_stalls() -> None:
    book = Book()
    light(book)
    book.add_worker(10, 0.0)
    book.add_worker(11, 0.0)
    book.submit(0, 0.0)  # turns out slow
    slow = next(worker for worker in book.workers() if book.running(worker) == 0)
    other = 21 - slow
    book.queue(1)
    assert book.top_up(STALLED_S / 2) == [Send(slow, (1,))]  # not stalled yet: packed
    book.queue(2)
    book.queue(3)
    assert book.top_up(2 * STALLED_S) == [Send(other, (2, 3))]  # stalled: the idle one
    assert book.settle(other, 2, 0.00001, 2 * STALLED_S).deliver  # 3 starts there now
    book.queue(4)
    assert book.top_up(2.5 * STALLED_S) == [Send(other, (4,))]  # the busiest not stalled
    book.queue(5)
    assert book.top_up(10.0) == []  # both stall: it waits for the first to answer
    book.settle(slow, 0, 10.0, 10.0)
    assert book.top_up(10.0) == [Send(slow, (5,))]  # its next request just started


def test_a_heavy_handler_s_queued_requests_are_shared_out_evenly() -> None:
    book = Book()
    book.add_worker(10, 0.0)
    book.add_worker(11, 0.0)
    for request in range(3):
        book.queue(request)
    assert book.waiting() == 3
    assert book.top_up(0.0) == [Send(10, (0, 1)), Send(11, (2,))]


def test_sizing_is_heavy_until_measured_and_follows_the_average() -> None:
    sizing = Sizing()
    assert sizing.depth() == HEAVY_DEPTH
    sizing.observe(0.00001)
    assert sizing.depth() == MAX_BATCH_SIZE
    for _ in range(20):
        sizing.observe(0.01)
    assert sizing.depth() == HEAVY_DEPTH


def test_a_lost_worker_fails_only_its_running_request_and_resends_the_rest() -> None:
    book = Book()
    light(book)
    for request in range(6):
        book.submit(request, 0.0)
    assert book.add_worker(10, 0.0) == [Send(10, tuple(range(6)))]
    book.add_worker(11, 0.0)
    loss = book.lose(10, 0.0)
    assert loss.running == 0
    assert loss.resent == (1, 2, 3, 4, 5)
    assert loss.sends == (Send(11, (1, 2, 3, 4, 5)),)  # to the other worker, in order
    assert book.resent == 5
    assert list(book.workers()) == [11]


def test_a_light_request_goes_at_once_only_to_an_idle_worker() -> None:
    book = Book()
    light(book)
    book.add_worker(10, 0.0)
    assert book.submit(0, 0.0) == [Send(10, (0,))]
    assert book.submit(1, 0.0) == []  # busy: it waits for the reply, with the others
    assert book.submit(2, 0.0) == []
    book.settle(10, 0, 0.00001, 0.0)
    assert book.top_up(0.0) == [Send(10, (1, 2))]  # one frame


def test_a_lost_idle_worker_costs_nothing_and_resent_requests_go_first() -> None:
    book = Book()
    book.add_worker(10, 0.0)
    assert book.lose(10, 0.0) == Loss(None, (), ())
    book.add_worker(11, 0.0)
    book.submit(0, 0.0)
    book.submit(1, 0.0)
    book.submit(2, 0.0)  # waits
    loss = book.lose(11, 0.0)
    assert (loss.running, loss.resent) == (0, (1,))
    assert book.add_worker(12, 0.0) == [Send(12, (1, 2))]  # the resent one before the newer


def test_a_deadline_counts_from_when_a_request_starts_running() -> None:
    book = Book(timeout_s=1.0)
    book.add_worker(10, 0.0)
    book.submit(0, 5.0)
    book.submit(1, 5.0)
    assert book.next_deadline() == 6.0
    assert book.expire(5.9) == []
    book.settle(10, 0, 0.9, 5.9)  # request 1 starts now
    assert book.next_deadline() == 6.9


def test_an_expired_request_dooms_its_worker_and_is_not_failed_twice() -> None:
    book = Book(timeout_s=1.0)
    book.add_worker(10, 0.0)
    book.add_worker(11, 0.0)
    for request in range(4):
        book.submit(request, 0.0)
    assert book.expire(1.0) == [(10, 0), (11, 1)]
    assert book.expire(2.0) == []  # doomed: not again
    assert book.next_deadline() is None
    assert book.submit(4, 1.0) == []  # doomed workers take nothing
    # Worker 10 is killed before it answers: request 0 already failed, 2 never started.
    assert book.lose(10, 1.0) == Loss(None, (2,), ())
    # Worker 11 answered request 1 late: 3 started, so it fails with the kill.
    assert not book.settle(11, 1, 1.5, 1.5).deliver
    loss = book.lose(11, 1.6)
    assert (loss.running, loss.resent) == (3, ())
    assert book.waiting() == 2 and not book.is_idle()


def test_a_retiring_worker_gets_nothing_more_and_says_when_it_is_done() -> None:
    book = Book()
    book.add_worker(10, 0.0)
    book.submit(0, 0.0)
    assert not book.retire(10)  # still busy
    assert book.submit(1, 0.0) == []
    assert book.settle(10, 0, 0.1, 0.0).retired
    assert book.add_worker(11, 0.0) == [Send(11, (1,))]
    book.add_worker(12, 0.0)
    assert book.retire(12)  # idle: close at once


def test_shedding_takes_only_the_waiting_requests() -> None:
    book = Book()
    book.submit(0, 0.0)
    book.submit(1, 0.0)
    assert book.shed_waiting() == [0, 1]
    assert book.is_idle()


def test_a_request_no_longer_wanted_never_reaches_a_worker_and_leaves_the_book() -> None:
    unwanted = {1, 3, 4}
    asked: list[int] = []

    def claim(request: int) -> bool:
        asked.append(request)
        return request not in unwanted

    book = Book(claim=claim)
    for request in range(6):
        book.submit(request, 0.0)  # no worker yet: all wait
    assert book.add_worker(10, 0.0) == [Send(10, (0, 2))]  # 1 is skipped, the next fills in
    assert (book.in_flight(), book.waiting(), book.dropped) == (2, 3, 1)
    book.settle(10, 0, 0.5, 0.0)
    book.settle(10, 2, 0.5, 0.0)
    assert book.top_up(0.0) == [Send(10, (5,))]  # 3 and 4 are skipped too
    assert (book.in_flight(), book.waiting(), book.dropped) == (1, 0, 3)
    book.settle(10, 5, 0.5, 0.0)
    assert book.submit(4, 0.0) == []  # even with room, an unwanted one goes nowhere
    assert book.is_idle() and book.dropped == 4
    assert asked == [0, 1, 2, 3, 4, 5, 4]  # each asked once per hand-over


def test_a_resent_request_is_claimed_again_and_dropped_if_unwanted_by_then() -> None:
    wanted = {0, 1, 2}
    book = Book(claim=wanted.__contains__)
    book.add_worker(10, 0.0)
    book.submit(0, 0.0)
    book.submit(1, 0.0)
    wanted.discard(1)  # its owner gave up on it after it was sent
    loss = book.lose(10, 0.0)
    assert (loss.running, loss.resent, loss.sends) == (0, (1,), ())
    assert book.add_worker(11, 0.0) == []
    assert book.is_idle() and book.dropped == 1


def test_a_worker_cannot_join_twice() -> None:
    book = Book()
    book.add_worker(10, 0.0)
    with pytest.raises(ValueError, match="already"):
        book.add_worker(10, 0.0)
