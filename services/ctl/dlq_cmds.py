"""`ledgerctl dlq ...`: the dead letters, the messages a service could not use.

A consumer that cannot parse or process a message records it in `dead_letters` (and
sends it to the dead-letter topic) in the transaction that moves past it; see
services/common/dlq.py. This reads the table (`DATABASE_URL`) and changes nothing.
"""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Final

import asyncpg
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from services.common.config import load_settings
from services.ctl.common import err, exit_codes, with_connection

app = typer.Typer(help="Dead letters: messages a service could not use.", no_args_is_help=True)
out = Console()

PREVIEW_BYTES: Final = 80
LIST_LETTERS: Final = """
SELECT dlq_id, consumer, topic, partition, "offset", reason, original, received_at
FROM dead_letters
WHERE ($1::text[] IS NULL OR consumer = ANY($1)) AND ($2::timestamptz IS NULL OR received_at >= $2)
ORDER BY received_at DESC, topic, partition, "offset" DESC
LIMIT $3
"""
_AGO: Final = re.compile(r"(\d+)([mhd])")
_UNITS: Final = {"m": "minutes", "h": "hours", "d": "days"}


def parse_since(value: str, now: datetime) -> datetime:
    """An RFC 3339 time with its offset, or a span back from now: 30m, 24h, 7d."""
    ago = _AGO.fullmatch(value.strip())
    if ago:
        try:
            return now - timedelta(**{_UNITS[ago[2]]: int(ago[1])})
        except OverflowError as exc:  # 99999999d: before year 1
            raise typer.BadParameter(f"{value!r} reaches back before year 1") from exc
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter(
            f"{value!r} is neither a time (2026-11-20T15:04:05+08:00) nor a span (30m, 24h, 7d)"
        ) from exc
    if parsed.tzinfo is None:
        raise typer.BadParameter(f"{value!r} needs a UTC offset, e.g. 2026-11-20T15:04:05+08:00")
    try:  # compared as UTC: 0001-01-01T00:00:00+08:00 is a moment before year 1
        parsed.astimezone(UTC)
    except OverflowError as exc:
        raise typer.BadParameter(f"{value!r} is out of range (years 1 to 9999 in UTC)") from exc
    return parsed


def original_text(raw: bytes) -> tuple[str, str]:
    """(text, encoding) as the dead-letter topic carries it: UTF-8, or base64 if not."""
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode(), "base64"


def preview(raw: bytes, size: int = PREVIEW_BYTES) -> str:
    """The first ``size`` bytes on one line; bytes that are not UTF-8 as \\x escapes."""
    head = raw[:size]
    try:
        raw.decode("utf-8")
        text = head.decode("utf-8", "ignore")  # only a character cut at the end is dropped
    except UnicodeDecodeError:
        text = head.decode("utf-8", "backslashreplace")
    text = text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    return text + ("…" if len(raw) > size else "")


def as_json(row: asyncpg.Record) -> dict[str, object]:
    original, encoding = original_text(bytes(row["original"]))
    return {
        "dlq_id": row["dlq_id"],
        "consumer": row["consumer"],
        "topic": row["topic"],
        "partition": row["partition"],
        "offset": row["offset"],
        "reason": row["reason"],
        "received_at": row["received_at"].isoformat(),
        "original": original,
        "original_encoding": encoding,
    }


@app.command("list", epilog=exit_codes("listed (also when there is none)"))
def list_cmd(
    limit: Annotated[int, typer.Option(min=1, help="show at most this many")] = 50,
    consumer: Annotated[
        str | None,
        typer.Option(
            help="only this consumer's: rules, ledger or notifier ($LOYALTY_TOPIC_PREFIX"
            " added if it names a consumer without it)"
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="received at or after: an RFC 3339 time, or 30m, 24h, 7d ago"),
    ] = None,
    json_lines: Annotated[
        bool, typer.Option("--json", help="JSON lines (the whole original) instead of a table")
    ] = False,
) -> None:
    """Dead letters, newest first: who refused which message, why, and its first bytes."""
    settings = load_settings()
    start = parse_since(since, datetime.now(UTC)) if since is not None else None
    names = None if consumer is None else sorted({consumer, settings.group_prefix + consumer})

    async def work(conn: asyncpg.Connection) -> list[asyncpg.Record]:
        return list(await conn.fetch(LIST_LETTERS, names, start, limit + 1))

    rows = with_connection(settings.database_url, work)
    more, rows = len(rows) > limit, rows[:limit]
    if json_lines:
        for r in rows:
            print(json.dumps(as_json(r), ensure_ascii=False))
    else:
        table = Table(title="dead letters, newest first")
        for col in ("received_at", "consumer", "topic", "partition", "offset", "reason"):
            table.add_column(col, justify="right" if col in ("partition", "offset") else "left")
        table.add_column(f"original (first {PREVIEW_BYTES} bytes)", overflow="fold")
        for r in rows:
            table.add_row(
                r["received_at"].isoformat(timespec="seconds"),
                Text(r["consumer"]),
                Text(r["topic"]),
                str(r["partition"]),
                str(r["offset"]),
                Text(r["reason"]),
                Text(preview(bytes(r["original"]))),
            )
        out.print(table if rows else "no dead letters")
    if more:
        err.print(f"more dead letters than shown: --limit {limit} (newest first)")
