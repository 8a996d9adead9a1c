"""`ledgerctl` reports operator mistakes and an unreachable database in one line, rc=2.

Runs the installed console script (as ops do) against a port nothing listens on, so no
database is needed: every check here happens before, or instead of, a connection.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
