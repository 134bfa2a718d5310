"""Handlers for the executor tests, at module level so every executor can pickle them.

``ProbeServer`` answers commands that reveal where and on what it ran, and
that fault on demand; copies made by unpickling are counted per process.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter
from typing import Any

import mpreqrep

# Copies of each server (by its ``serial``) unpickled in this process.
copies_made: Counter[str] = Counter()


class NeedsTwoArguments(Exception):
    """An exception unpickling cannot rebuild, as in much user code: its ``__init__``
    takes other arguments than its ``args``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class ProbeServer(mpreqrep.RequestServer):
    """Replies to ``pid``, ``copies [S]`` (after S seconds), ``identity``, ``unique S``,
    ``sleep S``, ``raise``, ``crash``, ``unpicklable`` (raises what cannot be
    unpickled) and ``locked`` (raises what cannot be pickled); echoes anything else
    as ``echo:<text>``."""

    def __init__(self, address: str, **options: Any) -> None:
        super().__init__(address, **options)
        self.serial = uuid.uuid4().hex

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        copies_made[self.serial] += 1

    def handle_request(self, request: str) -> str:
        command, _, argument = request.strip().partition(" ")
        if command == "pid":
            return str(os.getpid())
        if command == "copies":
            time.sleep(float(argument or 0))
            return f"{os.getpid()} {copies_made[self.serial]}"
        if command == "identity":
            return f"{os.getpid()} {id(self)} {threading.current_thread().name}"
        if command == "unique":
            time.sleep(float(argument))
            return uuid.uuid4().hex
        if command == "sleep":
            time.sleep(float(argument))
            return f"slept {argument}"
        if command == "raise":
            raise RuntimeError("handler exploded remotely")
        if command == "crash":
            os._exit(3)
        if command == "unpicklable":
            raise NeedsTwoArguments("cannot be rebuilt", 7)
        if command == "locked":
            error = RuntimeError("holds a lock")
            error.lock = threading.Lock()  # type: ignore[attr-defined]
            raise error
        return "echo:" + request


def copies_on_this_dask_worker(dask_worker: Any) -> list[str]:
    """``client.run`` this: the ``copies`` reply of each server copy this worker holds."""
    from mpreqrep._dask_worker import ServerPlugin

    plugins = dask_worker.plugins.values()
    return [p.server.handle_request("copies") for p in plugins if isinstance(p, ServerPlugin)]


class UncopyableServer(mpreqrep.RequestServer):
    """A server whose copies cannot be made: unpickling one raises."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        raise RuntimeError("this server cannot be copied")


def record_initializer_call(path: str) -> None:
    """A user's pool initializer: appends this process's pid to the file at ``path``."""
    with open(path, "a") as marks:
        marks.write(f"{os.getpid()}\n")
