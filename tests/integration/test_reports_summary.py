"""The owner's summary reconciles with the journal, and values the points as they can be
redeemed: each member's cash rounded down to the fen, as a cash redemption is."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from services.common.config import Settings
from services.common.consumer import BatchConsumer
from services.ledger import projector, redemptions, reports
from services.ledger.rebuild import rebuild, verify
from services.ledger.redemption import DEFAULT_POLICY
from services.ledger.rulebook import LedgerRules
from tests.integration import direct
from tests.integration.direct import consumer_of, migrated_pool
from tests.integration.ledger_helpers import (
    copy_journal,
    generate_journal,
    grant,
    revoke,
    tier_report,
)

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


async def test_a_debt_beside_points_is_not_counted_twice(
    ledger: tuple[asyncpg.Pool, BatchConsumer],
) -> None:
    """A refund dated ahead of the clock takes only from lots unexpired at its date: the
    member owes 300 and still holds 1,000 points expiring before it. `outstanding` takes
    the 300 off their points already; the whole 300 again as `debt` counted it twice."""
    pool, consumer = ledger
    now = datetime.now(UTC)
    await consumer.process(_records(grant("m-x", 1000, now - timedelta(days=363))))
    await consumer.process(_records(revoke("m-x", 300, now + timedelta(days=5), "o-other")))
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT debt FROM ledger_members") == 300
        got = await reports.summary(
            conn, datetime(1970, 1, 1, tzinfo=UTC), now + timedelta(days=10), None, now
        )
    movement = got["issued"] - got["revoked"] - got["redeemed"] - got["expired"] + got["adjusted"]
    assert (got["outstanding"], got["debt"]) == (700, 0)
    assert got["outstanding"] - got["debt"] == movement


async def test_a_stores_tiers_count_the_members_who_ever_had_an_entry_there(
    ledger: tuple[asyncpg.Pool, BatchConsumer],
) -> None:
    """With `store_id`, `tiers` counts the members with any entry at the store (earned or
    redeemed there), once each, whatever they hold now and wherever else they went. Read
    from the (store, member) pairs the journal keeps (migration 0027), not by scanning it."""
    pool, consumer = ledger
    now = datetime.now(UTC)
    day = now - timedelta(days=3)
    refunded = grant("m-refunded", 600, day, store="s-1")
    await consumer.process(
        _records(
            grant("m-gold", 1000, day, store="s-1"),
            grant("m-gold", 20, day + timedelta(hours=1), store="s-1"),
            grant("m-other", 1000, day, store="s-2"),
            grant("m-both", 1000, day, store="s-2"),
            grant("m-app", 1000, day, store=None),
            refunded,
        )
    )
    await consumer.process(
        _records(
            tier_report("m-gold", day, "member", "gold", "30000", ("diamond", "100000"), None),
            tier_report("m-both", day, "member", "diamond", "100000", None, None),
            revoke("m-refunded", 600, now - timedelta(days=1), refunded["data"]["order_id"]),
        )
    )
    async with pool.acquire() as conn:
        spent = await redemptions.redeem(
            conn, "loyalty.ledger.v1", "m-both", "r-1", points=500, reward=None, cash=None,
            store_id="s-1", now=now,
        )  # fmt: skip
        assert spent.status == 201
        period = (datetime(1970, 1, 1, tzinfo=UTC), now + timedelta(seconds=1))
        tiers = {
            store: (await reports.summary(conn, *period, store, now))["tiers"]
            for store in ("s-1", "s-2", "s-3", None)
        }
    assert tiers == {
        "s-1": {"member": 1, "silver": 0, "gold": 1, "diamond": 1},  # refunded, gold, both
        "s-2": {"member": 1, "silver": 0, "gold": 0, "diamond": 1},  # other, both
        "s-3": {"member": 0, "silver": 0, "gold": 0, "diamond": 0},
        None: {"member": 3, "silver": 0, "gold": 1, "diamond": 1},
    }


START = datetime.now(UTC) - timedelta(days=200)
WAIT_S = 60


class _PausingConn:
    """Passes everything through; before the summary reads the lots it lets the test run a
    rebuild's swap (a slow scan of a big journal leaves the same gap)."""

    def __init__(self, conn: Any, before_lots: Callable[[], Awaitable[None]]) -> None:
        self._conn, self._before_lots = conn, before_lots

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def fetch(self, sql: str, *args: Any) -> Any:
        if sql is reports.OUTSTANDING_BY_TIER:
            await self._before_lots()
        return await self._conn.fetch(sql, *args)


@pytest.mark.parametrize("report_starts", ["during_build", "after_build"])
async def test_a_summary_across_a_rebuilds_swap_reads_one_set_of_read_models(
    fresh_database: str, report_starts: str
) -> None:
    """Read across the swap, the summary's snapshot saw none of the rebuilt rows
    (outstanding 0) or none of the tiers the swap restored (every member at member's
    rate): the swap now waits for the summary's locks, taken before its snapshot."""
    async with migrated_pool(fresh_database) as pool:
        async with pool.acquire() as conn:
            await copy_journal(conn, generate_journal(members=60, per_member=15, start=START))
            await conn.execute(
                "INSERT INTO ledger_tier_history (event_id, member_id, occurred_at, tier,"
                " previous_tier, qualifying_spend, tier_valid_until, next_tier, next_tier_spend)"
                " SELECT 't-' || member_id, member_id, now() - interval '1 day', 'gold',"
                " 'member', 40000, now() + interval '300 days', 'diamond', 100000"
                " FROM (SELECT DISTINCT member_id FROM ledger_entries) AS m"
            )
        await rebuild(fresh_database)
        assert (await verify(fresh_database)).differences == []
        now = datetime.now(UTC)
        period = (START - timedelta(days=1), now)
        async with pool.acquire() as conn:
            good = await reports.summary(conn, *period, None, now)
        assert good["tiers"]["gold"] == 60
        assert good["outstanding"] > 0

        at_phase, go_on = threading.Event(), threading.Event()
        result: list[Any] = []
        wanted = "lots with points left" if report_starts == "during_build" else "indexes of"

        def phase(name: str) -> None:
            if name.startswith(wanted):
                at_phase.set()
                go_on.wait(WAIT_S)

        def run() -> None:
            try:
                result.append(asyncio.run(rebuild(fresh_database, phase)))
            except Exception as exc:  # the test reports it
                result.append(exc)

        rebuilding = threading.Thread(target=run, daemon=True)
        rebuilding.start()
        assert await asyncio.to_thread(at_phase.wait, WAIT_S)

        async def before_lots() -> None:
            go_on.set()  # the rebuild goes on while the summary is between its reads
            for _ in range(WAIT_S * 10):  # until its swap waits for the summary's locks
                waiting = await pool.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'relation'"
                )
                if waiting or not rebuilding.is_alive():
                    return
                await asyncio.sleep(0.1)

        async with pool.acquire() as conn:
            seen = await reports.summary(_PausingConn(conn, before_lots), *period, None, now)
        await asyncio.to_thread(rebuilding.join, WAIT_S)
        assert [type(r).__name__ for r in result] == ["RebuildReport"]
        keys = ("outstanding", "debt", "liability_cny", "tiers")
        assert {k: seen[k] for k in keys} == {k: good[k] for k in keys}
        async with pool.acquire() as conn:
            assert await reports.summary(conn, *period, None, now) == good


async def test_a_member_holding_more_points_than_a_bigint_of_fen_holds_is_valued(
    ledger: tuple[asyncpg.Pool, BatchConsumer],
) -> None:
    # 25,000 of the largest purchases a diamond member can make in their birthday month
    # (999,999,999,999.99 CNY, 3,999,999,999,999 points each): the ledger holds them in
    # bigint, and the liability multiplied them by 100 in bigint too, a 500 past 9.2e16.
    # At gold (80 points a CNY) their value is 125,000,000,000,000,002.5 fen: rounded down,
    # not the quotient rounded to 16 digits first (numeric division), a fen too many.
    pool, consumer = ledger
    now = datetime.now(UTC)
    points = 100_000_000_000_000_002
    await consumer.process(_records(grant("m-whale", points, now - timedelta(days=2))))
    gold = tier_report("m-whale", now - timedelta(days=1), "member", "gold", "30000",
                       ("diamond", "100000"), None)  # fmt: skip
    await consumer.process(_records(gold))
    async with pool.acquire() as conn:
        got = await reports.summary(
            conn, datetime(1970, 1, 1, tzinfo=UTC), now + timedelta(seconds=1), None, now
        )
    assert got["outstanding"] == points
    assert Decimal(got["liability_cny"]) == DEFAULT_POLICY.cash_value("gold", points)
    assert got["liability_cny"] == "1250000000000000.02"
