"""Import cost of mpreqrep against yoton, side by side, with ``python -X importtime``.

Each statement runs in a fresh interpreter, ``--runs`` times, the statements
interleaved so that a machine slowing down costs them alike. A run's cost is
the sum of the cumulative times ``-X importtime`` reports for the imports the
statement itself triggers (the interpreter's start-up imports, found with a
``-c pass`` run, are left out, and so is the context of the last two
statements: the modules pyzo has loaded before its command server imports
the library, so those show the library's cost inside pyzo). Prints the median and the minimum per
statement, in milliseconds.

yoton is the one inside the installed pyzo package (its folder goes on
``PYTHONPATH`` for every statement alike). Bytecode caching is on for the
runs (``PYTHONDONTWRITEBYTECODE`` is dropped) and one warm-up run per
statement writes the ``.pyc`` files first, so both packages load from
bytecode, as installed packages do (pip compiles yoton's at install).

Usage: ``.venv/bin/python scripts/import_cost.py [--runs N]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

# What pyzo's start-up (pyzo/_start.py, pyzo/util) has imported, Qt aside, by the
# time its command server module imports the client and the server.
PYZO_CONTEXT = "import ctypes, locale, re, subprocess, traceback"
STATEMENTS = (
    "import yoton",
    "import mpreqrep",
    "from yoton.clientserver import RequestServer, do_request",
    "from mpreqrep import RequestServer, do_request",
    f"{PYZO_CONTEXT}; from yoton.clientserver import RequestServer, do_request",
    f"{PYZO_CONTEXT}; from mpreqrep import RequestServer, do_request",
)


def pyzo_folder() -> str:
    """The folder of the installed pyzo package, which holds yoton."""
    code = "import os, pyzo; print(os.path.dirname(pyzo.__file__))"
    return subprocess.check_output([sys.executable, "-c", code], text=True).strip()


def top_level_imports(statement: str, env: dict[str, str]) -> dict[str, int]:
    """Cumulative microseconds of each import at the outermost level, by module."""
    stderr = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    found: dict[str, int] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "[us]" in line:
            continue
        _, cumulative, name = line.split("|")
        if not name.startswith("  "):  # one space: not nested in another import
            found[name.strip()] = int(cumulative)
    return found


def statement_cost_us(statement: str, env: dict[str, str], left_out: set[str]) -> int:
    """Microseconds the statement's own imports took in one fresh interpreter."""
    imports = top_level_imports(statement, env)
    return sum(us for name, us in imports.items() if name not in left_out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="fresh interpreters per statement")
    args = parser.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=pyzo_folder())
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    start_up = set(top_level_imports("pass", env))
    left_out = start_up | set(top_level_imports(PYZO_CONTEXT, env))
    for statement in STATEMENTS:  # warm-up: write the bytecode caches
        top_level_imports(statement, env)
    costs: dict[str, list[int]] = {statement: [] for statement in STATEMENTS}
    for _ in range(args.runs):
        for statement in STATEMENTS:
            context = left_out if statement.startswith(PYZO_CONTEXT) else start_up
            costs[statement].append(statement_cost_us(statement, env, context))
    print(f"{'median ms':>9} {'min ms':>7}  statement ({args.runs} fresh interpreters each)")
    for statement, runs in costs.items():
        print(f"{statistics.median(runs) / 1000:9.1f} {min(runs) / 1000:7.1f}  {statement}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
