"""The owner's summary reconciles with the journal, and values the points as they can be
redeemed: each member's cash rounded down to the fen, as a cash redemption is."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from services.common.config import Settings
from services.common.consumer import BatchConsumer
from services.ledger import projector, redemptions, reports
from services.ledger.redemption import DEFAULT_POLICY
from services.ledger.rulebook import LedgerRules
from tests.integration import direct
from tests.integration.direct import consumer_of, migrated_pool
from tests.integration.ledger_helpers import grant, revoke, tier_report

pytestmark = pytest.mark.integration
TOPIC = "loyalty.grants.v1"


@pytest.fixture
async def ledger(fresh_database: str) -> AsyncIterator[tuple[asyncpg.Pool, BatchConsumer]]:
    settings = Settings(database_url=fresh_database, bootstrap_servers="")
    async with migrated_pool(fresh_database) as pool:
        handler = projector.make_handler(settings, "ledger", LedgerRules())
        yield pool, consumer_of(pool, "ledger", TOPIC, handler)


def _records(*events: dict[str, Any]) -> Any:
    return direct.records(TOPIC, *events)


async def test_debt_is_reported_and_liability_is_what_members_could_take(
    ledger: tuple[asyncpg.Pool, BatchConsumer],
) -> None:
    pool, consumer = ledger
    now = datetime.now(UTC)
    bought = grant("m-debt", 1000, now - timedelta(days=3))
    golds = [grant(f"m-g{i}", 1001, now - timedelta(days=2)) for i in range(100)]
    await consumer.process(_records(bought, grant("m-ok", 500, now - timedelta(days=2)), *golds))
    reports_ = [
        tier_report(f"m-g{i}", now - timedelta(days=2), "member", "gold", "30000",
                    ("diamond", "100000"), None)
        for i in range(100)
    ]  # fmt: skip
    await consumer.process(_records(*reports_))
    async with pool.acquire() as conn:
        spent = await redemptions.redeem(
            conn, "loyalty.ledger.v1", "m-debt", "r-1", points=800, reward=None, cash=None,
            store_id=None, now=now,
        )  # fmt: skip
        assert spent.status == 201
    # The purchase refunded in full after 800 of its 1,000 points were spent: 800 owed.
    await consumer.process(_records(revoke("m-debt", 1000, now, bought["data"]["order_id"])))
    async with pool.acquire() as conn:
        got = await reports.summary(
            conn, datetime(1970, 1, 1, tzinfo=UTC), now + timedelta(seconds=1), None, now
        )
    movement = got["issued"] - got["revoked"] - got["redeemed"] - got["expired"] + got["adjusted"]
    # Members in debt hold nothing (never below zero); the debt makes up the difference.
    assert (got["outstanding"], got["debt"]) == (100 * 1001 + 500, 800)
    assert got["outstanding"] - got["debt"] == movement
    # 1,001 points at gold's 80 a CNY are 12.51 to a member (12.5125 rounded down), not
    # 12.5125 summed over members and rounded once (1,251.25).
    could_take = 100 * DEFAULT_POLICY.cash_value("gold", 1001) + DEFAULT_POLICY.cash_value(
        "member", 500
    )
    assert Decimal(got["liability_cny"]) == could_take == Decimal("1256.00")
    async with pool.acquire() as conn:
        at_store = await reports.summary(
            conn, datetime(1970, 1, 1, tzinfo=UTC), now + timedelta(seconds=1), "s-1", now
        )
    assert at_store["debt"] is None  # a debt is a member's, not a store's
