"""`ledgerctl events ...`: send activity events to the broker, for ops and demos.

Each line of a JSON-lines file is one activity event of the contract (schemas/activity.py),
validated before it is sent: a line that would be dead-lettered (by the model, or as dated
too far ahead of now) is reported with its line number and not sent; the others are.
Events are keyed by member_id, as upstream systems and the services' own producers key
them, so one member's events stay in order on one partition. The broker is
$KAFKA_BOOTSTRAP_SERVERS and topics get $LOYALTY_TOPIC_PREFIX, as for the services.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Final

import typer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from schemas.activity import ACTIVITY_TOPIC, parse_activity
from services.common.config import KafkaAccess, load_settings
from services.common.dlq import Refused
from services.common.kafka_clients import BrokerUnreachable, start_client
from services.common.outbox import make_producer
from services.ctl.common import err, fail, missing_topics, refusal
from services.rules.dated_ahead import refuse_dated_ahead

app = typer.Typer(help="Activity events: send a file of them to the broker.", no_args_is_help=True)
out = Console()
EXIT_CODES = (
    "Exit codes: 0 every event sent; 1 some lines refused (reported with their line"
    " numbers), the others sent; 2 nothing sent: the file is unreadable, the topic not an"
    " activity topic or missing, or the broker unreachable ('error: broker: ...'); a dry"
    " run exits the same."
)


@dataclass
class Batch:
    events: list[tuple[int, bytes, bytes]] = field(default_factory=list)  # (line, key, value)
    refused: list[str] = field(default_factory=list)


def read_events(lines: list[str], now: datetime, max_ahead_s: int) -> Batch:
    """The events to send (line number, member_id key, the line as given) and the refused
    lines. Sent at `now`, the broker receives them then: the rules service judges their
    dates against that."""
    batch = Batch()
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        try:
            event = parse_activity(text)
            refuse_dated_ahead(event.occurred_at, now, max_ahead_s, "now")
        except (ValidationError, Refused) as exc:
            batch.refused.append(f"line {number}: {refusal(exc)}")
            continue
        batch.events.append((number, event.member_id.encode(), text.encode()))
    return batch


def topic_name(given: str, prefix: str) -> str:
    return given if not prefix or given.startswith(prefix) else prefix + given


def refused_topic(topic: str) -> str | None:
    """Why `topic` cannot take activity events, or None. The lines are checked as activity
    events, so sending them anywhere else (the grants topic, a typo) is refused. The
    services prepend $LOYALTY_TOPIC_PREFIX as it is ("t1." or "stg-"), so the configured
    activity topic is any name ending in the contract's."""
    if topic.endswith(ACTIVITY_TOPIC):
        return None
    return (
        f"--topic {topic}: this sends activity events, to {ACTIVITY_TOPIC}"
        " (with a prefix, e.g. stg.loyalty.activity.v1)"
    )


def _refused(problem: str) -> None:
    err.print(f"[red]refused[/red] {escape(problem)}", highlight=False, markup=True, soft_wrap=True)


class UnknownTopic(Exception):
    pass


# The producer's max_request_size (aiokafka's default, which `make_producer` keeps): a
# record estimated larger is refused by `send` before it reaches the broker.
MAX_REQUEST_BYTES: Final = 1_048_576


def too_big(events: list[tuple[int, bytes, bytes]]) -> dict[int, str]:
    """The lines the producer would refuse as too big (items are not capped), by the
    producer's own estimate, so that a dry run finds them as a real run does."""
    return {
        number: f"too big to send ({len(value)} bytes)"
        for number, key, value in events
        if DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, []) > MAX_REQUEST_BYTES
    }


async def send(
    kafka: KafkaAccess,
    topic: str,
    events: list[tuple[int, bytes, bytes]],
    *,
    dry_run: bool = False,
) -> dict[int, str]:
    """Sends to an existing topic only (`missing_topics`), checked for a dry run and with
    nothing to send too, so that they fail as a real run would; returns the lines refused
    as too big, with why. Raised from the loop, a too-big line stopped the lines after it
    while those before went out."""
    if await missing_topics(kafka, {topic}):
        raise UnknownTopic(topic)
    refused = too_big(events)
    events = [e for e in events if e[0] not in refused]
    if dry_run or not events:
        return refused
    producer = make_producer(kafka)
    try:
        await start_client(producer, kafka)
        pending = []
        for number, key, value in events:
            try:
                pending.append(await producer.send(topic, value, key=key))
            except MessageSizeTooLargeError:  # should `too_big`'s estimate ever differ
                refused[number] = f"too big to send ({len(value)} bytes)"
        await asyncio.gather(*pending)
    finally:
        await producer.stop()  # also after a failed start: no "Unclosed" warning
    return refused


@app.command("publish", epilog=EXIT_CODES)
def publish_cmd(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    topic: Annotated[
        str, typer.Option(help="the topic, $LOYALTY_TOPIC_PREFIX added if it lacks it")
    ] = ACTIVITY_TOPIC,
    dry_run: Annotated[
        bool, typer.Option(help="validate, and check the topic exists; send nothing")
    ] = False,
) -> None:
    """Validate each line of FILE (JSON lines) as an activity event and send the valid ones."""
    settings = load_settings()
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"{file}: {exc}") from exc
    batch = read_events(lines, datetime.now(UTC), settings.activity_max_ahead_seconds)
    for problem in batch.refused:
        _refused(problem)
    target = topic_name(topic, settings.topics.prefix)
    why = refused_topic(target)
    if why is not None:
        raise fail(why)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # the error below says it
    try:
        refused_big = asyncio.run(send(settings.kafka, target, batch.events, dry_run=dry_run))
    except UnknownTopic:
        raise fail(
            f"broker: {settings.bootstrap_servers} has no topic {target}; nothing sent"
            " (`make up` creates the topics; check $LOYALTY_TOPIC_PREFIX)"
        ) from None
    except BrokerUnreachable as exc:  # names the broker and why, as the line below does
        raise fail(str(exc)) from exc
    except (KafkaError, OSError) as exc:
        raise fail(f"broker: {settings.bootstrap_servers}: {exc}") from exc
    for number, why_not in refused_big.items():
        batch.refused.append(f"line {number}: {why_not}")
        _refused(batch.refused[-1])
    batch.events = [e for e in batch.events if e[0] not in refused_big]
    verb = "would send" if dry_run else "sent"
    refused = f"; {len(batch.refused)} line(s) refused" if batch.refused else ""
    out.print(f"{verb} {len(batch.events)} event(s) to {target}{refused}", highlight=False)
    if batch.refused:
        raise typer.Exit(1)
