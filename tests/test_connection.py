"""Closing an accepted socket: SHUT_WR then close, or a reset for a reply cut short."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from mpreqrep._connection import LINGER_RESET, close_socket

from .conftest import UNIT


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected loopback TCP pair: (server side, client side)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=10 * UNIT)
        server, _ = listener.accept()
    with client, server:
        yield server, client


def test_a_plain_close_flushes_then_ends_with_eof(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    server.sendall(b"reply")
    close_socket(server, reset=False)
    assert server.fileno() == -1
    assert client.recv(100) == b"reply" and client.recv(100) == b""


def test_a_reset_close_tells_the_client_the_reply_is_cut(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    close_socket(server, reset=True)
    assert server.fileno() == -1
    with pytest.raises(ConnectionResetError):
        client.recv(100)


def test_closing_after_the_peer_is_gone_never_raises(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    client.close()  # a reset: the server side's shutdown may fail now
    close_socket(server, reset=False)
    assert server.fileno() == -1
