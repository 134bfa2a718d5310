"""Reply with the pid of the process that ran the handler: which worker answers.

Demonstrates process mode's operations: watch the pids change as workers are
added (SIGTTIN), removed (SIGTTOU), replaced (SIGHUP) or recycled
(``--max-requests``)::

    mpreqrep serve workers.whoami:WhoAmIServer --workers 2 --address localhost:0
    mpreqrep request localhost:PORT ""        # prints: 12345
    mpreqrep request localhost:PORT "2.5"     # sleeps 2.5 s first

Request: blank, or a number of seconds to sleep first (at most
:data:`MAX_SLEEP_S`). Reply: the pid, as decimal text.
"""

from __future__ import annotations

import os
import time

from mpreqrep import RequestServer

MAX_SLEEP_S = 600.0


class WhoAmIServer(RequestServer):
    """Replies with the handler's pid, after an optional sleep."""

    def handle_request(self, request: str) -> str:
        """Sleep as long as the request says (if it says), then return the pid.

        Args:
            request: blank, or seconds to sleep, e.g. ``"0.5\\r\\n"``.

        Returns:
            The pid of the process that ran the handler.

        Raises:
            ValueError: the request is neither blank nor a number of seconds
                in ``0..MAX_SLEEP_S``.
        """
        text = request.strip()
        if text:
            delay_s = float(text)
            if not 0 <= delay_s <= MAX_SLEEP_S:
                raise ValueError(f"sleep between 0 and {MAX_SLEEP_S} s, not {text!r}")
            time.sleep(delay_s)
        return str(os.getpid())
