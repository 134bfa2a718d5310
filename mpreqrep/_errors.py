"""Exceptions of mpreqrep.

Owns the public :class:`NoServerError` and :class:`ReplyTooLargeError`, and the
internal framing errors. Knows
nothing of sockets, threads or processes.
"""

from __future__ import annotations


class NoServerError(RuntimeError, ConnectionError):
    """Nobody is listening at the address given to :func:`do_request`.

    A :class:`RuntimeError`, which is what yoton raises in that case, and a
    :class:`ConnectionError`, which is what a socket user expects.
    """


class ReplyTooLargeError(RuntimeError):
    """A reply grew past the client's ``max_reply_size`` before its first CRLF.

    Raised by :func:`do_request` and :func:`do_request_async` instead of
    buffering without bound what a broken or hostile server may send for
    ever; the connection is closed.
    """


class RequestTooLargeError(ValueError):
    """A message grew past its size cap before its first CRLF arrived."""


class RequestTimeoutError(TimeoutError):
    """A dispatcher gave up on a handler that ran past ``request_timeout``."""


class HandlerReturnTypeError(TypeError):
    """``handle_request`` returned something other than a ``str``."""
