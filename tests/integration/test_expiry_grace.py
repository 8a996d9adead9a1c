"""A refund dated before a lot's expiry but arriving after it takes back from that lot,
whether the expiry sweep or the consumer saw the lapse first: both wait
`EXPIRY_GRACE_SECONDS` before journaling an expiry (dated at the expiry all the same).
Without the grace the member's debt depended on which came first.

Drives the ledger's real grants handler (no broker) and the real sweeper on Postgres."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiokafka.structs import ConsumerRecord

from services.common.config import Settings
from services.common.consumer import BatchConsumer
from services.ledger import projector
from services.ledger.accounting import add_months
from services.ledger.rulebook import LedgerRules
from services.ledger.sweeper import ExpirySweeper
from tests.integration import direct
from tests.integration.direct import consumer_of, migrated_pool
from tests.integration.ledger_helpers import grant, revoke

pytestmark = pytest.mark.integration
TOPIC = "loyalty.grants.v1"
GRACE = 3600


@pytest.fixture
async def ledger(fresh_database: str) -> AsyncIterator[tuple[asyncpg.Pool, BatchConsumer]]:
    settings = Settings(database_url=fresh_database, bootstrap_servers="",
                        expiry_grace_seconds=GRACE)  # fmt: skip
    async with migrated_pool(fresh_database) as pool:
        handler = projector.make_handler(settings, "ledger", LedgerRules())
        yield pool, consumer_of(pool, "ledger", TOPIC, handler)


def records(*events: dict[str, Any]) -> list[ConsumerRecord]:
    return direct.records(TOPIC, *events)


async def test_a_late_refund_takes_back_from_a_lot_lapsed_within_the_grace(
    ledger: tuple[asyncpg.Pool, BatchConsumer],
) -> None:
    pool, consumer = ledger
    now = datetime.now(UTC)
    lapsed = now - timedelta(minutes=5)  # lot B lapsed five minutes ago
    # A: the refunded order's lot, lapsed long ago (past the grace: expired at once).
    a = grant("m-r", 1000, add_months(lapsed, -12) - timedelta(days=10))
    b = grant("m-r", 500, add_months(lapsed, -12))
    await consumer.process(records(a, b))
    sweeper = ExpirySweeper(pool, "loyalty.ledger.v1", 60, lambda: None, grace_s=GRACE)
    await sweeper.sweep_once(now)  # the sweep comes before the refund
    expired = await pool.fetch("SELECT allocations->0->>0 AS lot FROM ledger_entries"
                               " WHERE kind = 'expire'")  # fmt: skip
    assert [r["lot"] for r in expired] == [a["event_id"]]

    # The refund of A's order, dated a minute before B lapsed, arrives now: A is gone, so it
    # takes B's 500, and the rest becomes debt (as if it had arrived on time).
    await consumer.process(records(revoke("m-r", 1000, lapsed - timedelta(minutes=1),
                                          a["data"]["order_id"])))  # fmt: skip
    member = await pool.fetchrow("SELECT debt, expired, revoked FROM ledger_members")
    assert dict(member) == {"debt": 500, "expired": 1000, "revoked": 1000}

    # After the grace nothing of B is left to expire.
    assert await sweeper.sweep_once(now + timedelta(seconds=GRACE + 60)) == (0, 0)
    member = await pool.fetchrow("SELECT debt, expired FROM ledger_members")
    assert dict(member) == {"debt": 500, "expired": 1000}


async def test_after_the_grace_the_sweep_journals_the_expiry_dated_when_it_lapsed(
    ledger: tuple[asyncpg.Pool, BatchConsumer],
) -> None:
    pool, consumer = ledger
    now = datetime.now(UTC)
    lapsed = now - timedelta(minutes=5)
    b = grant("m-s", 500, add_months(lapsed, -12))
    await consumer.process(records(b))
    sweeper = ExpirySweeper(pool, "loyalty.ledger.v1", 60, lambda: None, grace_s=GRACE)
    assert (await sweeper.sweep_once(now))[0] == 0
    # Reads stop counting it at its expiry all the same.
    held = "SELECT sum(remaining) FROM ledger_lots WHERE expires_at > $1"
    assert await pool.fetchval(held, now) is None
    assert (await sweeper.sweep_once(now + timedelta(seconds=GRACE)))[0] == 1
    row = await pool.fetchrow("SELECT points, occurred_at FROM ledger_entries"
                              " WHERE kind = 'expire'")  # fmt: skip
    assert row["points"] == -500
    assert row["occurred_at"] == add_months(datetime.fromisoformat(b["occurred_at"]), 12)
