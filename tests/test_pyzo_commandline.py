"""pyzo's own command server (pyzo/core/commandline.py) running on mpreqrep.

Each test runs ``tests/pyzo_launcher.py`` in a subprocess, since the module
starts its server at import; the launcher swaps mpreqrep in for
``yoton.clientserver`` (or leaves the real yoton) and drives pyzo's code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .conftest import UNIT

LAUNCHER = Path(__file__).with_name("pyzo_launcher.py")
# Command lines as pyzo's second instance would send them (see handle_command).
COMMAND_LINES = [
    "echo hello",
    "testerr",
    "open",
    "open /tmp/some_script.py",
    "new",
    "startexternalshell {}",
    "--only-a-flag",
    "some file.py",
    "stopserver",
]


def launch(*args: str) -> str:
    """Run the launcher; return its stdout (it must exit cleanly)."""
    completed = subprocess.run(
        [sys.executable, str(LAUNCHER), *args],
        capture_output=True,
        text=True,
        timeout=60 * UNIT,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def result_of(output: str) -> list[object]:
    """The JSON the launcher printed after ``RESULT``."""
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, output
    return json.loads(lines[0].removeprefix("RESULT "))  # type: ignore[no-any-return]


def test_handle_cmd_args_replies_match_yoton() -> None:
    ours = result_of(launch("mpreqrep", "cmd_args", *COMMAND_LINES))
    theirs = result_of(launch("yoton", "cmd_args", *COMMAND_LINES))
    assert ours == theirs
    assert ours[0] == "echo 'hello'"
    assert ours[6] is None  # only flags: pyzo sends nothing
    assert ours[-1] == ["/tmp/some_script.py", "<new>", "some file.py"]


def test_stop_our_server_succeeds_every_time() -> None:
    """pyzo's stop idiom: ``server.stop()`` then at once a "stopserver" request."""
    output = launch("mpreqrep", "stop", "20")
    assert output.count("Stopped our command server.") == 20, output
    assert output.count("Reply: Stopped the server") == 20  # each trigger was answered
    assert "Failed" not in output
    assert "JOINED 20" in output
