"""The worker-process side of process mode: load the handler once, serve a channel.

loky's process context starts each worker with :func:`worker_main` as its
target. The worker first connects a *lifeline* to the parent and watches it
from a thread, then loads the handler, then connects its *channel*, says
hello and answers the requests the parent writes to it, one reply frame per
request, in order, until the parent closes the channel::

    parent (server process)                         worker process
    -----------------------                         --------------
    listener ◀── lifeline: token + Lifeline(pid) ── watchdog thread: recv()
                                                      EOF = the parent died:
                                                      remove the socket
                                                      directory, os._exit
             ◀── channel: token + Hello(pid) ────── main thread, after loading
    [(id, text), ...] ──▶                             handle_request, in order
             ◀── Outcome(id, reply | error) ────────
    close ──▶                                        EOF: return (process exits)

So a request costs two socket writes, and the parent always knows what a
worker is running: the oldest request it sent there and has no reply for.
A worker that cannot load the handler says why (:class:`InitFailed`) on a
connection of its own and exits with status 1, printing nothing.

A worker whose RSS reaches the memory cap says so once, before its next
reply, and serves on: the parent retires it through the same one-at-a-time
path as a restart (once another worker serves), and it exits when the
parent closes the channel. Whatever a handler raises, ``BaseException``
included, and a reply that is not encodable text, become that request's
error; the worker keeps serving.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import shutil
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import psutil
from loky.backend.reduction import dumps as loky_dumps

from ._channel import RECV_CHUNK_SIZE, Address, FrameReader, connect, encode_frame, frame_of
from ._dispatch import Handler, run_handler

EXIT_INIT_FAILED = 1
"""Exit status of a worker that could not load the handler."""

EXIT_ORPHANED = 70
"""Exit status of a worker whose parent died."""

PARENT_GONE_WAIT_S = 0.05
"""How long a worker whose channel ended waits for its lifeline to end too (the
parent died, closing both at once) before it exits as if the parent closed it."""


class Outcome(NamedTuple):
    """What became of one request in a worker: its reply, or an error and its traceback."""

    request_id: int
    reply: str = ""
    error: BaseException | None = None
    traceback: str = ""
    elapsed_s: float = 0.0


class Lifeline(NamedTuple):
    """A worker's first connection, which it watches for the parent's death."""

    pid: int


class Hello(NamedTuple):
    """The first message on a worker's channel: it loaded the handler."""

    pid: int


class InitFailed(NamedTuple):
    """Sent on a connection of its own by a worker that could not load the handler."""

    pid: int
    summary: str
    traceback: str


class Retiring(NamedTuple):
    """The worker reached the memory cap: the parent is to recycle it."""

    pid: int


class ReplyEncodingError(ValueError):
    """``handle_request`` returned text that cannot be encoded as UTF-8."""


class HandlerBaseException(RuntimeError):
    """``handle_request`` raised a ``BaseException`` that is not an ``Exception``."""


@dataclass
class _WorkerState:
    """This worker process's handler copy and its memory cap."""

    handler: Handler
    max_rss: int | None
    process: psutil.Process
    retiring: bool = False

    def answer(self, request_id: int, request: str) -> bytes:
        """Run the handler; the frame of its reply, or of its error and traceback."""
        started = time.perf_counter()
        try:
            reply = run_handler(self.handler, request)  # an exact str: a subclass
            if not reply.isascii():  # might not unpickle in the parent
                _check_encodable(reply)
        except BaseException as exc:  # the parent logs it when it fails the future
            return _encode_failure(failed_outcome(request_id, exc))
        # A plain tuple: a named tuple pickles about six times slower.
        return encode_frame((request_id, reply, time.perf_counter() - started))

    def outgrew_memory_cap(self) -> bool:
        """Whether the RSS has reached ``max_rss`` (never without a cap)."""
        return self.max_rss is not None and self.process.memory_info().rss >= self.max_rss

    def serve_channel(self, sock: socket.socket) -> None:
        """Answer the requests framed on ``sock`` in order, until the parent closes it
        (or resets it: the parent is shutting down or gone)."""
        pid = os.getpid()
        reader = FrameReader()
        with contextlib.suppress(ConnectionError):
            while data := sock.recv(RECV_CHUNK_SIZE):
                for payload in reader.feed(data):
                    for request_id, text in pickle.loads(payload):
                        reply = self.answer(request_id, text)
                        if not self.retiring and self.outgrew_memory_cap():
                            # Said once, before the reply; the parent recycles this
                            # worker when another one serves.
                            self.retiring = True
                            reply = encode_frame(Retiring(pid)) + reply
                        sock.sendall(reply)


def worker_main(payload: bytes, address: Address, token: str, max_rss: int | None) -> None:
    """A worker process's life: lifeline, load the handler, serve the channel.

    Args:
        payload: the pickled handler, made once by the parent.
        address: the parent's channel listener.
        token: the secret every first frame carries, so only the pool's
            workers count.
        max_rss: RSS in bytes past which the worker retires, or ``None``.

    Raises:
        SystemExit: the handler could not be loaded (status
            :data:`EXIT_INIT_FAILED`, after telling the parent why).
    """
    # Ctrl-C in a terminal signals the whole process group; the parent drains
    # in-flight requests, so a worker must not die of it mid-request.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pid = os.getpid()
    lifeline = connect(address)
    lifeline.sendall(introduction(token, Lifeline(pid)))
    threading.Thread(
        target=watch_lifeline, args=(lifeline, address), name="mpreqrep-lifeline", daemon=True
    ).start()
    try:
        handler = pickle.loads(payload)
    except BaseException as exc:
        summary = " ".join(traceback.format_exception_only(type(exc), exc)[-1].split())
        with connect(address) as sock:
            sock.sendall(introduction(token, InitFailed(pid, summary, traceback.format_exc())))
        raise SystemExit(EXIT_INIT_FAILED) from None
    worker = _WorkerState(handler, max_rss, psutil.Process())
    with connect(address) as sock:
        sock.sendall(introduction(token, Hello(pid)))
        worker.serve_channel(sock)
    if lifeline_ended(lifeline, PARENT_GONE_WAIT_S):
        # The channel ended with the parent: clean up here too, or this thread's
        # exit could end the process before the watchdog thread has done it.
        remove_socket_directory(address)


def lifeline_ended(lifeline: socket.socket, wait_s: float) -> bool:
    """Whether the lifeline ends within ``wait_s`` seconds: the parent never writes to
    it, so it is readable only once its end of stream (or a reset) has come."""
    readable, _, _ = select.select([lifeline], [], [], wait_s)
    return bool(readable)


def remove_socket_directory(address: Address) -> None:
    """Remove the parent's socket directory, as its owner no longer can (idempotent)."""
    if isinstance(address, str):
        shutil.rmtree(os.path.dirname(address), ignore_errors=True)


def watch_lifeline(
    lifeline: socket.socket, address: Address, exit_now: Callable[[int], object] = os._exit
) -> None:
    """Block on the lifeline; when it ends, the parent is gone: clean up and exit now.

    The parent never writes to it and closes it only once this process is
    reaped, so its end of stream means that the parent died (even of
    SIGKILL: the kernel closes its sockets), whatever this process is busy
    with. The socket directory is removed, as its owner no longer can.
    """
    try:
        while lifeline.recv(RECV_CHUNK_SIZE):
            pass
    except OSError:
        pass
    remove_socket_directory(address)
    exit_now(EXIT_ORPHANED)


def introduction(token: str, message: Lifeline | Hello | InitFailed) -> bytes:
    """A connection's first frame: the pool's token, then the message (the parent
    unpickles nothing from a peer that does not know the token)."""
    return frame_of(token.encode() + pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _check_encodable(reply: str) -> None:
    """Raise :class:`ReplyEncodingError` unless ``reply`` encodes as UTF-8."""
    try:
        reply.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ReplyEncodingError(f"the reply cannot be encoded as UTF-8: {exc}") from exc


def _encode_failure(outcome: Outcome) -> bytes:
    """An error's frame: the :class:`Outcome` through cloudpickle, as :func:`_portable`
    checked (a reply travels as a plain ``(request_id, reply, elapsed_s)`` tuple)."""
    return frame_of(bytes(loky_dumps(outcome)))


def failed_outcome(request_id: int, exc: BaseException) -> Outcome:
    """The outcome of a handler that raised: a picklable error and its traceback."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return Outcome(request_id, error=_portable(exc), traceback=text)


def _portable(exc: BaseException) -> Exception:
    """``exc`` if it is an ``Exception`` that survives a pickle round trip, else a
    RuntimeError naming it (a ``SystemExit`` must not stop the parent's loop)."""
    summary = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    if not isinstance(exc, Exception):
        return HandlerBaseException(f"handle_request raised {summary}")
    try:
        pickle.loads(loky_dumps(exc))
    except Exception:  # the error is still reported, as text
        return RuntimeError(f"unpicklable handler error: {summary}")
    return exc
