"""`ledgerctl` reports operator mistakes and an unreachable database in one line, rc=2.

Runs the installed console script (as ops do) against a port nothing listens on, so no
database is needed: every check here happens before, or instead of, a connection.
"""

from __future__ import annotations

import os
import subprocess
import sys
from itertools import takewhile
from pathlib import Path

import pytest
import yaml

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
    assert "Exit codes: 0 " in ran.stdout
    assert "2 refused input, or a database error" in " ".join(ran.stdout.split())
    if words == ["ledger", "verify"]:
        assert "1 differences found" in ran.stdout
