"""Client threads sending requests in a loop: the load under which the operations are
tested (tests/test_operations.py, tests/test_cli_operations.py) and measured
(scripts/ops_check.py, which imports this module, so: no pytest here)."""

from __future__ import annotations

import threading
import time

import mpreqrep


class Load:
    """``clients`` threads sending ``text`` in a loop until :meth:`finish` (or
    ``limit`` requests each); every reply is recorded with the time it came.

    Args:
        address: the server's address.
        clients: how many client threads.
        limit: requests per client at the most.
        text: the request.
        timeout_s: each request's timeout; one without a reply in time
            records ``None``.
    """

    def __init__(
        self,
        address: str,
        clients: int,
        *,
        limit: int = 10**9,
        text: str = "",
        timeout_s: float = 30.0,
    ) -> None:
        self.replies: list[str | None] = []
        self.times: list[float] = []
        self.errors: list[Exception] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(address, limit, text, timeout_s))
            for _ in range(clients)
        ]
        for thread in self._threads:
            thread.start()

    def _client(self, address: str, limit: int, text: str, timeout_s: float) -> None:
        for _ in range(limit):
            if self._stop.is_set():
                return
            try:
                reply = mpreqrep.do_request(address, text, timeout=timeout_s)
            except Exception as exc:  # counted by failures(), listed in errors
                with self._lock:
                    self.errors.append(exc)
                continue
            with self._lock:
                self.replies.append(reply)
                self.times.append(time.monotonic())

    def pids(self, since: float = 0.0) -> set[str]:
        """The distinct replies (the handlers reply their worker's pid) that came
        at ``since`` (a :func:`time.monotonic` time) or later."""
        with self._lock:
            pairs = list(zip(self.times, self.replies, strict=True))
        return {reply.strip() for at, reply in pairs if reply and at >= since}

    def failures(self) -> int:
        """Requests without a reply: an empty one, none in time, or an error."""
        with self._lock:
            return sum(not reply for reply in self.replies) + len(self.errors)

    def wait(self, timeout_s: float = 60.0) -> None:
        """Let every client send its ``limit`` requests (each joined within ``timeout_s``)."""
        for thread in self._threads:
            thread.join(timeout_s)

    def finish(self, timeout_s: float = 60.0) -> None:
        """Stop the clients after their current request, and join them."""
        self._stop.set()
        self.wait(timeout_s)
