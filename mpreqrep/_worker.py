"""The worker-process side of process mode: load the handler once, serve a channel.

loky runs :func:`init_worker` once per (re)spawned process and then, as one
long task, :func:`serve_channel`: it connects to the parent, says hello, and
answers the requests the parent writes to it, one reply frame per request, in
order, until the parent closes the channel. So a request costs two socket
writes and no loky round trip, and the parent always knows what a worker is
running: the oldest request it sent there and has no reply for.

A worker whose RSS reaches the memory cap says it is retiring, serves what
the parent had already sent, and ends its task when the parent closes the
channel; :class:`_RecycleHook` then makes loky's between-task memory check
replace the process through loky's clean exit handshake.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import time
import traceback
from dataclasses import dataclass
from typing import NamedTuple

import psutil
from loky import process_executor as loky_executor
from loky.backend.reduction import dumps as loky_dumps

from ._channel import RECV_CHUNK_SIZE, Address, FrameReader, connect, encode_frame, frame_of
from ._dispatch import Handler, run_handler

_ALWAYS_RECYCLE = 1 << 62
"""What :class:`_RecycleHook` reports for a retiring worker: past any leak limit."""
_CHECK_EVERY_TASK_S = -1.0
"""Makes loky's memory check, throttled to once per this many seconds, run every task."""


class Outcome(NamedTuple):
    """What became of one request in a worker: its reply, or an error and its traceback."""

    request_id: int
    reply: str = ""
    error: BaseException | None = None
    traceback: str = ""
    elapsed_s: float = 0.0


class Hello(NamedTuple):
    """A worker's first message on a new channel (after the pool's token)."""

    pid: int
    generation: int


class InitFailed(NamedTuple):
    """Sent on a channel of its own by a worker that could not load the handler."""

    pid: int
    generation: int
    traceback: str


class Retiring(NamedTuple):
    """The worker reached the memory cap: send it nothing more."""

    pid: int


@dataclass
class _WorkerState:
    """This worker process's handler copy and how to reach the parent."""

    handler: Handler
    address: Address
    token: str
    generation: int
    max_rss: int | None
    process: psutil.Process
    retiring: bool = False

    def serve(self, request_id: int, request: str) -> Outcome:
        """Run the handler and capture its reply or error."""
        started = time.perf_counter()
        try:
            reply = run_handler(self.handler, request)
        except BaseException as exc:  # the parent logs it when it fails the future
            return failed_outcome(request_id, exc)
        # An exact str: a subclass might not unpickle in the parent.
        return Outcome(request_id, str.__str__(reply), elapsed_s=time.perf_counter() - started)

    def outgrew_memory_cap(self) -> bool:
        """Whether the RSS has reached ``max_rss`` (never without a cap)."""
        return self.max_rss is not None and self.process.memory_info().rss >= self.max_rss


_worker: _WorkerState | None = None


def init_worker(
    payload: bytes, address: Address, token: str, generation: int, max_rss: int | None
) -> None:
    """Load this worker's handler copy; loky runs this once per (re)spawned worker.

    Args:
        payload: the pickled handler, made once by the parent.
        address: the parent's channel listener.
        token: the secret a hello must carry, so only the pool's workers count.
        generation: the pool this worker belongs to (a new one after a break).
        max_rss: RSS in bytes past which the worker is recycled, or ``None``.

    Raises:
        Exception: whatever unpickling raised, after telling the parent why
            (loky then marks the pool broken).
    """
    global _worker
    # Ctrl-C in a terminal signals the whole process group; the parent drains
    # in-flight requests, so a worker must not die of it mid-request.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        handler = pickle.loads(payload)
    except BaseException:
        text = traceback.format_exc()
        with connect(address) as sock:
            sock.sendall(_introduction(token, InitFailed(os.getpid(), generation, text)))
        raise
    _worker = _WorkerState(handler, address, token, generation, max_rss, psutil.Process())
    if max_rss is not None:
        loky_executor._get_memory_usage = _RecycleHook(_worker)
        loky_executor._MEMORY_LEAK_CHECK_DELAY = _CHECK_EVERY_TASK_S
        loky_executor._MAX_MEMORY_LEAK_SIZE = 1


def serve_channel() -> tuple[int, bool]:
    """The loky task: serve one channel until the parent closes it.

    Returns:
        This worker's pid and whether it is retiring (then loky replaces it).
    """
    worker = _worker
    assert worker is not None, "serve_channel runs only in workers set up by init_worker"
    pid = os.getpid()
    if worker.retiring:  # end at once: loky's memory check recycles this process
        return pid, True
    reader = FrameReader()
    with connect(worker.address) as sock, contextlib.suppress(ConnectionError):
        # ConnectionError: the parent closed the channel first (it shuts down).
        sock.sendall(_introduction(worker.token, Hello(pid, worker.generation)))
        while data := sock.recv(RECV_CHUNK_SIZE):
            for payload in reader.feed(data):
                for request_id, text in pickle.loads(payload):
                    reply = _encode_outcome(worker.serve(request_id, text))
                    if not worker.retiring and worker.outgrew_memory_cap():
                        # Before the reply, so the parent sends nothing more here
                        # once this request is answered.
                        worker.retiring = True
                        reply = encode_frame(Retiring(pid)) + reply
                    sock.sendall(reply)
    return pid, worker.retiring


def _introduction(token: str, message: Hello | InitFailed) -> bytes:
    """A channel's first frame: the pool's token, then the message (the parent
    unpickles nothing from a peer that does not know the token)."""
    return frame_of(token.encode() + pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


class _RecycleHook:
    """Stands in for loky's worker memory probe so that its leak check recycles
    exactly the retiring workers.

    After every task (the throttle is set below zero), loky's worker loop
    compares the probe's reading with the one taken after the worker's first
    task and, when the growth reaches ``_MAX_MEMORY_LEAK_SIZE`` (set to 1),
    leaves through loky's clean exit handshake; loky then spawns a
    replacement. The first reading is 0; later ones are 0, or past any limit
    once the worker is retiring. A worker whose first task was its retiring
    channel only takes the reference then: the parent's next channel task
    reaches it, ends at once, and the check after it recycles the process.
    """

    def __init__(self, worker: _WorkerState) -> None:
        self._worker = worker
        self._reference_taken = False

    def __call__(self, pid: int, force_gc: bool = False) -> int:
        """0, or a reading past any limit when the worker is retiring (no memory is
        read, so ``force_gc`` has nothing to free)."""
        if not self._reference_taken:
            self._reference_taken = True
            return 0
        return _ALWAYS_RECYCLE if self._worker.retiring else 0


def _encode_outcome(outcome: Outcome) -> bytes:
    """A reply frame; an error goes through cloudpickle, as :func:`_portable` checked."""
    if outcome.error is None:
        return encode_frame(outcome)
    return frame_of(bytes(loky_dumps(outcome)))


def failed_outcome(request_id: int, exc: BaseException) -> Outcome:
    """The outcome of a handler that raised: a picklable error and its traceback."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return Outcome(request_id, error=_portable(exc), traceback=text)


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives a pickle round trip, else a RuntimeError naming it."""
    try:
        pickle.loads(loky_dumps(exc))
    except Exception:  # the error is still reported, as text
        summary = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return RuntimeError(f"unpicklable handler error: {summary}")
    return exc
