"""Helpers for the ledger's integration tests: grants straight to the grants topic (no
rules service needed), HTTP calls with a role's key, a generated journal, verify."""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx

from schemas.grants import (
    GrantData,
    PointsGranted,
    PointsRevoked,
    RevokeData,
    Tier,
    TierData,
    TierEvaluated,
)
from services.common.config import Settings
from services.common.runtime import create_pool
from services.ledger import accounting as acc
from services.ledger.journal import ENTRY_COLUMNS, entry_record
from services.ledger.rebuild import verify
from tests.integration.harness import OPS_KEY, Stack, wait_until


def grant(
    member: str,
    points: int,
    at: datetime,
    *,
    rule: str = "base",
    store: str | None = "sh-jingan",
    pending_days: int = 0,
    event_id: str | None = None,
) -> dict[str, Any]:
    event = PointsGranted(
        event_id=event_id or str(uuid.uuid4()),
        occurred_at=at,
        member_id=member,
        data=GrantData(
            rule_id=rule,
            ruleset_version="test-v1",
            points=points,
            source_event_id=str(uuid.uuid4()),
            source_type="purchase",
            store_id=store,
            order_id=f"o-{uuid.uuid4().hex[:10]}",
            pending_days=pending_days,
        ),
    )
    return event.model_dump(mode="json")


def revoke(member: str, points: int, at: datetime, order_id: str) -> dict[str, Any]:
    """A refund's take-back, as the rules service sends it."""
    event = PointsRevoked(
        event_id=str(uuid.uuid4()),
        occurred_at=at,
        member_id=member,
        data=RevokeData(
            rule_id="base",
            ruleset_version="test-v1",
            points=points,
            source_event_id=str(uuid.uuid4()),
            order_id=order_id,
        ),
    )
    return event.model_dump(mode="json")


def tier_report(
    member: str,
    at: datetime,
    previous: Tier,
    tier: Tier,
    spend: str,
    next_tier: tuple[Tier, str] | None,
    valid_until: datetime | None,
) -> dict[str, Any]:
    """A rules service's tier report (`tier_evaluated`), as a purchase would send it."""
    event = TierEvaluated(
        event_id=str(uuid.uuid4()),
        occurred_at=at,
        member_id=member,
        data=TierData(
            tier=tier,
            previous_tier=previous,
            qualifying_spend=Decimal(spend),
            tier_valid_until=valid_until,
            ruleset_version="test-v1",
            source_event_id=str(uuid.uuid4()),
            next_tier=next_tier[0] if next_tier else None,
            next_tier_spend=Decimal(next_tier[1]) if next_tier else None,
        ),
    )
    return event.model_dump(mode="json")


async def give(stack: Stack, *grants: dict[str, Any]) -> None:
    """Produce grants and wait until the ledger journaled all of them."""
    await stack.produce(list(grants), topic=stack.topics.grants)
    ids = [g["event_id"] for g in grants]
    await wait_until(
        lambda: stack.scalar(
            "SELECT count(*) = $2 FROM ledger_entries WHERE entry_id = ANY($1::text[])",
            ids,
            len(ids),
        ),
        what="grants journaled",
    )


async def post(stack: Stack, path: str, body: Any, key: str | None = OPS_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=stack.api, timeout=30) as client:
        return await client.post(path, json=body, headers=headers)


async def member(stack: Stack, member_id: str) -> dict[str, Any]:
    resp = await stack.get(f"/v1/members/{member_id}")
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def assert_problem(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = dict(resp.json())
    assert body["status"] == status
    assert body["title"]
    return body


async def assert_verified(dsn: str) -> None:
    """`ledger verify`: the read models equal the fold of the journal."""
    report = await verify(dsn)
    assert report.differences == [], report.differences[:20]


async def pool_for(dsn: str) -> asyncpg.Pool:
    return await create_pool(Settings(database_url=dsn, bootstrap_servers=""), min_size=1)


def generate_journal(members: int, per_member: int, start: datetime, seed: int = 7) -> list[Any]:
    """A realistic journal through the pure core: earns (some pending), redemptions,
    refunds, adjustments and expiries, time moving forward per member."""
    rnd = random.Random(seed)
    records: list[Any] = []
    for m in range(members):
        member_id = f"m-{m:05d}"
        book = acc.Book(member_id=member_id)
        now = start
        n = 0
        while n < per_member:
            now += timedelta(hours=rnd.randint(1, 24 * 12))
            roll = rnd.random()
            cmd: acc.Command
            if roll < 0.55:
                cmd = acc.Earn(
                    entry_id=f"{member_id}-e{n}",
                    points=rnd.randint(5, 3000),
                    occurred_at=now,
                    rule_id=rnd.choice(["base", "review", "sign_in", "big_ticket"]),
                    ruleset_version="v1",
                    source_event_id=f"src-{member_id}-{n}",
                    order_id=f"o-{rnd.randint(0, 5)}",
                    store_id=rnd.choice(["sh-jingan", "sh-xuhui"]),
                    pending_days=rnd.choice([0, 0, 0, 7]),
                )
            elif roll < 0.80:
                cmd = acc.Redeem(
                    entry_id=f"{member_id}-r{n}",
                    points=rnd.randint(100, 2000),
                    at=now,
                    redemption_id=f"red-{member_id}-{n}",
                )
            elif roll < 0.88:
                cmd = acc.Revoke(
                    entry_id=f"{member_id}-v{n}",
                    points=rnd.randint(10, 800),
                    occurred_at=now,
                    order_id=f"o-{rnd.randint(0, 5)}",
                    rule_id="base",
                    ruleset_version="v1",
                    source_event_id=f"src-{member_id}-{n}",
                )
            elif roll < 0.95:
                cmd = acc.Adjust(
                    entry_id=f"{member_id}-a{n}",
                    points=rnd.choice([-1, 1]) * rnd.randint(1, 500),
                    at=now,
                    reason="goodwill",
                    operator="ops-1",
                    adjustment_id=f"adj-{member_id}-{n}",
                    allow_debt=True,
                )
            else:
                cmd = acc.Expire(now)
            try:
                entries = acc.decide(book, cmd)
            except acc.LedgerError:
                continue
            for entry in entries[: per_member - n]:
                book = acc.evolve(book, entry)
                records.append(entry_record(entry))
                n += 1
    return records


async def copy_journal(conn: asyncpg.Connection, records: list[Any]) -> None:
    await conn.copy_records_to_table("ledger_entries", records=records, columns=ENTRY_COLUMNS)
