"""Module-level servers for the process-mode tests (module-level so they pickle)."""

from __future__ import annotations

import os
import threading
import time

import mpreqrep


class PidServer(mpreqrep.RequestServer):
    """Replies with the pid that ran the handler; ``exit`` kills it, ``hang`` hangs."""

    def __init__(self, address: str, **options: object) -> None:
        super().__init__(address, **options)  # type: ignore[arg-type]
        self.greeting = "pid"
        self.lock = threading.Lock()  # a user's lock: must not stop pickling

    def handle_request(self, request: str) -> str:
        command = request.strip()
        if command == "exit":
            os._exit(1)
        if command == "hang":
            while True:
                time.sleep(1)
        if command.startswith("sleep"):
            time.sleep(float(command.split()[1]))
        return f"{self.greeting} {os.getpid()} {command}"

    def __getstate__(self) -> dict[str, object]:
        state = super().__getstate__()
        del state["lock"]
        return state
