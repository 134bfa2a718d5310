"""Run pyzo's own command server (``pyzo/core/commandline.py``) headless.

Usage: ``python tests/pyzo_launcher.py {mpreqrep|yoton} {cmd_args REQUEST...|stop COUNT}``

With ``mpreqrep``, this module is put in ``sys.modules`` as
``yoton.clientserver`` before pyzo's module is imported, so pyzo's code runs
unchanged on mpreqrep; with ``yoton`` it runs on the real yoton. pyzo's GUI is
not needed: ``pyzo.callLater`` runs its callback at once and ``pyzo.editors``
records what it is asked to open (both are set by pyzo's Qt main window
otherwise).

``cmd_args`` sends each REQUEST (a command line, split on spaces) through
pyzo's ``handle_cmd_args`` and prints ``RESULT <json list of replies>``; then
it stops the server with pyzo's ``stop_our_server``.
``stop`` starts COUNT servers of pyzo's ``Server`` class in turn and stops
each with ``stop_our_server``, which prints "Stopped our command server." or
"Failed to stop command server:"; then ``JOINED <n>`` counts the servers
whose thread ended.

The module starts a server on pyzo's fixed port at import, which may be
taken by another process: the launcher stops that one if it started, then
serves on an ephemeral port (``ADDRESS`` and ``server`` are module globals
pyzo's functions read).
"""

from __future__ import annotations

import json
import os
import sys
import time
from types import ModuleType

JOIN_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 10.0


class Editors:
    """Stands in for pyzo's editor stack: records the files it is asked to open."""

    def __init__(self) -> None:
        self.opened: list[str] = []

    def loadFile(self, name: str) -> None:  # pyzo's method name
        self.opened.append(name)

    def newFile(self) -> None:  # pyzo's method name
        self.opened.append("<new>")


def import_commandline(library: str) -> ModuleType:
    """Import pyzo's commandline module on ``library`` (mpreqrep or yoton)."""
    import pyzo

    if library == "mpreqrep":
        import mpreqrep

        sys.modules["yoton.clientserver"] = mpreqrep
    else:
        sys.path.insert(0, os.path.dirname(pyzo.__file__))
    pyzo.callLater = lambda callback, *args: callback(*args)  # type: ignore[attr-defined]
    pyzo.editors = Editors()  # type: ignore[attr-defined]
    from pyzo.core import commandline

    expected = "mpreqrep" if library == "mpreqrep" else "yoton.clientserver"
    assert commandline.RequestServer.__module__.startswith(expected), commandline.RequestServer
    return commandline


def serve_fresh(commandline: ModuleType) -> None:
    """Start one of pyzo's servers on an ephemeral port and point pyzo at it.

    yoton's server listens only once its thread runs (mpreqrep's in its
    constructor): with yoton, wait until pyzo's own probe gets an answer.
    """
    server = commandline.Server("localhost:0")
    port = server.port if hasattr(server, "port") else server._bsd_socket.getsockname()[1]
    commandline.server = server
    commandline.ADDRESS = f"localhost:{port}"
    server.start()
    if not hasattr(server, "port"):
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not commandline.is_pyzo_server_running() and time.monotonic() < deadline:
            time.sleep(0.01)


def stop_import_time_server(commandline: ModuleType) -> None:
    """Stop the server the module started on pyzo's fixed port, if it could bind
    (quietly: only the launcher's own stops are counted)."""
    if commandline.server is not None:
        commandline.server.stop()
        commandline.server.join(JOIN_TIMEOUT_S)


def run_cmd_args(commandline: ModuleType, requests: list[str]) -> None:
    """Send each request as pyzo's second instance does; print the replies."""
    serve_fresh(commandline)
    replies = []
    for request in requests:
        sys.argv = ["pyzo", *request.split(" ")]
        replies.append(commandline.handle_cmd_args())
    replies.append(sys.modules["pyzo"].editors.opened)
    commandline.stop_our_server()
    print("RESULT " + json.dumps(replies), flush=True)


def run_stops(commandline: ModuleType, count: int) -> None:
    """Start and stop ``count`` servers, pyzo's way; print how many threads ended."""
    joined = 0
    for _ in range(count):
        serve_fresh(commandline)
        commandline.stop_our_server()
        commandline.server.join(JOIN_TIMEOUT_S)
        joined += not commandline.server.is_alive()
    print(f"JOINED {joined}", flush=True)


def main(argv: list[str]) -> int:
    library, action, *rest = argv
    commandline = import_commandline(library)
    stop_import_time_server(commandline)
    if action == "cmd_args":
        run_cmd_args(commandline, rest)
    else:
        run_stops(commandline, int(rest[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
