"""`ledgerctl dlq ...`: the dead letters, the messages a service could not use.

A consumer that cannot parse or process a message records it in `dead_letters` (and
sends it to the dead-letter topic) in the transaction that moves past it; see
services/common/dlq.py. `list` reads the table (`DATABASE_URL`) and changes nothing.

`replay` sends letters' original bytes back to their source topic, once whatever made
the consumer refuse them is fixed. `events publish` cannot do it for a grant or a ledger
event (it takes activity alone), and re-sending a grant's activity does not either: the
rules service drops that event id as one it holds, so a grant the ledger dead-lettered
for a bug was otherwise lost for good. The bytes come from the table, which keeps them
whole (the DLQ topic's letter may be cut to size), and nothing in the table changes:
consumers dedupe on event ids, so a letter replayed twice counts once.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final

import asyncpg
import orjson
import typer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from schemas.activity import ACTIVITY_TOPIC, parse_activity
from schemas.grants import GRANTS_TOPIC, TierEvaluated, parse_grant
from schemas.ledger import LEDGER_TOPIC, parse_ledger_event
from services.common.config import KafkaAccess, load_settings
from services.common.dlq import Refused
from services.common.kafka_clients import BrokerUnreachable, start_client
from services.common.outbox import make_producer
from services.ctl.common import (
    MAX_LIMIT,
    TWO,
    err,
    exit_codes,
    fail,
    missing_topics,
    refusal,
    with_connection,
)
from services.rules.dated_ahead import refuse_dated_ahead

app = typer.Typer(
    help="Dead letters: messages a service could not use; list them, replay them.",
    no_args_is_help=True,
)
out = Console()

PREVIEW_BYTES: Final = 80
LIST_LETTERS: Final = """
SELECT dlq_id, consumer, topic, partition, "offset", reason, original, received_at
FROM dead_letters
WHERE ($1::text[] IS NULL OR consumer = ANY($1)) AND ($2::timestamptz IS NULL OR received_at >= $2)
    AND ($4::text[] IS NULL OR dlq_id = ANY($4))
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
    limit: Annotated[int, typer.Option(min=1, max=MAX_LIMIT, help="show at most this many")] = 50,
    consumer: Annotated[
        str | None,
        typer.Option(
            help="only this consumer's: rules, ledger, notifier, or a relay's (rules-relay,"
            " ledger-relay, notifier-relay) ($LOYALTY_TOPIC_PREFIX added if it names a"
            " consumer without it)"
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
    names = None if consumer is None else sorted({consumer, settings.consumer_prefix + consumer})

    async def work(conn: asyncpg.Connection) -> list[asyncpg.Record]:
        return list(await conn.fetch(LIST_LETTERS, names, start, limit + 1, None))

    rows = with_connection(settings.database_url, work)
    more, rows = len(rows) > limit, rows[:limit]
    if json_lines:
        for r in rows:
            print(json.dumps(as_json(r), ensure_ascii=False))
    else:
        table = Table(title="dead letters, newest first")
        # Whole on one line, however narrow the terminal: `dlq replay --id` takes it.
        table.add_column("dlq_id", no_wrap=True, min_width=36)
        for col in ("received_at", "consumer", "topic", "partition", "offset", "reason"):
            table.add_column(col, justify="right" if col in ("partition", "offset") else "left")
        table.add_column(f"original (first {PREVIEW_BYTES} bytes)", overflow="fold")
        for r in rows:
            table.add_row(
                r["dlq_id"],
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


# --- replay -----------------------------------------------------------------------------

# Each source topic (after any $LOYALTY_TOPIC_PREFIX) and the parser its consumer uses:
# the rules service's, the ledger's (projector.py), the notifier's. A letter of any other
# topic has no consumer here to take it back.
PARSERS: Final[tuple[tuple[str, Callable[[bytes], Any]], ...]] = (
    (ACTIVITY_TOPIC, parse_activity),
    (GRANTS_TOPIC, parse_grant),
    (LEDGER_TOPIC, parse_ledger_event),
)
REPLAY_CODES: Final = (
    "The letters `dlq list` shows with the same options, or those --id names, each checked"
    " with its consumer's model (activity, grant, ledger event; activity dated more than"
    " ACTIVITY_MAX_AHEAD_SECONDS after now is dated_ahead) and sent keyed by its member_id;"
    " one that still fails is reported and not sent (unless --force). Consumers"
    " dedupe on event ids: a letter replayed twice counts once. Exit codes: 0 every"
    " selected letter sent; 1 some still bad or skipped (each reported with its id and"
    f" why), the others sent; 2 {TWO}, or the broker's ('error: broker: ...')."
)


@dataclass(frozen=True)
class Letter:
    dlq_id: str
    topic: str
    original: bytes


@dataclass(frozen=True)
class Verdict:
    """What replay does with one letter: sends it keyed by `key`, or not, saying why."""

    letter: Letter
    key: bytes | None = None  # the member id: set when it is to be sent
    still_bad: str | None = None  # the reason its consumer would give now
    skipped: str | None = None  # why it cannot (or should not) be sent at all

    @property
    def forced(self) -> bool:
        return self.key is not None and self.still_bad is not None


def parser_for(topic: str) -> Callable[[bytes], Any] | None:
    for name, parse in PARSERS:
        if topic.endswith(name):  # the prefix is prepended as is ("t1." or "stg-")
            return parse
    return None


def member_of(raw: bytes) -> str | None:
    """The member id a message that fails its model still carries, if any (--force)."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    member = doc.get("member_id") if isinstance(doc, dict) else None
    return member if isinstance(member, str) and member else None


def judge(letter: Letter, force: bool = False, *, now: datetime, max_ahead_s: int) -> Verdict:
    """Validate `letter` with its consumer's model, and activity's date against `now`, when
    the broker would receive it: a message its consumer would dead-letter again is not sent
    unless forced (a consumer newer than this command may take it)."""
    parse = parser_for(letter.topic)
    if parse is None:
        return Verdict(letter, skipped=f"no service reads {letter.topic}")
    try:
        event = parse(letter.original)
        if parse is parse_activity:
            refuse_dated_ahead(event.occurred_at, now, max_ahead_s, "now")
    except (ValidationError, Refused) as exc:
        reason = refusal(exc)
        if not force:
            return Verdict(letter, still_bad=reason)
        member = member_of(letter.original)
        if member is None:
            return Verdict(letter, skipped=f"no member_id to key it by ({reason})")
        return Verdict(letter, key=member.encode(), still_bad=reason)
    if isinstance(event, TierEvaluated) and not force:
        # The ledger takes the tier report that arrives last as the member's tier now
        # (projector.py): re-sent late, an old one would put back a tier a newer replaced.
        return Verdict(
            letter,
            skipped="a tier report: arriving now it would replace any newer one as the"
            " member's tier (--force to send it)",
        )
    return Verdict(letter, key=str(event.member_id).encode())


def selection(
    ids: Sequence[str], consumer: str | None, since: str | None, limit: int | None
) -> str | None:
    """Why these options select nothing sensible, or None. Letters are named or filtered,
    never both; and never "all" by default, as with nothing given a replay would be."""
    if ids and (consumer is not None or since is not None or limit is not None):
        return "--id names the letters: give it alone, or select with --consumer/--since/--limit"
    if not ids and consumer is None and since is None and limit is None:
        return (
            "which letters? --id DLQ_ID (repeated), or --consumer/--since/--limit as for `dlq list`"
        )
    return None


def send_order(rows: Sequence[asyncpg.Record]) -> list[asyncpg.Record]:
    """Oldest first, in the order the consumer met them: one member's messages go back in
    their order (the selection is `dlq list`'s, newest first)."""
    return sorted(rows, key=lambda r: (r["received_at"], r["topic"], r["partition"], r["offset"]))


class UnknownTopics(Exception):
    pass


async def send(kafka: KafkaAccess, verdicts: list[Verdict]) -> dict[str, str]:
    """Sends to existing topics only (`missing_topics`); returns the letters the producer
    refused, with why."""
    missing = await missing_topics(kafka, {v.letter.topic for v in verdicts})
    if missing:
        raise UnknownTopics(", ".join(sorted(missing)))
    refused: dict[str, str] = {}
    producer = make_producer(kafka)
    try:
        await start_client(producer, kafka)
        pending = []
        for v in verdicts:
            try:
                pending.append(await producer.send(v.letter.topic, v.letter.original, key=v.key))
            except MessageSizeTooLargeError:  # over the producer's max_request_size
                refused[v.letter.dlq_id] = f"too big to send ({len(v.letter.original)} bytes)"
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return refused


def _report(kind: str, dlq_id: str, why: str) -> None:
    err.print(f"[red]{kind}[/red] {escape(dlq_id)}: {escape(why)}", highlight=False,
              markup=True, soft_wrap=True)  # fmt: skip


@app.command("replay", epilog=REPLAY_CODES)
def replay_cmd(
    ids: Annotated[
        list[str] | None, typer.Option("--id", help="this letter (dlq_id); repeat for more")
    ] = None,
    consumer: Annotated[
        str | None, typer.Option(help="the letters of this consumer, as for `dlq list`")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="received at or after: an RFC 3339 time, or 30m, 24h, 7d ago"),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            min=1, max=MAX_LIMIT, help="at most this many, the newest (50 with --consumer/--since)"
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="send letters their consumer would still refuse too")
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="validate and show only; send nothing")] = False,
) -> None:
    """Re-send dead letters' original bytes to their source topic, each checked first."""
    why = selection(ids or [], consumer, since, limit)
    if why is not None:
        raise fail(why)
    settings = load_settings()
    start = parse_since(since, datetime.now(UTC)) if since is not None else None
    names = None if consumer is None else sorted({consumer, settings.consumer_prefix + consumer})
    # Every letter named is looked for; filters take the newest, as `dlq list` shows them.
    most = None if ids else (limit or 50)

    async def work(conn: asyncpg.Connection) -> list[asyncpg.Record]:
        cap = None if most is None else most + 1
        return list(await conn.fetch(LIST_LETTERS, names, start, cap, ids or None))

    rows = with_connection(settings.database_url, work)
    more = most is not None and len(rows) > most
    letters = [
        Letter(r["dlq_id"], r["topic"], bytes(r["original"])) for r in send_order(rows[:most])
    ]
    now, ahead = datetime.now(UTC), settings.activity_max_ahead_seconds
    verdicts = [judge(x, force, now=now, max_ahead_s=ahead) for x in letters]
    found = {x.dlq_id for x in letters}
    skipped = [(i, "no such dead letter") for i in dict.fromkeys(ids or []) if i not in found]
    skipped += [(v.letter.dlq_id, v.skipped) for v in verdicts if v.skipped is not None]
    bad = [v for v in verdicts if v.key is None and v.still_bad is not None]
    go = [v for v in verdicts if v.key is not None]
    for v in bad:
        _report("still bad", v.letter.dlq_id, v.still_bad or "")
    for dlq_id, why_not in skipped:
        _report("skipped", dlq_id, why_not)
    if go and not dry_run:
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # the error below says it
        try:
            refused = asyncio.run(send(settings.kafka, go))
        except UnknownTopics as exc:
            raise fail(
                f"broker: {settings.bootstrap_servers} has no topic {exc}; nothing sent"
            ) from None
        except BrokerUnreachable as exc:  # names the broker and why, as the line below does
            raise fail(str(exc)) from exc
        except (KafkaError, OSError) as exc:
            raise fail(f"broker: {settings.bootstrap_servers}: {exc}") from exc
        for dlq_id, why_not in refused.items():
            _report("skipped", dlq_id, why_not)
        skipped += list(refused.items())
        go = [v for v in go if v.letter.dlq_id not in refused]
    verb = "would send" if dry_run else "sent"
    for v in go:
        forced = f" (forced: {v.still_bad})" if v.still_bad else ""
        line = f"{verb} {v.letter.dlq_id} to {v.letter.topic}, key {(v.key or b'').decode()}"
        out.print(Text(line + forced), highlight=False, soft_wrap=True)
    forced_n = sum(1 for v in go if v.forced)
    extra = f" ({forced_n} forced)" if forced_n else ""
    out.print(f"{verb} {len(go)}{extra}, still bad {len(bad)}, skipped {len(skipped)}",
              highlight=False)  # fmt: skip
    if more:
        err.print(f"more dead letters than selected: --limit {most} (the newest)")
    if bad or skipped:
        raise typer.Exit(1)
