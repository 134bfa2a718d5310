"""Address parsing: ``"[protocol://]host:port"`` into its parts (SPEC section 2).

Pure functions that behave exactly like yoton's ``split_address`` and
``port_hash``, errors included. Touches the network only to resolve
``publichostN`` through :func:`socket.gethostbyname_ex`.
"""

from __future__ import annotations

import socket

PORT_HASH_FACTOR = 0xD2D84A61
FIRST_DYNAMIC_PORT = 49152
PORT_HASH_RANGE = 2**14
PORT_LIMIT = 2**16
PUBLIC_HOST = "publichost"


def port_hash(name: str) -> int:
    """Map a name to a port in the dynamic range, as yoton does.

    Args:
        name: any string.

    Returns:
        A port from 49152 to 65535, the same number yoton gives.
    """
    val = 0
    for char in name:
        val += (val >> 3) + ord(char) * PORT_HASH_FACTOR
    val += (val >> 3) + len(name) * PORT_HASH_FACTOR
    return FIRST_DYNAMIC_PORT + val % PORT_HASH_RANGE


def split_address(address: str) -> tuple[str, str, int]:
    """Split an address into protocol, host and port.

    Args:
        address: ``"[protocol://]host:port"``. The host may be ``localhost``
            or ``publichost[N]``; the port an int, or a name hashed by
            :func:`port_hash`, optionally with ``+offset``.

    Returns:
        ``(protocol, host, port)``; the protocol is lower-cased, ``tcp`` by
        default.

    Raises:
        ValueError: not a string, no ``:``, a bad offset, a port of 65536 or
            more, or no public address of that index.
    """
    if not isinstance(address, str):
        raise ValueError("Address should be a string.")
    protocol, _, rest = address.rpartition("://")
    if ":" not in rest:
        raise ValueError("Address should be in format 'host:port'.")
    host_text, port_text = rest.split(":", 1)
    host = _resolve_host(host_text)  # before the port: yoton reports host errors first
    port = _parse_port(port_text)
    if port >= PORT_LIMIT:
        raise ValueError("The port must be in the range [0, 2^16>.")
    return protocol.lower() or "tcp", host, port


def _resolve_host(host: str) -> str:
    """Translate ``localhost`` and ``publichost[N]``; keep any other host."""
    lowered = host.lower()
    if lowered == "localhost":
        return "127.0.0.1"
    if lowered == PUBLIC_HOST:
        lowered = PUBLIC_HOST + "0"
    index_text = lowered[len(PUBLIC_HOST) :]
    if not lowered.startswith(PUBLIC_HOST) or not set(index_text) <= set("0123456789"):
        return host
    index = int(index_text)
    addresses = socket.gethostbyname_ex(socket.gethostname())[2]
    if index >= len(addresses):
        raise ValueError(f"Invalid index ({index}) in public host addresses.")
    return addresses[index]


def _parse_port(port_text: str) -> int:
    """Read an int port, or hash a port name with an optional ``+offset``."""
    try:
        return int(port_text)
    except ValueError:
        pass
    name, plus, offset_text = port_text.partition("+")
    offset = 0
    if plus:
        try:
            offset = int(offset_text)
        except ValueError:
            raise ValueError("Invalid offset in address") from None
    return port_hash(name) + offset
