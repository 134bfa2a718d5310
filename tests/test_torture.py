"""The torture scenarios of ``scripts/torture.py``, with small numbers, each bounded.

The scenario functions are the script's own (imported from its path); only
the counts shrink. ``scripts/torture`` runs them at full size.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .conftest import UNIT
from .torture_handlers import expected_reply, reply_pid

TORTURE_PATH = Path(__file__).resolve().parent.parent / "scripts" / "torture.py"


def load_torture() -> ModuleType:
    """Import scripts/torture.py by path (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("mpreqrep_torture", TORTURE_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


torture = load_torture()

SMALL = torture.Scale(
    unit=UNIT,
    phase_cap_s=30.0,
    chaos_requests=300,
    chaos_concurrency=16,
    chaos_kill_every_s=(0.1, 0.3),
    flood_connections=300,
    slow_clients=40,
    slow_probes=60,
    garbage_rounds=3,
    garbage_good_requests=100,
    stuck_good_requests=60,  # thread mode: two spinning handlers starve every other thread
    leak_requests=8,
    leak_good_requests=100,
    leak_mib=32,
    max_worker_mib=128,
    soak_requests=1000,
    soak_concurrency=16,
    fault_rounds=1,
    fault_good_requests=60,
    lifecycle_rounds=1,
    lifecycle_good_requests=60,
    slowread_readers=2,
    slowread_mib=12,
    slowread_mib_per_s=6.0,
    slowread_read_timeout_s=1.0,
    slowread_fast_requests=2,
    slowread_good_requests=60,
    noread_clients=8,
    noread_mib=8,
    noread_max_buffered_mib=16,
    noread_read_timeout_s=0.5,
    noread_good_requests=40,
)


NOT_APPLICABLE = {("leak", "thread")}  # max_worker_memory recycles worker processes
# The hostile scenarios run in every mode in scripts/torture; here in sync and
# process mode (tests/test_faults.py puts each handler fault to every mode).
SHORT_HOSTILE_MODES = ("sync", "process")


def cases() -> list[Any]:
    """Every scenario against the modes it applies to (see SHORT_HOSTILE_MODES)."""
    return [
        pytest.param(scenario, mode, id=f"{scenario}-{mode}")
        for scenario, modes in torture.SCENARIO_MODES.items()
        for mode in modes
        if (scenario, mode) not in NOT_APPLICABLE
        and (modes == torture.CLASSIC_MODES or mode in SHORT_HOSTILE_MODES)
    ]


@pytest.mark.timeout(60 * UNIT)
@pytest.mark.parametrize(("scenario", "mode"), cases())
def test_scenario_passes(scenario: str, mode: str) -> None:
    result = torture.run_scenario(scenario, mode, SMALL)
    assert result.passed, torture.format_table([result])
    assert result.lost == 0


def outcome(request: str, reply: str | None, started: float, ended: float) -> Any:
    return torture.Outcome(request, reply, started, ended)


def test_chaos_tally_excuses_only_empty_replies_during_a_kill() -> None:
    outcomes = [
        outcome("a", expected_reply("a\r\n", 7), 0.0, 1.0),  # answered
        outcome("b", "", 1.0, 3.0),  # a kill at 2.0: excused
        outcome("c", "", 3.0, 4.0),  # no kill meanwhile: lost
        outcome("d", None, 1.0, 3.0),  # timed out: lost even during a kill
        outcome("e", "7 wrong\r\n", 1.0, 3.0),  # wrong reply: lost
    ]
    assert torture.tally_chaos(outcomes, [2.0]) == torture.ChaosTally(1, 1, 3)


@pytest.mark.parametrize(
    ("received", "reply"),
    [
        ("ping\r\n", "42 ping\r\n"),
        ("no crlf", "42 no crlf\r\n"),
        ("", "42 \r\n"),
        ("lone\r", "42 lone\r\r\n"),
        ("a\r\nb\r\n", "42 a\r\n"),  # dropped bytes joined \r and \n: the reply is cut
    ],
)
def test_expected_reply_is_what_a_client_reads(received: str, reply: str) -> None:
    assert expected_reply(received, 42) == reply
    assert reply_pid(received, reply) == 42


@pytest.mark.parametrize("reply", [None, "", "x ping\r\n", "42 pong\r\n", "42 ping"])
def test_wrong_replies_have_no_pid(reply: str | None) -> None:
    assert reply_pid("ping\r\n", reply) is None


def fake_scenario(result: Any) -> Any:
    """A scenario that returns ``result`` (or raises it) without any load."""

    def scenario(mode: str, scale: Any) -> Any:
        if isinstance(result, Exception):
            raise result
        return result

    return scenario


def test_main_prints_the_table_and_writes_markdown(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    row = torture.Result("flood", "thread", "9 requests", "a | burst", 0, True, "9 answered")
    monkeypatch.setitem(torture.SCENARIOS, "flood", fake_scenario(row))
    markdown = tmp_path / "reliability.md"
    argv = ["--scenarios", "flood", "--modes", "thread", "--markdown", str(markdown)]
    assert torture.main(argv) == 0
    assert "9 answered" in capsys.readouterr().out
    table = markdown.read_text()
    assert "| flood | thread | 9 requests | a \\| burst | 0 | PASS | 9 answered |" in table
    assert "`scripts/torture --scenarios flood --modes thread`" in table


def test_main_fails_on_a_shortfall_and_reports_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    short = torture.Result("soak", "thread", "-", "-", 3, False, "3 lost")
    monkeypatch.setitem(torture.SCENARIOS, "soak", fake_scenario(short))
    monkeypatch.setitem(torture.SCENARIOS, "chaos", fake_scenario(OSError("no ports")))
    assert torture.main(["--scenarios", "soak", "chaos", "--modes", "thread", "--quick"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out
    assert "ERROR" in out and "OSError: no ports" in out
