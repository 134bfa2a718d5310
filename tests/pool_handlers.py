"""Module-level handlers for the process-pool dispatcher tests (module-level so they pickle).

Each handler takes ``command[:argument]`` requests; the trailing CRLF that real
requests carry is optional.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

_LOADS_IN_THIS_PROCESS = 0


class Echo:
    """Replies ``prefix + request``; ``prefix`` is set in ``__init__``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def handle_request(self, request: str) -> str:
        return self.prefix + request


class Counting:
    """Shows that each worker keeps one handler copy: replies ``pid id calls loads``.

    ``pickled`` counts the copies made in the parent; ``loads`` those unpickled
    in the replying process.
    """

    pickled = 0

    def __init__(self) -> None:
        self.calls = 0

    def __getstate__(self) -> dict[str, Any]:
        type(self).pickled += 1
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        global _LOADS_IN_THIS_PROCESS
        _LOADS_IN_THIS_PROCESS += 1
        self.__dict__.update(state)

    def handle_request(self, request: str) -> str:
        self.calls += 1
        return f"{os.getpid()} {id(self)} {self.calls} {_LOADS_IN_THIS_PROCESS}"


class BadReplyError(Exception):
    """Needs two arguments, so it does not survive a pickle round trip."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code}: {text}")


class Commands:
    """Does what the request says, to exercise faults and timing.

    - ``echo:x`` replies ``x``; ``pid`` replies the worker pid;
    - ``sleep:s`` sleeps ``s`` seconds and replies ``start end pid`` (wall clock);
    - ``exit:code`` calls ``os._exit``; ``hang`` never returns;
    - ``raise``, ``raise-unpicklable``, ``bytes`` (returns bytes), ``subclass``
      (returns a str subclass);
    - ``spawn-hang:path`` starts a child process, writes its pid to ``path``
      and hangs;
    - ``kill-siblings`` kills the other loky workers of the same parent, then hangs;
    - ``grow:mb`` keeps ``mb`` more megabytes alive and replies the pid;
    - ``touch:path`` creates ``path`` and replies ``done``;
    - ``base:name`` raises the ``BaseException`` named (``SystemExit``,
      ``KeyboardInterrupt``, ``GeneratorExit``, ``Custom``);
    - ``surrogate`` returns text that cannot be encoded as UTF-8.
    """

    def __init__(self) -> None:
        self.hoard: list[bytes] = []

    def handle_request(self, request: str) -> Any:
        command, _, argument = request.strip().partition(":")
        return getattr(self, "do_" + command.replace("-", "_"))(argument)

    def do_echo(self, argument: str) -> str:
        return argument

    def do_pid(self, argument: str) -> str:
        return str(os.getpid())

    def do_sleep(self, argument: str) -> str:
        start = time.time()
        time.sleep(float(argument))
        return f"{start} {time.time()} {os.getpid()}"

    def do_exit(self, argument: str) -> str:
        os._exit(int(argument or 1))

    def do_hang(self, argument: str) -> str:
        threading.Event().wait()
        raise AssertionError("unreachable")

    def do_raise(self, argument: str) -> str:
        raise ValueError("handler failed on purpose")

    def do_raise_unpicklable(self, argument: str) -> str:
        raise BadReplyError(7, "no round trip")

    def do_bytes(self, argument: str) -> bytes:
        return b"not a str"

    def do_subclass(self, argument: str) -> str:
        return _Shouting("quiet")

    def do_spawn_hang(self, argument: str) -> str:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        Path(argument).write_text(str(child.pid))
        return self.do_hang("")

    def do_kill_siblings(self, argument: str) -> str:
        me = psutil.Process()
        for sibling in psutil.Process(me.ppid()).children():
            if sibling.pid != me.pid and "popen_loky" in " ".join(sibling.cmdline()):
                sibling.kill()
        return self.do_hang("")

    def do_grow(self, argument: str) -> str:
        self.hoard.append(b"\x01" * (int(argument) * 1024 * 1024))
        return str(os.getpid())

    def do_touch(self, argument: str) -> str:
        Path(argument).touch()
        return "done"

    def do_base(self, argument: str) -> str:
        raise {
            "SystemExit": SystemExit(3),
            "KeyboardInterrupt": KeyboardInterrupt(),
            "GeneratorExit": GeneratorExit(),
            "Custom": CustomBaseError("custom"),
        }[argument]

    def do_surrogate(self, argument: str) -> str:
        return "lone \udc80 surrogate"


class CustomBaseError(BaseException):
    """A user's ``BaseException`` subclass, outside the ``Exception`` tree."""


class Ledger(Commands):
    """:class:`Commands` that first append ``tag`` of ``tag/command`` to a file.

    Each run of a request leaves one line, so a request that ran twice shows.
    With ``load_delay_s``, loading a copy in a worker takes that long (as a
    module that imports numpy or a model would).
    """

    def __init__(self, path: str, load_delay_s: float = 0.0) -> None:
        super().__init__()
        self.path = path
        self.load_delay_s = load_delay_s
        self.parent_pid = os.getpid()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if os.getpid() != self.parent_pid:
            time.sleep(self.load_delay_s)

    def handle_request(self, request: str) -> Any:
        tag, _, command = request.strip().partition("/")
        with open(self.path, "a") as ledger:
            ledger.write(tag + "\n")
        return super().handle_request(command)


class _Shouting(str):
    """A str subclass; the dispatcher must send back a plain str."""


class Unpicklable:
    """Holds a lock, so it cannot be pickled for the workers."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def handle_request(self, request: str) -> str:
        return request


class FailsToLoad:
    """Pickles in the parent but raises when a worker unpickles it.

    With ``marker`` set, it fails only while that file exists; with
    ``hard=True`` the worker exits instead of raising.
    """

    def __init__(self, marker: str | None = None, *, hard: bool = False) -> None:
        self.parent_pid = os.getpid()
        self.marker = marker
        self.hard = hard

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if os.getpid() == self.parent_pid:
            return
        if self.marker is not None and not os.path.exists(self.marker):
            return
        if self.hard:
            os._exit(3)
        raise RuntimeError("cannot load in a worker")

    def handle_request(self, request: str) -> str:
        if request.strip() == "exit":
            os._exit(1)
        return "loaded"
