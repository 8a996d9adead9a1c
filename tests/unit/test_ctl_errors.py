"""`ledgerctl` reports operator mistakes and an unreachable database in one line, rc=2.

Runs the installed console script (as ops do), or the command tree in this process where
a process per case would cost too much, against a port nothing listens on, so no
database is needed: every check here happens before, or instead of, a connection.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from decimal import Decimal
from itertools import takewhile
from pathlib import Path

import pytest
import yaml
from click.testing import Result
from typer.testing import CliRunner

from services.rules.rulebook_store import DEFAULT_RULESET

ROOT = Path(__file__).resolve().parents[2]
LEDGERCTL = str(Path(sys.executable).with_name("ledgerctl"))
NOWHERE = "postgresql://loyalty:loyalty@127.0.0.1:1/loyalty"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": NOWHERE, "COLUMNS": "200"}
    full_env.update(env or {})
    return subprocess.run(
        [LEDGERCTL, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=60
    )


def test_publish_of_unsupported_warning_days_is_refused_cleanly(tmp_path: Path) -> None:
    data = yaml.safe_load(DEFAULT_RULESET.read_text(encoding="utf-8"))
    data["version"] = "warn.1"
    data["expiry"]["warn_days_before"] = [14]
    bad = tmp_path / "warn.yaml"
    bad.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    ran = run("rules", "publish", str(bad))
    assert ran.returncode == 2, ran.stderr
    assert "Traceback" not in ran.stderr
    lines = ran.stderr.strip().splitlines()
    assert lines[0].startswith("error: rule set "), ran.stderr
    assert "warn.yaml refused: expiry.warn_days_before:" in ran.stderr
    assert len(lines) <= 3, ran.stderr  # one message, wrapped at most by the terminal width


DATABASE_COMMANDS = [
    ("ledger", "verify"),
    ("ledger", "rebuild"),
    ("rules", "list"),
    ("rules", "list", "--json"),
    ("rules", "publish", str(DEFAULT_RULESET)),
    ("rules", "held", "list"),
    ("rules", "held", "release", "ev-1"),
    ("rules", "held", "reject", "ev-1"),
    ("dlq", "list"),
    ("dlq", "list", "--json", "--consumer", "rules", "--since", "24h"),
    ("dlq", "replay", "--consumer", "ledger", "--since", "24h"),
    ("dlq", "replay", "--id", "d-1", "--dry-run"),
    ("rules", "simulate", "--ruleset", str(DEFAULT_RULESET),
     "--from", "2026-01-01T00:00:00+08:00", "--to", "2026-02-01T00:00:00+08:00"),
]  # fmt: skip


@pytest.mark.parametrize("args", DATABASE_COMMANDS, ids=" ".join)
def test_an_unreachable_database_is_one_line_and_exit_code_2(args: tuple[str, ...]) -> None:
    ran = run(*args)
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert "Traceback" not in ran.stderr + ran.stdout
    assert ran.stderr.strip().splitlines() == [ran.stderr.strip()], ran.stderr
    assert ran.stderr.startswith("error: database: "), ran.stderr


@pytest.mark.parametrize("args", DATABASE_COMMANDS, ids=" ".join)
def test_every_database_command_documents_its_exit_codes(args: tuple[str, ...]) -> None:
    words = list(takewhile(lambda a: not a.startswith(("-", "/", "ev-")), args))
    ran = run(*words, "--help")
    assert ran.returncode == 0, ran.stderr
    text = " ".join(ran.stdout.split())  # as wrapped to the terminal's width
    assert "Exit codes: 0 " in text
    assert "2 refused input, or a database error" in text
    if words == ["ledger", "verify"]:
        assert "1 differences found" in ran.stdout


GBK = b'version: "c2"\neffective_from: 2030-01-01T00:00:00+08:00\n' + "# 规则\n".encode("gbk")
SIMULATE = ("rules", "simulate", "--from", "2026-01-01T00:00:00+08:00",
            "--to", "2026-02-01T00:00:00+08:00", "--ruleset")  # fmt: skip
FAR = "9999-12-31T23:00:00-10:00"


def _files(tmp: Path) -> dict[str, str]:
    (tmp / "gbk.yaml").write_bytes(GBK)
    default = DEFAULT_RULESET.read_text(encoding="utf-8").replace('"2026.1"', '"t.1"')
    (tmp / "dup.yaml").write_text(default + "\ntiers:\n  thresholds: {gold: 25000}\n")
    (tmp / "far.yaml").write_text(re.sub(r"(?m)^effective_from: .*$", f"effective_from: {FAR}",
                                         default))  # fmt: skip
    return {name: str(tmp / f"{name}.yaml") for name in ("gbk", "dup", "far")}


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """In this process (a console script per case costs a second or more)."""
    from services.ctl.cli import app

    return CliRunner().invoke(app, list(args), env={"DATABASE_URL": NOWHERE, "COLUMNS": "200",
                                                    **(env or {})})  # fmt: skip


BAD_PORT = {"DATABASE_URL": "postgres://x:y@127.0.0.1:notaport/db"}
PORT_OUT_OF_RANGE = {"DATABASE_URL": "postgres://x:y@127.0.0.1:99999/db"}
# (arguments, environment, what the one line says); {gbk} and the like are files.
REFUSED_INPUT = [
    (("rules", "publish", "{gbk}"), {}, "gbk.yaml refused: not UTF-8 (byte 0xb9 at offset"),
    ((*SIMULATE, "{gbk}"), {}, "gbk.yaml refused: not UTF-8"),
    (("rules", "publish", "{dup}"), {}, "tiers: key given twice (lines 8 and"),
    (("rules", "publish", "{far}"), {}, f"effective_from: {FAR} is out of range"),
    ((*SIMULATE, str(DEFAULT_RULESET), "-o", "{tmp}/none/q.json"), {}, "none/q.json: no directory"),
    (("rules", "list"), BAD_PORT, "database URL refused: invalid literal for int()"),
    (("rules", "held", "list"), PORT_OUT_OF_RANGE, "database URL refused: connect(): port must"),
    (("ledger", "verify"), BAD_PORT, "database URL refused:"),
    (("ledger", "rebuild"), PORT_OUT_OF_RANGE, "database URL refused:"),
    (("dlq", "list"), BAD_PORT, "database URL refused:"),
    (("dlq", "replay", "--limit", "5"), BAD_PORT, "database URL refused:"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "env", "says"), REFUSED_INPUT, ids=lambda v: str(v)[:60])
def test_refused_input_is_one_line_and_exit_code_2(
    args: tuple[str, ...], env: dict[str, str], says: str, tmp_path: Path
) -> None:
    """These were tracebacks (exit 1, which says "the answer is no"), or an operator's
    date reported as `error: database: ...`."""
    names = {**_files(tmp_path), "tmp": str(tmp_path)}
    ran = invoke(*(a.format(**names) for a in args), env=env)
    assert ran.exit_code == 2, (ran.exception, ran.output)
    assert ran.stderr.strip().splitlines() == [ran.stderr.strip()], ran.stderr
    assert ran.stderr.startswith("error: "), ran.stderr
    assert says in ran.stderr, ran.stderr


def test_a_rule_set_file_that_is_not_utf8_is_one_line_from_the_console_script(
    tmp_path: Path,
) -> None:
    ran = run("rules", "publish", _files(tmp_path)["gbk"])
    assert ran.returncode == 2, ran.stderr
    assert "Traceback" not in ran.stderr
    assert ran.stderr.startswith("error: rule set "), ran.stderr
    assert "not UTF-8" in ran.stderr, ran.stderr


BAD_OPTIONS = [
    ("dlq", "list", "--since", "99999999d"),
    ("dlq", "list", "--since", "0001-01-01T00:00:00+08:00"),
    ("dlq", "replay", "--since", "99999999d"),
    ("dlq", "replay", "--limit", "0"),
    (*SIMULATE[:2], "--from", "0001-01-01T00:00:00+08:00", "--to", "2026-01-01T00:00:00+08:00",
     "--ruleset", str(DEFAULT_RULESET)),
    (*SIMULATE[:2], "--from", "2026-01-01T00:00:00+08:00", "--to", FAR,
     "--ruleset", str(DEFAULT_RULESET)),
    ("ledger", "verify", "--limit", "0"),
    ("rules", "held", "list", "--limit", "0"),
    # One more row is asked for, to say "more than shown": near 2^63 a database error.
    ("rules", "held", "list", "--limit", str(2**63 - 1)),
    ("dlq", "list", "--limit", str(2**63 - 1)),
    ("dlq", "replay", "--limit", str(2**63 - 1)),
]  # fmt: skip


@pytest.mark.parametrize("args", BAD_OPTIONS, ids=" ".join)
def test_an_option_out_of_range_is_a_usage_error_before_any_connection(
    args: tuple[str, ...],
) -> None:
    ran = invoke(*args)
    assert ran.exit_code == 2, (ran.exception, ran.output)
    assert "Invalid value" in ran.stderr, ran.stderr
    assert "database" not in ran.stderr, ran.stderr


def test_held_list_limit_says_what_it_limits() -> None:
    ran = invoke("rules", "held", "list", "--help")
    assert "show at most this many" in ran.stdout, ran.stdout


def _no_backtest(
    monkeypatch: pytest.MonkeyPatch, then: Callable[[], None] = lambda: None
) -> list[int]:
    """`rules simulate` with an empty report instead of a backtest; counts the runs."""
    from services.ctl import rules_cmds
    from services.rules.simulate import Report, RuleRow

    ran: list[int] = []
    total = RuleRow("TOTAL", 0, 0, 0, Decimal(0), Decimal(0), Decimal(0), 0)

    def backtest(work: object) -> tuple[Report, int]:
        ran.append(1)
        then()
        return Report((), total, 0, 0, 0, 0, 0, (), "t.1"), 0

    monkeypatch.setattr(rules_cmds, "_with_db", backtest)
    monkeypatch.setattr(rules_cmds, "start_forkserver", lambda: None)
    return ran


def test_an_unwritable_output_is_refused_before_the_backtest_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """It ran the whole backtest (minutes), then failed with a traceback at the write."""
    ran = _no_backtest(monkeypatch)
    refused = [(tmp_path / "none" / "q.json", "no directory"), (tmp_path, "must end in"),
               (tmp_path / "d.csv", "is a directory")]  # fmt: skip
    for target, says in refused:
        (tmp_path / "d.csv").mkdir(exist_ok=True)
        out = invoke(*SIMULATE, str(DEFAULT_RULESET), "--output", str(target))
        assert out.exit_code == 2, (out.exception, out.output)
        assert says in out.stderr, out.stderr
    assert ran == []
    written = invoke(*SIMULATE, str(DEFAULT_RULESET), "--output", str(tmp_path / "q.json"))
    assert written.exit_code == 0, (written.exception, written.output)
    assert json.loads((tmp_path / "q.json").read_text())["candidate_version"] == "t.1"


def test_an_output_that_fails_at_the_write_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    folder = tmp_path / "reports"
    folder.mkdir()
    _no_backtest(monkeypatch, then=folder.rmdir)  # removed while the backtest ran
    out = invoke(*SIMULATE, str(DEFAULT_RULESET), "--output", str(folder / "q.csv"))
    assert out.exit_code == 2, (out.exception, out.output)
    *_, last = out.stderr.strip().splitlines()  # after the report and its rate
    assert last.startswith("error: --output "), out.stderr
    assert last.endswith("q.csv: No such file or directory"), out.stderr
