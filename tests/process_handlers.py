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


class RaisingServer(mpreqrep.RequestServer):
    """Raises the ``BaseException`` a request names; replies ``ok:`` otherwise."""

    def handle_request(self, request: str) -> str:
        command = request.strip()
        if command == "SystemExit":
            raise SystemExit(2)
        if command == "KeyboardInterrupt":
            raise KeyboardInterrupt
        if command == "GeneratorExit":
            raise GeneratorExit
        return f"ok:{command}"


class FailsInWorkers(mpreqrep.RequestServer):
    """A server whose copy cannot be loaded in a worker (as a module that fails to
    import there would)."""

    def __init__(self, address: str, **options: object) -> None:
        super().__init__(address, **options)  # type: ignore[arg-type]
        self.parent_pid = os.getpid()

    def __setstate__(self, state: dict[str, object]) -> None:
        super().__setstate__(state)
        if os.getpid() != self.parent_pid:
            raise ImportError("No module named 'numpy' (in a worker)")


class SlowLedgerServer(mpreqrep.RequestServer):
    """Sleeps ``ms`` milliseconds for ``tag ms``, appending ``tag`` to a ledger file
    first; ``tag exit`` kills its worker. Loading a copy in a worker takes
    ``load_delay_s`` (as a module that imports numpy or a model would)."""

    def __init__(self, address: str, ledger: str, load_delay_s: float, **options: object) -> None:
        super().__init__(address, **options)  # type: ignore[arg-type]
        self.ledger = ledger
        self.load_delay_s = load_delay_s
        self.parent_pid = os.getpid()

    def __setstate__(self, state: dict[str, object]) -> None:
        super().__setstate__(state)
        if os.getpid() != self.parent_pid:
            time.sleep(self.load_delay_s)

    def handle_request(self, request: str) -> str:
        tag, _, command = request.strip().partition(" ")
        with open(self.ledger, "a") as ledger:
            ledger.write(tag + "\n")
        if command == "exit":
            os._exit(1)
        time.sleep(int(command) / 1000)
        return f"done {tag}"
