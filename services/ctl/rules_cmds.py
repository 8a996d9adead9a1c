"""`ledgerctl rules ...`: publish, list and backtest rule-set versions; review held events.

Every command talks to the rules service's Postgres (`DATABASE_URL`); none needs the
service stopped. Errors go to stderr with a non-zero exit code, so scripts can check.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Final, TypeVar

import asyncpg
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

import services.rules
from services.common.config import load_settings
from services.ctl.common import MAX_LIMIT, exit_codes, fail, with_connection
from services.rules import held as held_store
from services.rules.backtest import LaneWorkerError, report_csv, report_json, run_backtest
from services.rules.forkserver import start_forkserver
from services.rules.rulebook_store import VersionExists, list_versions, load_book, publish
from services.rules.ruleset import (
    RuleSetError,
    load_ruleset,
    publish_problems,
    read_ruleset_file,
)
from services.rules.simulate import Report

app = typer.Typer(
    help="Rule sets: publish versions, list them, backtest a change.", no_args_is_help=True
)
held_app = typer.Typer(help="Engagement held back as a burst: list, release, reject.")
app.add_typer(held_app, name="held", no_args_is_help=True)
out = Console()
err = Console(stderr=True)
T = TypeVar("T")


def _fail(message: str, code: int = 1) -> typer.Exit:
    return fail(message, code)


def _with_db(work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    return with_connection(load_settings().database_url, work)


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _when(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{value!r} is not an ISO 8601 time") from exc
    if parsed.tzinfo is None:
        raise typer.BadParameter(f"{value!r} needs a UTC offset, e.g. 2026-01-01T00:00:00+08:00")
    try:  # stored as UTC: 0001-01-01T00:00:00+08:00 is a moment before year 1
        parsed.astimezone(UTC)
    except OverflowError as exc:
        raise typer.BadParameter(f"{value!r} is out of range (years 1 to 9999 in UTC)") from exc
    return parsed


# Activity at or after a new version's start, already received (and so paid, or held
# under the version in force then). The index on occurred_at answers it.
RECEIVED_FROM: Final = (
    "SELECT count(*), max(occurred_at) FROM rules_activity WHERE occurred_at >= $1"
)


@app.command("publish", epilog=exit_codes("published, or already published unchanged"))
def publish_cmd(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    by: Annotated[str | None, typer.Option(help="who publishes (default: OS user)")] = None,
    allow_past: Annotated[
        bool,
        typer.Option(
            help="accept an effective_from in the past, or before activity already received:"
            " events already paid keep their grants, but a replay would price them under"
            " this version"
        ),
    ] = False,
) -> None:
    """Validate FILE and store it as a new version; running instances pick it up."""
    try:
        body = read_ruleset_file(file)
        ruleset = load_ruleset(body)
    except RuleSetError as exc:
        raise _fail(str(exc).replace("<text>", str(file), 1), code=2) from exc
    # What the ledger cannot honour (checked again by `publish`): refused before connecting.
    problems = publish_problems(ruleset)
    if problems:
        raise _fail(f"rule set {file} refused: {'; '.join(problems)}", code=2)

    async def work(conn: asyncpg.Connection) -> tuple[str, str | None]:
        stored = await conn.fetchval(
            "SELECT body FROM rules_rulesets WHERE version = $1", ruleset.version
        )
        if stored == body:  # the same file again: nothing to do, whenever it takes effect
            return "unchanged", None
        now = await conn.fetchval("SELECT now()")
        if stored is None and ruleset.effective_from < now and not allow_past:
            return "refused", (
                f"effective_from {ruleset.effective_from.isoformat()} is in the past: events "
                "already paid would be priced differently on replay; pick a later time or "
                "pass --allow-past"
            )
        # In the future, but before activity already received: a till whose clock runs
        # fast, a booking system that sends events ahead. Those are paid under the version
        # in force now, and a replay would price them under this one.
        if stored is None and not allow_past:
            count, latest = await conn.fetchrow(RECEIVED_FROM, ruleset.effective_from)
            if count:
                return "refused", (
                    f"effective_from {ruleset.effective_from.isoformat()} is before activity"
                    f" already received: {count} event(s) at or after it, the latest at"
                    f" {latest.astimezone(ruleset.effective_from.tzinfo).isoformat()}; they"
                    " would be priced differently on replay; pick a time after them or pass"
                    " --allow-past"
                )
        async with conn.transaction():
            await load_book(conn)  # seeds the default first, so earlier events keep it
            await publish(conn, body, by or _operator())  # other content: VersionExists
        return "published", None

    try:
        outcome, problem = _with_db(work)
    except VersionExists as exc:
        raise _fail(str(exc), code=2) from exc
    except RuleSetError as exc:
        raise _fail(f"rule set {file} refused: {exc}", code=2) from exc
    if problem:
        raise _fail(problem, code=2)
    effective = ruleset.effective_from.isoformat()
    if outcome == "unchanged":
        out.print(
            f"rule set {ruleset.version} is already published (unchanged; effective from"
            f" {effective}): nothing to do"
        )
        return
    out.print(f"published rule set {ruleset.version} (effective from {effective})")


def _json_value(value: object) -> object:
    """RFC 3339 for times (with their offset, as `held list --json` and the API write)."""
    if isinstance(value, datetime):
        return value.isoformat()
    return None if value is None else str(value)


@app.command("list", epilog=exit_codes())
def list_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table")] = False,
) -> None:
    """Every published version, oldest effective_from first."""
    rows = _with_db(list_versions)
    if as_json:
        for r in rows:
            print(json.dumps({k: _json_value(v) for k, v in dict(r).items()}))
        return
    table = Table(title="rule-set versions")
    for col in ("version", "effective_from", "published_at", "published_by"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["version"],
            r["effective_from"].isoformat(),
            r["published_at"].isoformat(timespec="seconds"),
            r["published_by"] or "",
        )
    out.print(table)


@held_app.command("list", epilog=exit_codes())
def held_list(
    status: Annotated[str, typer.Option(help="pending, released, rejected or all")] = "pending",
    limit: Annotated[int, typer.Option(min=1, max=MAX_LIMIT, help="show at most this many")] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table")] = False,
) -> None:
    """Engagement events held back as a burst, oldest first."""
    if status not in ("pending", "released", "rejected", "all"):
        raise typer.BadParameter("status must be pending, released, rejected or all")
    wanted = None if status == "all" else status
    rows = _with_db(lambda c: held_store.list_held(c, wanted, limit + 1))
    more, rows = len(rows) > limit, rows[:limit]
    if as_json:
        for r in rows:
            print(json.dumps(held_store.describe(r), default=str))
    else:
        table = Table(title=f"held engagement ({status})")
        for col in ("event_id", "member_id", "type", "occurred_at", "status", "reason"):
            table.add_column(col)
        for r in rows:
            table.add_row(
                r["event_id"],
                r["member_id"],
                r["type"],
                r["occurred_at"].isoformat(),
                r["status"],
                r["reason"],
            )
        out.print(table)
    if more:
        err.print(f"more held events than shown: --limit {limit} (oldest first)")


@held_app.command("release", epilog=exit_codes("released", "the event is not held, or not pending"))
def held_release(
    event_id: str, by: Annotated[str | None, typer.Option(help="operator")] = None
) -> None:
    """Pay a held event under the rule set in force at its time (cap and dedupe apply)."""
    settings = load_settings()
    try:
        d = _with_db(lambda c: held_store.release_held(c, settings, event_id, by or _operator()))
    except held_store.HeldError as exc:
        raise _fail(str(exc)) from exc
    out.print(
        f"released {d.event_id}: {d.points} points in {d.grants} grant(s) "
        f"under rule set {d.ruleset_version}"
    )


@held_app.command("reject", epilog=exit_codes("rejected", "the event is not held, or not pending"))
def held_reject(
    event_id: str, by: Annotated[str | None, typer.Option(help="operator")] = None
) -> None:
    """Refuse a held event for good: it is never paid."""
    try:
        _with_db(lambda c: held_store.reject_held(c, event_id, by or _operator()))
    except held_store.HeldError as exc:
        raise _fail(str(exc)) from exc
    out.print(f"rejected {event_id}")


def _unwritable(path: Path) -> str | None:
    """Why the report could not be written to `path`, or None."""
    parent = path.parent
    if path.is_dir():
        return "is a directory"
    if not parent.is_dir():
        return f"no directory {parent}"
    if path.exists():
        return None if os.access(path, os.W_OK) else "not writable"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"cannot write in {parent}"


def _table(report: Report, start: datetime, end: datetime) -> Table:
    table = Table(
        title=f"backtest {start.isoformat()} .. {end.isoformat()}: "
        f"in force ({', '.join(report.versions_in_force) or '-'}) vs "
        f"candidate {report.candidate_version}",
        caption=f"{report.events:,} events ({report.warmup_events:,} warm-up), "
        f"{report.members:,} members; held: {report.held_in_force} in force, "
        f"{report.held_candidate} candidate",
    )
    for col in ("rule", "in force", "candidate", "difference"):
        table.add_column(col, justify="right" if col != "rule" else "left")
    for col in ("cash in force", "cash candidate", "cash difference", "members affected"):
        table.add_column(col, justify="right")
    for row in (*report.rows, report.total):
        style = "bold" if row is report.total else None
        diff = f"[red]{row.difference:+,}[/red]" if row.difference > 0 else f"{row.difference:+,}"
        table.add_row(
            row.rule_id, f"{row.in_force:,}", f"{row.candidate:,}", diff,
            f"{row.cash_in_force:,}", f"{row.cash_candidate:,}", f"{row.cash_difference:+,}",
            f"{row.members_affected:,}", style=style,
            end_section=bool(report.rows) and row is report.rows[-1],
        )  # fmt: skip
    return table


@app.command("simulate", epilog=exit_codes("report written"))
def simulate_cmd(
    ruleset: Annotated[
        Path, typer.Option("--ruleset", exists=True, dir_okay=False, help="candidate YAML")
    ],
    start: Annotated[str, typer.Option("--from", help="period start, ISO 8601 with offset")],
    end: Annotated[str, typer.Option("--to", help="period end (exclusive)")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="write .json or .csv as well")
    ] = None,
    warmup: Annotated[
        bool,
        typer.Option(
            help="replay all recorded history before --from for member state only "
            "(tiers, first purchases, streaks); --no-warmup starts every member empty"
        ),
    ] = True,
) -> None:
    """Re-run recorded activity of a period under the rule book in force and a candidate."""
    t1, t2 = _when(start), _when(end)
    if t2 <= t1:
        raise typer.BadParameter("--to must be after --from")
    if output is not None and output.suffix.lower() not in (".json", ".csv"):
        raise typer.BadParameter("--output must end in .json or .csv")
    if output is not None:
        problem = _unwritable(output)
        if problem:  # known before a run that may take minutes, not after it
            raise _fail(f"--output {output}: {problem}", code=2)
    try:
        candidate = load_ruleset(ruleset)
    except RuleSetError as exc:
        raise _fail(str(exc), code=2) from exc
    # Held to what a publish requires: a candidate missing a tier's cash rate would value
    # that tier's points at nothing, silently, in a report about cost.
    problems = publish_problems(candidate)
    if problems:
        raise _fail(f"rule set {ruleset} refused: {'; '.join(problems)}", code=2)

    progress = Progress(
        TextColumn("replaying"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    task = progress.add_task("replay", total=None)

    async def work(conn: asyncpg.Connection) -> tuple[Report, int]:
        return await run_backtest(
            conn,
            candidate,
            t1,
            t2,
            warmup=warmup,
            on_total=lambda n: progress.update(task, total=n),
            on_progress=lambda n: progress.advance(task, n),
        )

    # Already running when this came in as `ledgerctl rules simulate` (services/ctl); if
    # not, its imports overlap with connecting and reading the rule book.
    start_forkserver()
    started = time.perf_counter()
    try:
        with progress:
            report, skipped = _with_db(work)
    except RuleSetError as exc:  # a stored version that no longer loads
        raise _fail(str(exc), code=2) from exc
    except LaneWorkerError as exc:  # a worker died (out of memory, killed) or failed
        raise _fail(f"backtest: {exc}", code=2) from exc
    seconds = time.perf_counter() - started
    out.print(_table(report, t1, t2))
    replayed = report.events + report.warmup_events
    err.print(
        f"replayed {replayed:,} events in {seconds:.2f} s "
        f"({replayed / seconds if seconds > 0 else 0:,.0f} events/s, both lanes, "
        f"reading included; compiled core: {'yes' if services.rules.NATIVE else 'no'})"
    )
    if skipped:
        err.print(f"[yellow]{skipped} recorded payloads no longer parse; skipped[/yellow]")
    if output is not None:
        text = (
            report_csv(report) if output.suffix.lower() == ".csv" else report_json(report, t1, t2)
        )
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as exc:  # checked before the run; a full disk, a directory gone
            raise _fail(f"--output {output}: {exc.strerror or exc}", code=2) from exc
        out.print(f"written {output}")
