"""An event id an upstream used again for another event.

The contract counts an event id once, so the rules drop a second copy of an id they hold.
A redelivery or a replay is the same event again, and dropping it is the point; but a till
that numbers its events per store, or a backfill that reuses ids, sends *another* purchase
under a held id, and dropping that one silently loses a payment nobody sees. Such a copy
is dead-lettered instead (`reused_event_id`): counted, listed by `ledgerctl dlq list`,
with where the first copy came from. Nothing is paid for it: the first copy stands, as
the contract says.

"Another event" is judged on the parsed event (`Activity ==`: the same fields, times as
instants, amounts as numbers), so a producer that writes the same event with other
spacing, key order or `100.0` for `100.00` is a redelivery, not a reuse. Stored copies
are compared by a digest of their bytes first, in the database, so a replay reads back
16 bytes an event, and parses a stored payload only when the bytes differ.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final

import asyncpg
from aiokafka.structs import ConsumerRecord

from schemas.activity import Activity, parse_activity
from services.common.dlq import Refused

LABEL: Final = "reused_event_id"
SELECT_RECORDED: Final = """
SELECT event_id, md5(payload) AS digest, topic, partition, "offset"
FROM rules_activity WHERE event_id = ANY($1::text[])
"""
SELECT_PAYLOADS: Final = "SELECT event_id, payload FROM rules_activity WHERE event_id = ANY($1)"

Arrived = tuple[ConsumerRecord, Activity]
FirstAt = tuple[str, int, int]  # where an id's first copy came from: topic, partition, offset


def digest(raw: bytes | None) -> str:
    return hashlib.md5(raw or b"", usedforsecurity=False).hexdigest()


def same_event(a: Arrived, b: Arrived) -> bool:
    return a[0].value == b[0].value or a[1] == b[1]


def refusal(event_id: str, first_at: FirstAt) -> Refused:
    topic, partition, offset = first_at
    return Refused(
        LABEL,
        f"event id {event_id!r} was used before by another event ({topic} partition "
        f"{partition} offset {offset}): the first was applied and this one is not (an "
        f"event id counts once); send it again under an id of its own",
    )


def split_in_batch(
    arrived: Sequence[Arrived],
) -> tuple[dict[str, Arrived], list[tuple[Arrived, FirstAt]]]:
    """Each id's first copy in the batch, and the later copies that are another event."""
    first: dict[str, Arrived] = {}
    reused: list[tuple[Arrived, FirstAt]] = []
    for item in arrived:
        kept = first.setdefault(item[1].event_id, item)
        if kept is not item and not same_event(kept, item):
            reused.append((item, (kept[0].topic, kept[0].partition, kept[0].offset)))
    return first, reused


async def recorded(
    conn: asyncpg.Connection, first: dict[str, Arrived]
) -> tuple[set[str], list[tuple[Arrived, FirstAt]]]:
    """The ids of `first` the rules already hold, and the arrivals among them that are
    another event than the held one (each with where the held one came from)."""
    rows = await conn.fetch(SELECT_RECORDED, list(first))
    held = {r["event_id"] for r in rows}
    differ = {
        r["event_id"]: r for r in rows if r["digest"] != digest(first[r["event_id"]][0].value)
    }
    if not differ:
        return held, []
    reused = []
    for r in await conn.fetch(SELECT_PAYLOADS, list(differ)):
        arrived = first[r["event_id"]]
        if parse_activity(r["payload"], stored=True) != arrived[1]:
            at = differ[r["event_id"]]
            reused.append((arrived, (at["topic"], at["partition"], at["offset"])))
    return held, reused
