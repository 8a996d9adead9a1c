"""The indirect referral bonus does not depend on how events are cut into batches, nor
on two partitions' batches applied at the same moment.

The rules service's batch handler is driven directly on a real Postgres, so each test
decides exactly which events share a batch and when it commits; a time-ordered replay is
the expected answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from structlog.testing import capture_logs

from services.common.config import load_settings
from services.common.consumer import BatchWork
from services.rules.app import RulesProcessor
from tests.integration.direct import migrated_pool, records
from tests.integration.events import CST, purchase, referral, refund, registered
from tests.integration.harness import wait_until

pytestmark = pytest.mark.integration

DAY = timedelta(days=1)
T0 = datetime(2026, 3, 2, 10, tzinfo=CST)


@dataclass
class Rules:
    """The rules service's batch handler on a fresh database; the grants it emitted."""

    pool: asyncpg.Pool
    proc: RulesProcessor
    topic: str
    grants: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, conn: asyncpg.Connection, *events: dict[str, Any]) -> None:
        work = BatchWork()
        await self.proc.handle(conn, records(self.topic, *events), work)
        self.grants.extend(orjson.loads(r.payload) for r in work.outbox)

    async def run(self, *events: dict[str, Any]) -> None:
        """`events` as one batch, committed."""
        async with self.pool.acquire() as conn, conn.transaction():
            await self.handle(conn, *events)


@pytest.fixture
async def rules(fresh_database: str) -> AsyncIterator[Rules]:
    settings = dataclasses.replace(load_settings(), database_url=fresh_database)
    async with migrated_pool(fresh_database) as pool:
        proc = RulesProcessor(settings, "rules")
        await proc.refresh_book(pool)
        yield Rules(pool, proc, settings.topics.activity)


def _points(grants: list[dict[str, Any]], member: str) -> int:
    sign = {"points_granted": 1, "points_revoked": -1}
    return sum(
        sign.get(g["type"], 0) * g["data"]["points"] for g in grants if g["member_id"] == member
    )


async def _b_buys_twice(run: Callable[..., Awaitable[None]]) -> None:
    """A refers B; B's first purchase is O1, then O2. A's own sign-up is not applied yet."""
    await run(registered("B", T0 + timedelta(hours=1), referrer="A"))
    await run(purchase("B", "800.00", T0 + DAY, order_id="O1"))
    await run(purchase("B", "300.00", T0 + DAY + timedelta(hours=1), order_id="O2"))


def _b_refunds_both() -> list[dict[str, Any]]:
    """O2 is refunded first, then O1, B's first purchase: both in full."""
    return [
        refund("B", "O2", "300.00", T0 + 2 * DAY),
        refund("B", "O1", "800.00", T0 + 2 * DAY + timedelta(minutes=1)),
    ]


@pytest.mark.parametrize("one_batch", [True, False], ids=["one-batch", "two-batches"])
async def test_a_late_indirect_bonus_is_taken_back_by_the_first_purchases_refund(
    rules: Rules, one_batch: bool
) -> None:
    run, grants = rules.run, rules.grants
    await _b_buys_twice(run)
    # A's sign-up (naming C) arrives late, dated before B's first purchase: C paid late.
    await run(registered("A", T0, referrer="C"))
    assert _points(grants, "C") == 50
    refunds = _b_refunds_both()
    if one_batch:
        await run(*refunds)
    else:
        for r in refunds:
            await run(r)
    assert _points(grants, "A") == 0
    assert _points(grants, "C") == 0


async def test_no_late_indirect_bonus_is_owed_for_a_first_purchase_refunded_in_full(
    rules: Rules,
) -> None:
    run, grants = rules.run, rules.grants
    await _b_buys_twice(run)
    await run(*_b_refunds_both())
    # Only now A's sign-up: in time order C was granted the bonus and it was taken back.
    await run(registered("A", T0, referrer="C"))
    assert _points(grants, "C") == 0


async def test_a_referrers_sign_up_waits_for_a_purchase_whose_first_naming_was_ignored(
    rules: Rules,
) -> None:
    """B names itself (ignored), then A, and buys, in one batch; A's sign-up naming C is
    applied on another partition before that batch commits. It must wait for A's lock, or
    each misses the other and C is never paid."""
    waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    async with rules.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await rules.handle(
            conn,
            registered("B", T0 + timedelta(hours=1), referrer="B"),
            referral("B", "A", T0 + timedelta(hours=2)),
            purchase("B", "800.00", T0 + DAY, order_id="O1"),
        )
        a_joins = asyncio.create_task(rules.run(registered("A", T0, referrer="C")))

        async def settled() -> bool:
            return a_joins.done() or bool(await rules.pool.fetchval(waiting))

        await wait_until(settled, timeout=10, what="A's sign-up to finish or wait")
        await tx.commit()
    await a_joins
    assert _points(rules.grants, "A") == 500
    assert _points(rules.grants, "C") == 50


@pytest.mark.parametrize("trimmed", ["purchase", "refund"])
async def test_a_late_bonus_whose_activity_was_trimmed_is_skipped_and_the_sign_up_applied(
    rules: Rules, trimmed: str
) -> None:
    """Ops may delete old `rules_activity` rows (README: Trimming kept activity). A late
    bonus cannot be built under its grant id without the purchase, nor taken back without
    the full refund, so it is skipped (logged); A's sign-up itself must still apply."""
    run, grants = rules.run, rules.grants
    await _b_buys_twice(run)
    if trimmed == "purchase":
        # As README says to trim: by time, here B's sign-up and first purchase (O1).
        gone = await rules.pool.fetchval(
            "SELECT event_id FROM rules_activity WHERE type = 'purchase' ORDER BY occurred_at"
        )
        await rules.pool.execute(
            "DELETE FROM rules_activity WHERE occurred_at < $1", T0 + DAY + timedelta(minutes=1)
        )
    else:
        # O1 refunded in full, and only the refund's row gone: paying C without the
        # take-back would pay for a refunded order.
        o1_refund = refund("B", "O1", "800.00", T0 + 2 * DAY)
        await run(o1_refund)
        gone = o1_refund["event_id"]
        await rules.pool.execute("DELETE FROM rules_activity WHERE event_id = $1", gone)
    with capture_logs() as logs:
        await run(registered("A", T0, referrer="C"))
    a = "SELECT referrer_id FROM rules_member_state WHERE member_id = 'A'"
    assert await rules.pool.fetchval(a) == "C"
    assert not [g for g in grants if g["member_id"] == "C"]
    said = [e for e in logs if e["event"] == "referral_late_event_missing"]
    assert [(e["member_id"], e["referrer_id"], e["indirect_member_id"], e["missing"])
            for e in said] == [("B", "A", "C", [gone])]  # fmt: skip
