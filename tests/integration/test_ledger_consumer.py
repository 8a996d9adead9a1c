"""The ledger on a real Postgres without a broker: its consumer handler, and what runs beside
it (redemptions, the expiry sweeper, rebuild, verify, ?as_of=), driven directly, for the
ordering and concurrency cases that need exact control."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from aiokafka.structs import ConsumerRecord

from services.common.config import Settings
from services.common.consumer import BatchConsumer
from services.ledger import projector, redemptions
from services.ledger import sweeper as sweeper_mod
from services.ledger.rebuild import rebuild, verify
from services.ledger.rulebook import LedgerRules
from services.ledger.sweeper import ExpirySweeper
from tests.integration import direct
from tests.integration.direct import consumer_of, migrated_pool
from tests.integration.harness import wait_until
from tests.integration.ledger_helpers import grant, revoke, tier_report

pytestmark = pytest.mark.integration
TOPIC = "loyalty.grants.v1"

Env = tuple[str, asyncpg.Pool, BatchConsumer]


@pytest.fixture
async def env(fresh_database: str) -> AsyncIterator[Env]:
    settings = Settings(database_url=fresh_database, bootstrap_servers="")
    async with migrated_pool(fresh_database) as pool:
        handler = projector.make_handler(settings, "ledger", LedgerRules())
        yield fresh_database, pool, consumer_of(pool, "ledger", TOPIC, handler)


def records(*events: dict[str, Any]) -> list[ConsumerRecord]:
    return direct.records(TOPIC, *events)


async def _tier(pool: asyncpg.Pool, member: str) -> str:
    async with pool.acquire() as conn:
        return str(
            await conn.fetchval("SELECT tier FROM ledger_members WHERE member_id = $1", member)
        )


@pytest.mark.parametrize("same_batch", [False, True], ids=["two-batches", "one-batch"])
async def test_the_tier_report_that_arrived_last_is_the_tier_now(
    env: Env, same_batch: bool
) -> None:
    """The rules service reports the tier from the member's whole state after each event,
    in the order it applies them: a late refund, dated before the purchase that made the
    member gold, arrives after that purchase's report and says silver, which is the tier
    now. The live row, verify, rebuild and ?as_of= all read the reports in arrival order."""
    dsn, pool, consumer = env
    now = datetime.now(UTC)
    until = now + timedelta(days=365)
    gold = tier_report("m-t", now - timedelta(hours=1), "silver", "gold", "31000.00", None, until)
    refunded = tier_report(
        "m-t", now - timedelta(hours=2), "gold", "silver", "12000.00", None, until
    )
    if same_batch:
        await consumer.process(records(gold, refunded))
    else:
        await consumer.process(records(gold))
        await consumer.process(records(refunded))  # arrives later, dated earlier
    assert await _tier(pool, "m-t") == "silver"
    assert (await verify(dsn)).differences == []
    async with pool.acquire() as conn:
        now_doc = await projector.member_as_of(conn, "m-t", now)
        between = await projector.member_as_of(conn, "m-t", now - timedelta(minutes=90))
    assert now_doc is not None
    assert now_doc["tier"] == "silver"
    assert between is not None
    assert between["tier"] == "silver"  # the only report dated by then
    await rebuild(dsn)
    assert await _tier(pool, "m-t") == "silver"
    assert (await verify(dsn)).differences == []


async def test_a_re_sent_batch_of_grants_and_tier_reports_is_applied_once(env: Env) -> None:
    """A relay that crashed between publishing and deleting its rows sends them again, at
    new offsets: the journal, the lots, the tier history and the outbox take each once."""
    dsn, pool, consumer = env
    now = datetime.now(UTC)
    sent = [
        grant("m-r", 300, now - timedelta(minutes=5), event_id="g-r-1"),
        tier_report(
            "m-r",
            now - timedelta(minutes=5),
            "member",
            "silver",
            "6000.00",
            None,
            now + timedelta(days=365),
        ),
    ]
    await consumer.process(records(*[dict(e) for e in sent]))
    await consumer.process(records(*[dict(e) for e in sent]))  # the same events, again
    async with pool.acquire() as conn:
        counts = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM ledger_entries) AS entries,"
            " (SELECT count(*) FROM ledger_lots) AS lots,"
            " (SELECT count(*) FROM ledger_tier_history) AS tiers,"
            " (SELECT count(*) FROM outbox WHERE service = 'ledger') AS out,"
            " (SELECT earned FROM ledger_members WHERE member_id = 'm-r') AS earned"
        )
        lot = await conn.fetchrow("SELECT remaining, expires_at, sweep_at FROM ledger_lots")
    assert dict(counts) == {"entries": 1, "lots": 1, "tiers": 1, "out": 2, "earned": 300}
    assert lot["remaining"] == 300
    assert lot["sweep_at"] == lot["expires_at"] - timedelta(days=30)  # its first warning
    assert await _tier(pool, "m-r") == "silver"
    assert (await verify(dsn)).differences == []


async def test_a_utc_stamped_grant_lives_12_months_of_the_shanghai_calendar(env: Env) -> None:
    """01:00 on 1 March 2027 in Shanghai, stamped in UTC (17:00 on 28 February): its lot
    lapses at 01:00 on 1 March 2028, not on 29 February (the UTC calendar's count)."""
    _dsn, pool, consumer = env
    stamped = datetime(2027, 2, 28, 17, 0, tzinfo=UTC)
    await consumer.process(records(grant("m-z", 100, stamped, event_id="g-z")))
    async with pool.acquire() as conn:
        expires = await conn.fetchval("SELECT expires_at FROM ledger_lots WHERE lot_id = 'g-z'")
    assert expires == datetime(2028, 3, 1, 1, 0, tzinfo=ZoneInfo("Asia/Shanghai"))


async def test_as_of_between_a_late_purchase_and_the_refund_it_paid(env: Env) -> None:
    """Earn 1000 (o1), redeem 1000, refund o1 (debt 1000), then a late (offline POS)
    purchase dated *before* the refund pays 300 of that debt. The entries dated up to a
    moment between the two, in seq order, pay debt not owed yet: ?as_of= used to fail on
    them (JournalError, a 500); it now shows the moment as it was."""
    dsn, pool, consumer = env
    now = datetime.now(UTC)
    earn = grant("m-a", 1000, now - timedelta(days=30))
    order = earn["data"]["order_id"]
    await consumer.process(records(earn))
    async with pool.acquire() as conn:
        out = await redemptions.redeem(
            conn, "loyalty.ledger.v1", "m-a", "red-1", points=1000, reward=None, cash=None,
            store_id=None, now=now - timedelta(days=20),
        )  # fmt: skip
        assert out.status == 201
    await consumer.process(records(revoke("m-a", 1000, now - timedelta(days=10), order)))
    await consumer.process(records(grant("m-a", 300, now - timedelta(days=15))))
    assert not (await verify(dsn)).differences  # the journal itself is fine
    async with pool.acquire() as conn:
        then = await projector.member_as_of(conn, "m-a", now - timedelta(days=12))
        later = await projector.member_as_of(conn, "m-a", now)
    assert then is not None
    assert then["points"]["debt"] == 0
    assert then["points"]["available"] == 300
    assert later is not None
    assert later["points"]["debt"] == 700
    assert later["points"]["available"] == 0


async def test_a_rebuild_swap_that_deadlocks_with_an_expiry_page_is_retried(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweeper reads ledger_lots (its page) and then locks member rows; the rebuild's
    swap locks ledger_members, then ledger_lots. Opposite orders: a deadlock, whose victim
    (the swap, waiting first) used to abort the whole rebuild after its build ran. The
    swap alone is retried now, and both finish."""
    dsn, pool, consumer = env
    now = datetime.now(UTC)
    await consumer.process(records(grant("m-s", 100, now - timedelta(days=20))))
    async with pool.acquire() as conn:  # make the lot lapsed, as time would
        await conn.execute(
            "UPDATE ledger_lots SET expires_at = $1::timestamptz,"
            " sweep_at = $1::timestamptz - interval '30 days'",
            now - timedelta(minutes=1),
        )
    go = asyncio.Event()
    real_load = sweeper_mod.load_books

    async def paused_load(conn: asyncpg.Connection, members: list[str]) -> Any:
        await go.wait()  # the page is read (AccessShare on ledger_lots held)
        return await real_load(conn, members)

    monkeypatch.setattr(sweeper_mod, "load_books", paused_load)
    sweep = asyncio.create_task(ExpirySweeper(pool, "t", 60, lambda: None).sweep_once(now))
    build = asyncio.create_task(rebuild(dsn))
    swap_waits = (
        "SELECT count(*) FROM pg_locks WHERE NOT granted"
        " AND relation = 'ledger_lots'::regclass AND mode = 'AccessExclusiveLock'"
    )
    await wait_until(lambda: pool.fetchval(swap_waits), timeout=10,
                     what="the swap to wait on ledger_lots")  # fmt: skip
    go.set()
    _, report = await asyncio.gather(sweep, build)
    assert report.swap_retries >= 1
    async with pool.acquire() as conn:
        assert (
            await conn.fetchval("SELECT expired FROM ledger_members WHERE member_id = 'm-s'") == 100
        )
    assert (await verify(dsn)).differences == []


async def test_a_spend_of_two_orders_at_the_largest_amount_is_stored(env: Env) -> None:
    """An order may be just below a trillion CNY (the activity contract's bound), so a
    tier window can hold more: numeric(14,2) could not, and the report was dead-lettered
    while the ledger kept the old tier (migration 0019)."""
    dsn, pool, consumer = env
    now = datetime.now(UTC)
    report = tier_report("m-big", now, "member", "diamond", "1999999999999.98", None,
                         now + timedelta(days=365))  # fmt: skip
    await consumer.process(records(report))
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT tier, qualifying_spend FROM ledger_members WHERE member_id = 'm-big'"
        )
        dead = await conn.fetchval("SELECT count(*) FROM dead_letters")
    assert dead == 0
    assert (row["tier"], str(row["qualifying_spend"])) == ("diamond", "1999999999999.98")
    assert (await verify(dsn)).differences == []
