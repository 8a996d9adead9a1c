"""`ledgerctl`: the ops command line (rules, ledger). Each group lives in its own module."""

from __future__ import annotations

import sys

if sys.argv[1:3] == ["rules", "simulate"] and "--help" not in sys.argv:
    # Its workers' forkserver does its imports while this process does its own.
    from services.rules.forkserver import start_forkserver

    start_forkserver()

import typer

from services.ctl import ledger_cmds, rules_cmds

app = typer.Typer(
    help="Operate the loyalty ledger: publish and backtest rule sets, rebuild and verify.",
    no_args_is_help=True,
)
app.add_typer(rules_cmds.app, name="rules")
app.add_typer(ledger_cmds.app, name="ledger")


def main() -> None:
    app()
