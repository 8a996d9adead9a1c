"""`ledgerctl ledger ...`: rebuild read models from the journal, verify them."""

from __future__ import annotations

import os
import time

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from services.common.runtime import tune_gc
from services.ctl.common import exit_codes, fail, run_db, with_connection
from services.ledger import rebuild as rb

app = typer.Typer(
    help="Ledger read models: rebuild from the journal, verify.", no_args_is_help=True
)
console = Console()
DEFAULT_DSN = "postgresql://loyalty:loyalty@127.0.0.1:55432/loyalty"
DsnOption = typer.Option(
    None, "--database-url", help="Postgres DSN; default $DATABASE_URL, then the make-up default"
)


def _dsn(given: str | None) -> str:
    return given or os.environ.get("DATABASE_URL") or DEFAULT_DSN


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("entries"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _steps() -> Progress:
    """For work told by step, not by count: the step in progress and the time so far."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def _total(dsn: str) -> int:
    return with_connection(dsn, rb.count_entries)


@app.command(epilog=exit_codes("rebuilt"))
def rebuild(database_url: str | None = DsnOption) -> None:
    """Rebuild member totals and lots from the journal: built aside, swapped in one step.

    One at a time: while another rebuild runs, this one does nothing and exits 2.
    """
    tune_gc()  # +13 % on 500k entries (bench/experiments/rebuild_gc.py)
    dsn = _dsn(database_url)
    # One connection first: an unusable URL or an unreachable database is one error line
    # here, not a traceback from inside the rebuild's own connections.
    with_connection(dsn, lambda conn: conn.fetchval("SELECT 1"))
    started = time.monotonic()
    with _steps() as steps:
        task = steps.add_task("starting", total=None)

        def phase(name: str) -> None:
            elapsed = time.monotonic() - started
            console.print(f"[dim]{elapsed:6.1f}s[/dim] {name}", highlight=False)
            steps.update(task, description=name)

        try:
            report = run_db(rb.rebuild(dsn, phase))
        except rb.RebuildRunning as exc:
            raise fail(str(exc)) from exc
    console.print(
        f"rebuilt {report.members} members, {report.lots} lots from {report.entries} entries"
        f" ({report.caught_up} members caught up at the swap)"
    )
    if report.swap_retries:
        console.print(
            f"the swap was retried {report.swap_retries} time(s)"
            " (a deadlock or lock timeout with a concurrent writer)"
        )


@app.command(epilog=exit_codes("read models match the journal", "differences found"))
def verify(
    database_url: str | None = DsnOption,
    limit: int = typer.Option(200, min=1, help="print at most this many differences"),
) -> None:
    """Recompute balances, lots and tiers from the journal; exit 1 on any difference."""
    dsn = _dsn(database_url)
    total = _total(dsn)
    with _progress() as bar:
        task = bar.add_task("verifying", total=total)
        report = run_db(rb.verify(dsn, lambda n: bar.advance(task, n)))
    for line in report.differences[:limit]:
        console.print(f"[red]DIFF[/red] {line}", highlight=False)
    if len(report.differences) > limit:
        console.print(f"... and {len(report.differences) - limit} more")
    if report.differences:
        console.print(
            f"[red]{len(report.differences)} difference(s)[/red] across {report.members} members"
        )
        raise typer.Exit(1)
    console.print(
        f"[green]ok[/green]: {report.members} members, {report.entries} entries match the journal"
    )
