"""split_address and port_hash agree with yoton's, errors included, except
where yoton misreads an address (then ours is a ValueError); IPv6 in brackets."""

from __future__ import annotations

import socket
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpreqrep import port_hash, split_address
from mpreqrep._address import format_address, tcp_endpoint

from .conftest import import_yoton

YOTON_MISC = import_yoton().misc


def outcome(function: Any, argument: object) -> tuple[str, object]:
    """The result, or the exception type and message, of one call."""
    try:
        return ("ok", function(argument))
    except Exception as exc:
        return (type(exc).__name__, str(exc))


@given(st.text())
def test_port_hash_matches_yoton(name: str) -> None:
    assert port_hash(name) == YOTON_MISC.port_hash(name)


@given(st.text())
def test_port_hash_is_in_the_dynamic_range(name: str) -> None:
    assert 49152 <= port_hash(name) < 65536


host_parts = st.one_of(
    st.sampled_from(["localhost", "LocalHost", "127.0.0.1", "example.org", "", "publichost9999"]),
    st.text(alphabet=st.characters(blacklist_characters=":"), max_size=12).filter(
        lambda host: not host.lower().startswith("publichost")
    ),
)
port_parts = st.one_of(
    st.integers(min_value=-10, max_value=70000).map(str),
    st.text(max_size=12),
    st.builds(lambda n, o: f"{n}+{o}", st.text(max_size=8), st.text(max_size=4)),
    st.builds(lambda n, o: f"{n}+{o}", st.text(max_size=8), st.integers(-100, 20000)),
)
addresses = st.one_of(
    st.builds(lambda h, p: f"{h}:{p}", host_parts, port_parts),
    st.builds(
        lambda s, h, p: f"{s}://{h}:{p}",
        st.sampled_from(["tcp", "TCP", "itc", ""]),
        host_parts,
        port_parts,
    ),
    st.text(max_size=20),
)


def misread_by_yoton(address: str, yotons: tuple[str, object]) -> bool:
    """``address`` is ambiguous or malformed, whatever yoton made of it: another
    colon in the port part (an unbracketed IPv6 address), a host no machine
    can have, or a port yoton accepted although it is negative."""
    host, _, port_text = address.rpartition("://")[2].partition(":")
    bad_host = any(char.isspace() or char in "[]/\\@?#%" for char in host)
    negative = yotons[0] == "ok" and yotons[1][2] < 0  # type: ignore[index]
    return ":" in port_text or bad_host or negative


@given(addresses)
def test_split_address_matches_yoton(address: str) -> None:
    ours, yotons = outcome(split_address, address), outcome(YOTON_MISC.split_address, address)
    if ours != yotons:
        assert ours[0] == "ValueError", (ours, yotons)
        assert misread_by_yoton(address, yotons), (address, ours, yotons)


@pytest.mark.parametrize(
    "address",
    ["publichost:80", "PUBLICHOST0:80", "publichost1:80", "publichost99:80", "publichostx:80"],
)
def test_publichost_matches_yoton(address: str) -> None:
    assert outcome(split_address, address) == outcome(YOTON_MISC.split_address, address)


def test_publichost_is_the_first_public_address() -> None:
    expected = socket.gethostbyname_ex(socket.gethostname())[2][0]
    assert split_address("publichost:1") == ("tcp", expected, 1)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("localhost:8000", ("tcp", "127.0.0.1", 8000)),
        ("tcp://localhost:0", ("tcp", "127.0.0.1", 0)),
        ("TCP://host:1", ("tcp", "host", 1)),
        ("localhost:test", ("tcp", "127.0.0.1", port_hash("test"))),
        ("localhost:test+3", ("tcp", "127.0.0.1", port_hash("test") + 3)),
        ("[::1]:0", ("tcp", "::1", 0)),
        ("tcp://[::]:8000", ("tcp", "::", 8000)),
        ("[fe80::1%lo]:80", ("tcp", "fe80::1%lo", 80)),
        ("[2001:db8::7]:name", ("tcp", "2001:db8::7", port_hash("name"))),
        ("localhost:65535", ("tcp", "127.0.0.1", 65535)),
    ],
)
def test_examples(address: str, expected: tuple[str, str, int]) -> None:
    assert split_address(address) == expected


@pytest.mark.parametrize(
    "address",
    [
        "localhost",
        "localhost:65536",
        "localhost:name+x",
        8000,
        None,
        "localhost:-1",  # yoton: port -1 (OverflowError at bind)
        "localhost:name+-70000",
        "::1:0",  # yoton: host "" and a hashed port: ambiguous
        "fe80::1:80",
        "localhost:a:b",
        "[::1]",
        "[::1]:",
        "[::1]x:80",
        "[::1:80",
        "[127.0.0.1]:80",  # brackets are for IPv6 only
        "[not an address]:80",
        "[::1]:-1",
        "[::1]:99999",
        "local host:80",
        "a/b:80",
        "a]:80",
    ],
)
def test_errors_are_value_errors(address: Any) -> None:
    with pytest.raises(ValueError):
        split_address(address)


@pytest.mark.parametrize("address", ["udp://localhost:1", "itc://localhost:1", "zmq://[::1]:1"])
def test_tcp_endpoint_rejects_other_protocols(address: str) -> None:
    with pytest.raises(ValueError, match="only tcp"):
        tcp_endpoint(address)


@pytest.mark.parametrize(
    ("host", "port", "text"), [("::1", 5, "[::1]:5"), ("127.0.0.1", 80, "127.0.0.1:80")]
)
def test_format_address_is_what_split_address_reads(host: str, port: int, text: str) -> None:
    assert format_address(host, port) == text
    assert tcp_endpoint(text) == (host, port)


def test_yoton_module_is_the_real_one(yoton: ModuleType) -> None:
    assert yoton.misc is YOTON_MISC
    assert "pyzo" in YOTON_MISC.__file__
