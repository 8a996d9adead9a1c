"""The `ledgerctl` command tree (see `services.ctl.main`)."""

from __future__ import annotations

import typer

from services.ctl import dlq_cmds, events_cmds, ledger_cmds, rules_cmds

app = typer.Typer(
    help="Operate the loyalty ledger: publish and backtest rule sets, rebuild and verify,"
    " read and replay dead letters, send activity events.",
    no_args_is_help=True,
)
app.add_typer(rules_cmds.app, name="rules")
app.add_typer(ledger_cmds.app, name="ledger")
app.add_typer(dlq_cmds.app, name="dlq")
app.add_typer(events_cmds.app, name="events")
