"""`ledgerctl rules simulate` starts its workers' forkserver before its own imports.

The forkserver imports the backtest (~0.5 s) on the other core while the CLI imports
typer, rich and the commands, so the replay's workers start at once (bench/README.md,
step 19). Other commands start no forkserver, and importing `services.ctl` starts
nothing: a backtest worker imports it again while bootstrapping (the console script is
its `__mp_main__`), where starting the forkserver fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
import multiprocessing.forkserver as forkserver
calls = []
forkserver.ensure_running = lambda: calls.append("typer" in sys.modules)
sys.argv = ["ledgerctl", *json.loads(sys.argv[1])]
import services.ctl
calls.append("imported")
class Cli:  # the command tree, not run: only when the forkserver started matters here
    def app(self):
        calls.append("typer" in sys.modules)
sys.modules["services.ctl.cli"] = Cli()
services.ctl.main()
print(json.dumps(calls))
"""


def _forkserver_starts(*args: str) -> list[bool]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    result: list[bool] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_simulate_starts_the_forkserver_before_importing_the_cli() -> None:
    # Nothing on import; then one start, before typer (the CLI's first heavy import).
    assert _forkserver_starts("rules", "simulate", "--ruleset", "x.yaml") == [
        "imported",
        False,
        False,
    ]


def test_other_commands_start_no_forkserver() -> None:
    assert _forkserver_starts("ledger", "verify") == ["imported", False]
    assert _forkserver_starts("rules", "simulate", "--help") == ["imported", False]
