"""scripts/import_cost.py: it runs, measures every statement, and prints a table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from .conftest import UNIT

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "import_cost.py"


def test_prints_a_median_and_a_minimum_per_statement() -> None:
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--runs", "1"],
        capture_output=True,
        text=True,
        timeout=120 * UNIT,
        check=True,
    )
    rows = completed.stdout.splitlines()[1:]
    assert len(rows) == 6
    for row in rows:
        match = re.fullmatch(r"\s*(\d+\.\d) +(\d+\.\d)  (.+)", row)
        assert match, row
        assert 0 < float(match.group(2)) <= float(match.group(1)) < 5000
    assert rows[1].endswith("  import mpreqrep")


def test_help() -> None:
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"],
        capture_output=True,
        text=True,
        timeout=60 * UNIT,
        check=True,
    )
    assert "--runs" in completed.stdout
