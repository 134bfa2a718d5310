"""split_address and port_hash agree with yoton's, errors included."""

from __future__ import annotations

import socket
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpreqrep import port_hash, split_address

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


@given(addresses)
def test_split_address_matches_yoton(address: str) -> None:
    assert outcome(split_address, address) == outcome(YOTON_MISC.split_address, address)


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
    ],
)
def test_examples(address: str, expected: tuple[str, str, int]) -> None:
    assert split_address(address) == expected


@pytest.mark.parametrize(
    "address", ["localhost", "localhost:65536", "localhost:name+x", 8000, None]
)
def test_errors_are_value_errors(address: Any) -> None:
    with pytest.raises(ValueError):
        split_address(address)


def test_yoton_module_is_the_real_one(yoton: ModuleType) -> None:
    assert yoton.misc is YOTON_MISC
    assert "pyzo" in YOTON_MISC.__file__
