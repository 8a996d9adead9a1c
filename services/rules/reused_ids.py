"""An event id an upstream used again for another event.

The contract counts an event id once, so the rules drop a second copy of an id they hold.
A redelivery or a replay is the same event again, and dropping it is the point; but a till
that numbers its events per store, or a backfill that reuses ids, sends *another* purchase
under a held id, and dropping that one silently loses a payment nobody sees. Such a copy
is dead-lettered instead (`reused_event_id`): counted, listed by `ledgerctl dlq list`,
with where the copy that stands came from. Nothing is paid for it: the first copy stands,
as the contract says.

"Another event" is judged on the contract's fields of the parsed event (`same_event`:
times as instants, amounts as numbers), so a producer that writes the same event with
other spacing, key order, `800.0` for `800.00`, or with fields of its own added or
changed (a trace id, a send time: the contract lets producers add fields) is a
redelivery, not a reuse. Each copy is compared with the copy that stands: the held one if
the id is held, else the batch's first. Held copies are compared by a digest of their
bytes first, in the database, so a replay reads back 16 bytes an event, and parses a
stored payload only when the bytes differ.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Final

import asyncpg
from aiokafka.structs import ConsumerRecord
from pydantic import BaseModel

from schemas.activity import Activity, parse_activity
from services.common.dlq import Refused

LABEL: Final = "reused_event_id"
SELECT_RECORDED: Final = """
SELECT event_id, md5(payload) AS digest, topic, partition, "offset"
FROM rules_activity WHERE event_id = ANY($1::text[])
"""
SELECT_PAYLOADS: Final = "SELECT event_id, payload FROM rules_activity WHERE event_id = ANY($1)"

Arrived = tuple[ConsumerRecord, Activity]
FirstAt = tuple[str, int, int]  # where the copy that stands came from: topic, partition, offset


def digest(raw: bytes | None) -> str:
    return hashlib.md5(raw or b"", usedforsecurity=False).hexdigest()


def same_event(a: Activity, b: Activity) -> bool:
    return _same(a, b)


def _same(a: Any, b: Any) -> bool:
    """Equal in the models' declared fields, at every level: a producer's own fields (kept
    as pydantic extras, which `==` compares) do not make another event."""
    if isinstance(a, BaseModel) and isinstance(b, BaseModel):
        return type(a) is type(b) and all(
            _same(getattr(a, name), getattr(b, name)) for name in type(a).model_fields
        )
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


def refusal(event_id: str, first_at: FirstAt) -> Refused:
    topic, partition, offset = first_at
    return Refused(
        LABEL,
        f"event id {event_id!r} was used before by another event ({topic} partition "
        f"{partition} offset {offset}): the first was applied and this one is not (an "
        f"event id counts once); send it again under an id of its own",
    )


async def sort_out(
    conn: asyncpg.Connection, arrived: Sequence[Arrived]
) -> tuple[dict[str, Arrived], set[str], list[tuple[Arrived, FirstAt]]]:
    """Each id's first copy in the batch, the ids the rules already hold, and the copies
    that are another event than the one that stands (each with where that one came from):
    the held copy for a held id, else the batch's first."""
    first: dict[str, Arrived] = {}
    later: list[Arrived] = []
    for item in arrived:
        if first.setdefault(item[1].event_id, item) is not item:
            later.append(item)
    if not first:
        return first, set(), []
    held = {r["event_id"]: r for r in await conn.fetch(SELECT_RECORDED, list(first))}
    reused: list[tuple[Arrived, FirstAt]] = []
    unsure: list[Arrived] = []  # copies of held ids whose bytes differ from the held ones
    for item in (*first.values(), *later):
        event_id = item[1].event_id
        if event_id in held:
            if digest(item[0].value) != held[event_id]["digest"]:
                unsure.append(item)
        elif item is not first[event_id] and not same_event(first[event_id][1], item[1]):
            kept = first[event_id][0]
            reused.append((item, (kept.topic, kept.partition, kept.offset)))
    if unsure:
        ids = sorted({item[1].event_id for item in unsure})
        stored = {
            r["event_id"]: parse_activity(r["payload"], stored=True)
            for r in await conn.fetch(SELECT_PAYLOADS, ids)
        }
        for item in unsure:
            event_id = item[1].event_id
            if not same_event(stored[event_id], item[1]):
                at = held[event_id]
                reused.append((item, (at["topic"], at["partition"], at["offset"])))
    return first, set(held), reused
