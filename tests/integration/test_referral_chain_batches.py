"""The indirect referral bonus does not depend on how events are cut into batches.

The rules service's batch handler is driven directly on a real Postgres, so each test
decides exactly which events share a batch; a time-ordered replay is the expected answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import orjson
import pytest

from services.common.config import load_settings
from services.common.consumer import BatchWork
from services.rules.app import RulesProcessor
from tests.integration.direct import migrated_pool, records
from tests.integration.events import CST, purchase, refund, registered

pytestmark = pytest.mark.integration

Batch = Callable[..., Awaitable[None]]
DAY = timedelta(days=1)
T0 = datetime(2026, 3, 2, 10, tzinfo=CST)


@pytest.fixture
async def batch(fresh_database: str) -> AsyncIterator[tuple[Batch, list[dict[str, Any]]]]:
    """Runs its events as one batch of the rules service; the grants it emitted so far."""
    settings = dataclasses.replace(load_settings(), database_url=fresh_database)
    async with migrated_pool(fresh_database) as pool:
        proc = RulesProcessor(settings, "rules")
        await proc.refresh_book(pool)
        grants: list[dict[str, Any]] = []

        async def run(*events: dict[str, Any]) -> None:
            work = BatchWork()
            async with pool.acquire() as conn, conn.transaction():
                await proc.handle(conn, records(settings.topics.activity, *events), work)
            grants.extend(orjson.loads(r.payload) for r in work.outbox)

        yield run, grants


def _points(grants: list[dict[str, Any]], member: str) -> int:
    sign = {"points_granted": 1, "points_revoked": -1}
    return sum(
        sign.get(g["type"], 0) * g["data"]["points"] for g in grants if g["member_id"] == member
    )


async def _b_buys_twice(run: Batch) -> None:
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
    batch: tuple[Batch, list[dict[str, Any]]], one_batch: bool
) -> None:
    run, grants = batch
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
    batch: tuple[Batch, list[dict[str, Any]]],
) -> None:
    run, grants = batch
    await _b_buys_twice(run)
    await run(*_b_refunds_both())
    # Only now A's sign-up: in time order C was granted the bonus and it was taken back.
    await run(registered("A", T0, referrer="C"))
    assert _points(grants, "C") == 0
