"""Fuzzing the framing layer: any bytes, cut into any chunks, under any size cap.

After every chunk, :class:`LineReceiver` must agree with a reference model
of SPEC section 1 (the message ends at its first CRLF, kept, or at EOF; it
is decoded as UTF-8 with invalid sequences dropped) and section 5 (more than
``max_size`` bytes, CRLF included, without a CRLF is refused). Nothing but
:class:`RequestTooLargeError` may escape. ``test_framing.py`` feeds whole
messages and single bytes; here the chunk boundaries are arbitrary, so CRLFs
and multi-byte characters are split every possible way.

:func:`check_chunks` is also the body of the optional, longer atheris run
(``scripts/fuzz_framing_atheris.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from mpreqrep._errors import RequestTooLargeError
from mpreqrep._framing import LineReceiver, encode_message

PENDING = ("pending", None)
TOO_LARGE = ("too large", None)
Verdict = tuple[str, str | None]

# Pieces that make CRLFs, lone CRs and LFs and broken UTF-8 likely.
PIECES = [
    b"\r",
    b"\n",
    b"\r\n",
    b"a",
    b" ",
    b"\x00",
    b"\xff",
    b"\xc3",
    b"\xc3\xa9",
    b"\xe2\x82",
    b"\xe2\x82\xac",
    b"\xf0\x9f\x98",
    b"\xed\xa0\x80",
]
wire_bytes = st.lists(st.sampled_from(PIECES) | st.binary(max_size=12), max_size=80).map(b"".join)
size_caps = st.none() | st.integers(min_value=1, max_value=200)


def reference(fed: bytes, max_size: int | None) -> Verdict:
    """What the receiver must say once ``fed`` has arrived (and no EOF yet)."""
    end = fed.find(b"\r\n")
    size = len(fed) if end < 0 else end + 2
    if max_size is not None and size > max_size:
        return TOO_LARGE
    if end < 0:
        return PENDING
    return ("message", fed[:size].decode("utf-8", errors="ignore"))


def observe(receiver: LineReceiver, chunk: bytes) -> Verdict:
    """What the receiver says to one more chunk; only RequestTooLargeError is expected."""
    try:
        message = receiver.receive_data(chunk)
    except RequestTooLargeError:
        return TOO_LARGE
    return PENDING if message is None else ("message", message)


def check_chunks(chunks: Sequence[bytes], max_size: int | None) -> None:
    """Feed non-empty ``chunks`` one by one; assert agreement with the reference.

    Raises:
        AssertionError: the receiver and the reference disagree.
    """
    receiver = LineReceiver(max_size)
    fed = b""
    for chunk in chunks:
        fed += chunk
        verdict = observe(receiver, chunk)
        assert verdict == reference(fed, max_size), (fed, max_size, verdict)
        if verdict != PENDING:
            return
    assert receiver.buffered_size == len(fed)
    assert receiver.receive_eof() == fed.decode("utf-8", errors="ignore")


def cut(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """Split ``data`` at the given offsets into non-empty chunks."""
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


@settings(max_examples=400, deadline=None)
@given(wire_bytes, st.lists(st.integers(min_value=0), max_size=20), size_caps)
def test_any_chunking_agrees_with_the_reference(
    data: bytes, cuts: list[int], max_size: int | None
) -> None:
    check_chunks(cut(data, cuts), max_size)


@settings(max_examples=200, deadline=None)
@given(st.text(), st.lists(st.integers(min_value=0), max_size=10))
def test_encoded_text_frames_back_to_its_first_line(text: str, cuts: list[int]) -> None:
    wire = encode_message(text)
    first = text[: text.index("\r\n") + 2] if "\r\n" in text else text + "\r\n"
    assert reference(wire, None) == ("message", first)
    check_chunks(cut(wire, cuts), None)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=64), st.integers(min_value=1, max_value=8))
def test_a_line_of_exactly_the_cap_passes_and_one_more_byte_fails(
    max_size: int, chunk_size: int
) -> None:
    fits = b"x" * (max_size - 2) + b"\r\n" if max_size >= 2 else b"\r"
    too_long = b"y" * max_size + b"z"
    for data in (fits, too_long):
        chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
        check_chunks(chunks, max_size)
