"""Structured requests: a JSON-RPC 2.0 style server whose errors are replies.

Demonstrates validating untrusted input and answering every request, bad
ones included. A handler that raises makes the server close the connection
without a reply, which tells the client nothing; this one never raises for
what a client sends::

    mpreqrep serve workers.jsonrpc:JsonRpcServer --address localhost:0
    mpreqrep request localhost:PORT '{"method": "add", "params": [1, 2], "id": 7}'
    # prints: {"jsonrpc": "2.0", "result": 3, "id": 7}

Request: one JSON object on one line, with a string ``"method"``, optional
``"params"`` (an array for positional arguments, an object for keyword
arguments) and an optional ``"id"`` that the reply repeats. Reply: one JSON
object with either ``"result"`` or ``"error": {"code": ..., "message": ...}``.
The codes are JSON-RPC 2.0's: :data:`PARSE_ERROR`, :data:`INVALID_REQUEST`,
:data:`METHOD_NOT_FOUND`, :data:`INVALID_PARAMS` and :data:`INTERNAL_ERROR`
(the method raised; the traceback is logged, only the exception type is
sent). Batches and notifications are not supported: every request gets a
reply.

Add methods by subclassing; only methods named ``rpc_<name>`` can be called,
so no request can reach ``stop``, ``run`` or any other attribute::

    class GreetingServer(JsonRpcServer):
        def rpc_greet(self, name: str) -> str:
            return f"hello {name}"
"""

from __future__ import annotations

import inspect
import json
import logging
from typing import Any

from mpreqrep import RequestServer

logger = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
METHOD_PREFIX = "rpc_"


class JsonRpcError(Exception):
    """An error to send back as the reply; methods may raise it too.

    Args:
        code: a JSON-RPC error code such as :data:`INVALID_PARAMS`.
        message: a short description for the client.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class JsonRpcServer(RequestServer):
    """Dispatches ``{"method": ..., "params": ...}`` to its ``rpc_*`` methods."""

    def handle_request(self, request: str) -> str:
        """Decode the call, run the method, and encode its result or error.

        Args:
            request: one JSON object, trailing CRLF included.

        Returns:
            One line of JSON: a result or an error, never an exception.
        """
        try:
            call = parse_call(request)
        except JsonRpcError as exc:
            return encode_error(exc, None)
        request_id = call.get("id")
        try:
            result = self.call_method(call["method"], call.get("params"))
            return _encode({"jsonrpc": "2.0", "result": result, "id": request_id})
        except JsonRpcError as exc:
            return encode_error(exc, request_id)

    def call_method(self, name: str, params: Any) -> Any:
        """Run ``rpc_<name>`` with the params.

        Args:
            name: the method name without its prefix.
            params: a list, a dict or ``None``.

        Returns:
            What the method returned.

        Raises:
            JsonRpcError: no such method, params that do not fit its
                signature, or the method failed.
        """
        method = getattr(self, METHOD_PREFIX + name, None)
        if not callable(method):
            raise JsonRpcError(METHOD_NOT_FOUND, f"method not found: {name!r}")
        args, kwargs = _split_params(params)
        try:
            inspect.signature(method).bind(*args, **kwargs)
        except TypeError as exc:
            raise JsonRpcError(INVALID_PARAMS, f"invalid params for {name!r}: {exc}") from None
        try:
            return method(*args, **kwargs)
        except JsonRpcError:
            raise
        except Exception as exc:
            logger.exception("JSON-RPC method %r failed", name)
            raise JsonRpcError(INTERNAL_ERROR, f"{name!r} failed: {type(exc).__name__}") from exc

    def rpc_echo(self, value: Any) -> Any:
        """Return the value unchanged."""
        return value

    def rpc_add(self, a: float, b: float) -> float:
        """Add two numbers.

        Raises:
            JsonRpcError: ``INVALID_PARAMS`` if either is not a number.
        """
        if not (_is_number(a) and _is_number(b)):
            raise JsonRpcError(INVALID_PARAMS, "add expects two numbers")
        return a + b

    def rpc_methods(self) -> list[str]:
        """List the method names this server answers."""
        return sorted(
            name.removeprefix(METHOD_PREFIX) for name in dir(self) if name.startswith(METHOD_PREFIX)
        )


def parse_call(request: str) -> dict[str, Any]:
    """Decode a request into a call object.

    Args:
        request: the request text.

    Returns:
        The decoded object, whose ``"method"`` is a string.

    Raises:
        JsonRpcError: ``PARSE_ERROR`` for text that is not strict JSON
            (``NaN`` and ``Infinity`` included) or that nests too deeply,
            ``INVALID_REQUEST`` for JSON that is not a call.
    """
    try:
        call = json.loads(request, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise JsonRpcError(PARSE_ERROR, f"parse error: {type(exc).__name__}") from None
    if not isinstance(call, dict) or not isinstance(call.get("method"), str):
        raise JsonRpcError(INVALID_REQUEST, "expected an object with a string 'method'")
    return call


def encode_error(error: JsonRpcError, request_id: Any) -> str:
    """The reply for an error: ``{"jsonrpc": "2.0", "error": {...}, "id": ...}``."""
    body = {"code": error.code, "message": error.message}
    return _encode({"jsonrpc": "2.0", "error": body, "id": request_id})


def _split_params(params: Any) -> tuple[list[Any], dict[str, Any]]:
    """Positional or keyword arguments from ``params``."""
    if params is None:
        return [], {}
    if isinstance(params, list):
        return params, {}
    if isinstance(params, dict):
        return [], params
    raise JsonRpcError(INVALID_REQUEST, "params must be an array or an object")


def _encode(reply: dict[str, Any]) -> str:
    """One line of JSON; a result that JSON cannot hold becomes an internal error."""
    try:
        return json.dumps(reply, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        logger.error("JSON-RPC result cannot be encoded: %s", exc)
        error = JsonRpcError(INTERNAL_ERROR, "the result is not JSON")
        return encode_error(error, reply.get("id"))


def _reject_constant(name: str) -> Any:
    """Refuse ``NaN`` and ``Infinity``, which :func:`json.loads` accepts but JSON lacks."""
    raise ValueError(f"{name} is not JSON")


def _is_number(value: Any) -> bool:
    """Whether a decoded JSON value is a number (``true`` and ``false`` are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
