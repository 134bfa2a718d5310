"""Address parsing: ``"[protocol://]host:port"`` into its parts (SPEC section 2).

Pure functions that behave like yoton's ``split_address`` and ``port_hash``,
errors included, on every address yoton reads one way only. Beyond yoton:
IPv6 in brackets (``"[::1]:8000"``), and a ``ValueError`` for what yoton
misreads: an unbracketed form with more than one colon (``"::1:0"``, which
yoton reads as host ``""`` and a hashed port), a negative port, or a host
that cannot be one (brackets, spaces, ``/``). Touches the network only to
resolve ``publichostN`` through :func:`socket.gethostbyname_ex`.
"""

from __future__ import annotations

import socket

PORT_HASH_FACTOR = 0xD2D84A61
FIRST_DYNAMIC_PORT = 49152
PORT_HASH_RANGE = 2**14
PORT_LIMIT = 2**16
PUBLIC_HOST = "publichost"
SERVED_PROTOCOL = "tcp"
_NOT_IN_HOSTS = frozenset("[]/\\@?#%")


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
            (``127.0.0.1``, as in yoton), ``publichost[N]``, or an IPv6
            address in brackets (``"[::1]:8000"``); the port an int, or a
            name hashed by :func:`port_hash`, optionally with ``+offset``.

    Returns:
        ``(protocol, host, port)``; the protocol is lower-cased, ``tcp`` by
        default; an IPv6 host comes without its brackets.

    Raises:
        ValueError: not a string, no ``:``, more than one ``:`` outside
            brackets, a malformed host or IPv6 address, a bad offset, a port
            outside 0 to 65535, or no public address of that index.
    """
    if not isinstance(address, str):
        raise ValueError("Address should be a string.")
    protocol, _, rest = address.rpartition("://")
    if rest.startswith("["):
        host, port_text = _split_bracketed(rest)
    else:
        host_text, port_text = _split_plain(rest)
        host = _resolve_host(host_text)  # before the port: yoton reports host errors first
    port = _parse_port(port_text)
    if not 0 <= port < PORT_LIMIT:
        raise ValueError("The port must be in the range [0, 2^16>.")
    return protocol.lower() or SERVED_PROTOCOL, host, port


def tcp_endpoint(address: str) -> tuple[str, int]:
    """The host and port of an address whose protocol is tcp, the only one served.

    Raises:
        ValueError: as :func:`split_address`, or another protocol.
    """
    protocol, host, port = split_address(address)
    if protocol != SERVED_PROTOCOL:
        raise ValueError(f"only tcp is served, not {protocol!r}")
    return host, port


def format_address(host: str, port: int) -> str:
    """``"host:port"``, with an IPv6 host in brackets: what :func:`split_address` reads."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_plain(rest: str) -> tuple[str, str]:
    """Split ``host:port``; one colon only, so that no IPv6 address is misread."""
    if ":" not in rest:
        raise ValueError("Address should be in format 'host:port'.")
    host, port_text = rest.split(":", 1)
    if ":" in port_text:
        raise ValueError(
            f"Ambiguous address {rest!r}: write an IPv6 address in brackets, as '[::1]:port'."
        )
    if any(char.isspace() or char in _NOT_IN_HOSTS for char in host):
        raise ValueError(f"Invalid host {host!r} in address.")
    return host, port_text


def _split_bracketed(rest: str) -> tuple[str, str]:
    """Split ``[IPv6 address]:port`` into the address (checked) and the port text."""
    host, bracket, after = rest[1:].partition("]")
    if not bracket or not after.startswith(":") or len(after) == 1:
        raise ValueError("Address should be in format '[IPv6 address]:port'.")
    try:
        socket.inet_pton(socket.AF_INET6, host.partition("%")[0])  # "%" starts a scope id
    except OSError:
        raise ValueError(f"Invalid IPv6 address {host!r} in address.") from None
    return host, after[1:]


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
