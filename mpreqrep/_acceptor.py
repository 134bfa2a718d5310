"""The listening socket of the I/O loop: accepting, back-off, pausing, stopping.

Owns the listener once serving starts: when the selector watches it (only
while there is room and no back-off runs), accepting in batches, backing
off on resource errors (EMFILE, ENFILE, ENOBUFS, ENOMEM: log and pause,
never crash), and the stop linger and backlog sweep below. It hands each
accepted socket to ``open_connection`` and must not know what happens to
it (:mod:`mpreqrep._connection`) nor how room is counted
(:mod:`mpreqrep._handoff`).

Stopping (so that yoton's idiom, ``stop()`` then at once one more request as a
trigger, is answered): after :meth:`Acceptor.request_stop` the listener stays
open for ``STOP_LINGER_S`` and for as long as requests accepted before the
stop are still running, whichever is longer; connections that arrive in that
time are served as usual, but do not keep the listener open. Then the
connections already waiting in the kernel's backlog are accepted (up to
``STOP_SWEEP_MAX``) and the listener is closed; the loop returns once every
accepted connection is done. An idle server thus stops in about
``STOP_LINGER_S``. A client that connects in the instant between the last
accept and the close is reset by the kernel (the client sees ``""``); one
that connects later is refused (``NoServerError``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import time

from ._connection import CLOSED

TYPE_CHECKING = False  # typing is not imported at run time (import cost, see README)
if TYPE_CHECKING:
    from collections.abc import Callable

    from ._connection import Connection

logger = logging.getLogger("mpreqrep")

ACCEPT_BATCH_SIZE = 256
ACCEPT_BACKOFF_S = 0.1
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
DEFER_ACCEPT_S = 1
STOP_LINGER_S = 0.05
STOP_SWEEP_MAX = 1024


def defer_accept(listener: socket.socket) -> None:
    """Linux: have the kernel hold a new connection until its first bytes (or FIN).

    The eager read at accept then finds the request, and the connection never
    goes through the selector (no register, wake-up, unregister): ~10 µs less
    server CPU per request. A client that stays silent is handed over after
    about ``DEFER_ACCEPT_S`` anyway, so its read timeout starts that much later.
    """
    # AttributeError: no TCP_DEFER_ACCEPT on this platform (or not a real socket).
    with contextlib.suppress(AttributeError, OSError):
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_S)


class Acceptor:
    """Accepts connections while there is room, until a stop is due.

    Args:
        listener: a bound, listening TCP socket; closed by :meth:`close`.
        selector: the loop's selector; the listener's key data is the
            accepting step.
        open_connection: takes in each accepted ``(sock, peer)``.
        can_accept: whether one more connection fits now.
        connections: the live connections, watched for the stop's drain.

    Thread safety: :meth:`request_stop` may come from any thread (the loop
    is woken after it); everything else runs on the I/O thread.
    """

    def __init__(
        self,
        listener: socket.socket,
        selector: selectors.BaseSelector,
        *,
        open_connection: Callable[[socket.socket, object], None],
        can_accept: Callable[[], bool],
        connections: set[Connection],
    ) -> None:
        self.listening = True
        self.paused_until = 0.0
        self.linger_until: float | None = None
        self._listener = listener
        self._selector = selector
        self._open = open_connection
        self._can_accept = can_accept
        self._connections = connections
        self._accepting = False
        self._stop_requested = False
        self._draining: set[Connection] | None = None

    def start(self) -> None:
        """Make the listener non-blocking and defer accepts till data comes."""
        self._listener.setblocking(False)
        defer_accept(self._listener)

    def request_stop(self) -> None:
        """Start the stop's linger (see the module docstring). Idempotent."""
        if not self._stop_requested:
            self.linger_until = time.monotonic() + STOP_LINGER_S
            self._stop_requested = True

    def wakeup_time(self) -> float | None:
        """When the loop must look again: the back-off's or the linger's end."""
        earliest = self.paused_until or None
        linger_until = self.linger_until
        if linger_until is not None and (earliest is None or linger_until < earliest):
            earliest = linger_until
        return earliest

    def update(self) -> bool:
        """Watch the listener while it is open, the pool has room and no accept
        back-off is running; close it once a stop is due.

        Returns:
            Whether the listener is still open.
        """
        if not self.listening:
            return False
        if self._stop_requested and self._stop_is_due():
            self._sweep_backlog()
            self.close()
            return False
        if self.paused_until and time.monotonic() >= self.paused_until:
            self.paused_until = 0.0
        should_accept = self._can_accept() and not self.paused_until
        if should_accept != self._accepting:
            if should_accept:
                self._selector.register(self._listener, selectors.EVENT_READ, self._accept_batch)
            else:
                self._selector.unregister(self._listener)
            self._accepting = should_accept
        return True

    def _stop_is_due(self) -> bool:
        """Whether the linger is over and the requests accepted before the stop are done."""
        if self._draining is None:  # the first look since the stop
            self._draining = set(self._connections)
        elif self._draining:
            self._draining = {conn for conn in self._draining if conn.phase != CLOSED}
        if self.linger_until is not None:
            if time.monotonic() < self.linger_until:
                return False
            self.linger_until = None  # no more select timeouts for it
        return not self._draining

    def _sweep_backlog(self) -> None:
        """Accept what already waits in the backlog, so that it is answered too."""
        for _ in range(STOP_SWEEP_MAX):
            try:
                sock, peer = self._listener.accept()
            except OSError:  # BlockingIOError: the backlog is empty
                return
            self._open(sock, peer)

    def _accept_batch(self) -> None:
        """Accept the connections that are waiting, up to one batch."""
        for _ in range(ACCEPT_BATCH_SIZE):
            try:
                sock, peer = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                self._on_accept_error(exc)
                return
            self._open(sock, peer)
            if not self._can_accept():
                return

    def _on_accept_error(self, exc: OSError) -> None:
        """Back off on resource exhaustion; ignore a peer that gave up (ECONNABORTED)."""
        if exc.errno in RESOURCE_ERRNOS:
            logger.warning("accept failed (%s); pausing accepts for %.2f s", exc, ACCEPT_BACKOFF_S)
            self.paused_until = time.monotonic() + ACCEPT_BACKOFF_S
        else:
            logger.debug("accept failed: %s", exc)

    def close(self) -> None:
        """Stop listening for good."""
        self.listening = False
        if self._accepting:
            self._selector.unregister(self._listener)
            self._accepting = False
        self._listener.close()
