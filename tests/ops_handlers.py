"""Module-level handlers for the operations tests (module-level so they pickle)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import mpreqrep


class Spinner:
    """``spin:s`` burns CPU for ``s`` seconds; anything else replies the pid."""

    def handle_request(self, request: str) -> str:
        command, _, argument = request.strip().partition(":")
        if command == "spin":
            deadline = time.process_time() + float(argument)
            while time.process_time() < deadline:
                pass
        return str(os.getpid())


class OpsServer(mpreqrep.RequestServer):
    """Replies its pid; ``sleep:s`` sleeps first; ``hold:path`` writes its pid to ``path``, then
    waits until ``path.release`` exists (at most a minute); ``exit`` kills the worker."""

    def handle_request(self, request: str) -> str:
        command, _, argument = request.strip().partition(":")
        if command == "exit":
            os._exit(1)
        if command == "sleep":
            time.sleep(float(argument))
        elif command == "hold":
            scratch = Path(argument + ".tmp")
            scratch.write_text(str(os.getpid()))
            scratch.rename(argument)  # appears with its content
            release = Path(argument + ".release")
            deadline = time.monotonic() + 60
            while not release.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return str(os.getpid())
