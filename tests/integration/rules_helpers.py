"""Helpers for the rules integration tests: run `ledgerctl` as a real process, load YAML."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from services.rules.rulebook_store import DEFAULT_RULESET

ROOT = Path(__file__).resolve().parents[2]
# The console script `make setup` installs, as ops run it (not `python -m services.ctl`:
# a backtest's workers bootstrap differently under each).
LEDGERCTL = str(Path(sys.executable).with_name("ledgerctl"))


@dataclass(frozen=True)
class Ran:
    code: int
    stdout: str
    stderr: str


def ctl_sync(dsn: str, *args: str, env: dict[str, str] | None = None) -> Ran:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": dsn, "COLUMNS": "200"}
    full_env.update(env or {})
    proc = subprocess.run(
        [LEDGERCTL, "rules", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return Ran(proc.returncode, proc.stdout, proc.stderr)


async def ctl(dsn: str, *args: str, env: dict[str, str] | None = None) -> Ran:
    return await asyncio.to_thread(ctl_sync, dsn, *args, env=env)


def default_with(tmp: Path, name: str, **changes: Any) -> Path:
    """The default rule-set file with top-level sections merged/overridden; written to tmp."""
    data = yaml.safe_load(DEFAULT_RULESET.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = tmp / name
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path
