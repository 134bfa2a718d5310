"""Every Python example in the README runs, as a script of its own, and prints
what its comments promise."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import UNIT

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
PROMISE = re.compile(r"#\s*prints:\s*(.*)$")


def promised_output(block: str) -> list[str]:
    """The ``# prints: ...`` comments of a block, in order."""
    return [match.group(1).strip() for match in map(PROMISE.search, block.splitlines()) if match]


def test_readme_has_examples() -> None:
    assert len(PYTHON_BLOCKS) >= 2
    assert all(promised_output(block) for block in PYTHON_BLOCKS)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_example_runs(index: int, tmp_path: Path) -> None:
    block = PYTHON_BLOCKS[index]
    script = tmp_path / f"readme_example_{index}.py"
    script.write_text(block, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # the examples import workers/
        capture_output=True,
        text=True,
        timeout=150 * UNIT,
    )
    assert result.returncode == 0, result.stderr
    printed = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    assert printed == promised_output(block)


CONSOLE_BLOCKS = re.findall(r"```console\n(.*?)```", README, flags=re.DOTALL)
BOUND = re.compile(r"127\.0\.0\.1:\d+")


def console_steps(block: str) -> list[tuple[list[str], list[str]]]:
    """Each ``$ command`` of a console block with the output lines under it."""
    steps: list[tuple[list[str], list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((shlex.split(line[2:]), []))
        else:
            steps[-1][1].append(line)
    return steps


def start_serve(argv: list[str], expected: list[str]) -> tuple[subprocess.Popen[str], str]:
    """Run a ``serve`` step on port 0; check its first line; return it and its address."""
    if "--address" in argv:
        argv[argv.index("--address") + 1] = "localhost:0"
    else:
        argv += ["--address", "localhost:0"]
    process = subprocess.Popen(
        [sys.executable, "-m", "mpreqrep", *argv[1:]], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    first_line = process.stdout.readline().strip()
    assert BOUND.sub("ADDR", first_line) == BOUND.sub("ADDR", expected[0])
    match = BOUND.search(first_line)
    assert match is not None
    return process, match.group(0)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("index", range(len(CONSOLE_BLOCKS)))
def test_console_example_runs(index: int) -> None:
    servers: list[subprocess.Popen[str]] = []
    address = ""
    try:
        for argv, expected in console_steps(CONSOLE_BLOCKS[index]):
            assert argv[0] == "mpreqrep"
            if argv[1] == "serve":
                server, address = start_serve(argv, expected)
                servers.append(server)
                continue
            argv[2] = address
            result = subprocess.run(
                [sys.executable, "-m", "mpreqrep", *argv[1:]],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60 * UNIT,
            )
            assert result.returncode == 0, result.stderr
            assert result.stdout.splitlines() == expected
    finally:
        for server in servers:
            server.send_signal(signal.SIGINT)
            assert server.wait(timeout=60 * UNIT) == 0
