"""The framing layer, with bytes only: whole, a byte at a time, with trailing junk."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpreqrep._errors import RequestTooLargeError
from mpreqrep._framing import LineReceiver, decode_message, encode_message


def feed_whole(data: bytes, max_size: int | None = None) -> str:
    receiver = LineReceiver(max_size)
    message = receiver.receive_data(data) if data else None
    return receiver.receive_eof() if message is None else message


def feed_bytewise(data: bytes, max_size: int | None = None) -> str:
    receiver = LineReceiver(max_size)
    for index in range(len(data)):
        message = receiver.receive_data(data[index : index + 1])
        if message is not None:
            return message
    return receiver.receive_eof()


FEEDERS = [feed_whole, feed_bytewise]


def reference(data: bytes) -> str:
    """What the SPEC says the message is: up to the first CRLF, or all, decoded."""
    end = data.find(b"\r\n")
    kept = data if end < 0 else data[: end + 2]
    return kept.decode("utf-8", "ignore")


@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"hello\r\n", "hello\r\n"),
        (b"hello\r\ntrailing junk\r\n", "hello\r\n"),
        (b"no line end", "no line end"),
        (b"\r\n", "\r\n"),
        (b"lone \r and \n\r\n", "lone \r and \n\r\n"),
        (b"caf\xc3\xa9\r\n", "café\r\n"),
        (b"bad \xff\xfe utf8\r\n", "bad  utf8\r\n"),
        (b"cut \xe2\x82", "cut "),
    ],
)
def test_messages(feed, data: bytes, expected: str) -> None:
    assert feed(data) == expected


@pytest.mark.parametrize("feed", FEEDERS)
def test_oversize_without_crlf_is_refused(feed) -> None:
    with pytest.raises(RequestTooLargeError):
        feed(b"x" * 11, max_size=10)


@pytest.mark.parametrize("feed", FEEDERS)
def test_size_cap_counts_the_crlf(feed) -> None:
    assert feed(b"x" * 8 + b"\r\n", max_size=10) == "x" * 8 + "\r\n"
    with pytest.raises(RequestTooLargeError):
        feed(b"x" * 9 + b"\r\n", max_size=10)


def test_trailing_junk_after_crlf_does_not_count_against_the_cap() -> None:
    assert LineReceiver(10).receive_data(b"ok\r\n" + b"j" * 100) == "ok\r\n"


def test_eof_with_nothing_is_empty() -> None:
    receiver = LineReceiver(10)
    assert receiver.buffered_size == 0
    assert receiver.receive_eof() == ""


def test_crlf_split_across_chunks() -> None:
    receiver = LineReceiver()
    assert receiver.receive_data(b"abc\r") is None
    assert receiver.receive_data(b"\nmore") == "abc\r\n"


@pytest.mark.parametrize(
    ("text", "wire"),
    [
        ("hi", b"hi\r\n"),
        ("hi\r\n", b"hi\r\n"),
        ("hi\n", b"hi\n\r\n"),
        ("", b"\r\n"),
        ("é", b"\xc3\xa9\r\n"),
    ],
)
def test_encode_appends_crlf_unless_present(text: str, wire: bytes) -> None:
    assert encode_message(text) == wire


def test_decode_drops_invalid_sequences() -> None:
    assert decode_message(b"a\x80b") == "ab"


@given(st.binary(max_size=300), st.binary(max_size=50))
def test_any_bytes_match_the_reference(data: bytes, junk: bytes) -> None:
    expected = reference(data)
    assert feed_whole(data) == expected
    assert feed_bytewise(data) == expected
    if b"\r\n" in data:
        assert feed_whole(data + junk) == expected


@given(st.binary(max_size=200), st.integers(min_value=1, max_value=100))
def test_cap_is_enforced_the_same_way_however_bytes_arrive(data: bytes, cap: int) -> None:
    outcomes = []
    for feed in FEEDERS:
        try:
            outcomes.append(feed(data, max_size=cap))
        except RequestTooLargeError:
            outcomes.append(None)
    assert outcomes[0] == outcomes[1]
    if outcomes[0] is not None:
        assert outcomes[0] == reference(data)


@given(st.text(max_size=100))
def test_encode_then_frame_round_trips(text: str) -> None:
    wire = encode_message(text)
    framed = feed_whole(wire)
    assert framed.endswith("\r\n")
    assert text.startswith(framed[:-2]) or text == framed


@pytest.mark.parametrize(
    ("reads", "expected"),
    [([b"ab", b"c\r\n"], "abc\r\n"), ([b"ab", b""], "ab"), ([b""], "")],
)
def test_receive_takes_reads_with_empty_meaning_eof(reads: list[bytes], expected: str) -> None:
    receiver = LineReceiver()
    results = [receiver.receive(data) for data in reads]
    assert results[-1] == expected
    assert all(result is None for result in results[:-1])
