"""`ledger rebuild` beside another rebuild or a `ledger verify`, and what both restore and check
of the members known only from the tier history, against a real Postgres.

The overlaps are made with the rebuild's and verify's own progress callbacks as hooks (one
run stops at a known step while the other goes on), so no test depends on timing.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from services.common.config import Settings
from services.common.consumer import BatchConsumer
from services.ledger import projector
from services.ledger.accounting import add_months
from services.ledger.rebuild import REBUILD_LOCK_KEY, RebuildRunning, rebuild, verify
from services.ledger.rulebook import LedgerRules
from services.ledger.sweeper import ExpirySweeper
from tests.integration import direct
from tests.integration.direct import consumer_of, migrated_pool
from tests.integration.ledger_helpers import copy_journal, generate_journal, grant, tier_report
from tests.integration.test_ledger_rebuild import ledgerctl

pytestmark = pytest.mark.integration
START = datetime.now(UTC) - timedelta(days=700)
TOPIC = "loyalty.grants.v1"
COUNTS = """
SELECT (SELECT count(*) FROM ledger_members) AS members,
       (SELECT count(*) FROM ledger_lots WHERE remaining > 0) AS lots,
       (SELECT sum(earned) FROM ledger_members) AS earned
"""
WAIT_S = 60  # a hook waits this long at most for the other side (a hang fails, not blocks)


@pytest.fixture
async def journal(fresh_database: str) -> AsyncIterator[tuple[str, asyncpg.Pool]]:
    """200 members' journal, rebuilt and verified once."""
    async with migrated_pool(fresh_database) as pool:
        async with pool.acquire() as conn:
            await copy_journal(conn, generate_journal(members=200, per_member=20, start=START))
        await rebuild(fresh_database)
        assert (await verify(fresh_database)).differences == []
        yield fresh_database, pool


def in_thread(work: Callable[[], Any], result: list[Any], done: threading.Event) -> None:
    """Run an async job on its own loop and thread: the first one's hook blocks its loop."""

    def run() -> None:
        try:
            result.append(asyncio.run(work()))
        except Exception as exc:  # the test inspects it
            result.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()


def either(a: threading.Event, b: threading.Event) -> bool:
    """Whichever is set first, within WAIT_S (`a.wait(WAIT_S) or b.wait(WAIT_S)` waited out
    all of WAIT_S for an `a` that never comes)."""
    deadline = time.monotonic() + WAIT_S
    while not (a.is_set() or b.is_set()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


async def test_a_second_rebuild_is_refused_and_cannot_empty_the_first_ones_swap(
    journal: tuple[str, asyncpg.Pool],
) -> None:
    """B starts once A's build is loaded, and gets as far as it can before A swaps: without
    the lock, B's DROP + CREATE of the build tables left A to swap in empty ones."""
    dsn, pool = journal
    good = dict(await pool.fetchrow(COUNTS))
    b_result: list[Any] = []
    b_done, b_built, a_done = threading.Event(), threading.Event(), threading.Event()

    def phase_b(name: str) -> None:
        if name.startswith("member totals"):  # B's own build tables exist, still empty
            b_built.set()
            a_done.wait(WAIT_S)

    def phase_a(name: str) -> None:
        if name.startswith("indexes"):  # A's build is committed, not yet swapped
            in_thread(lambda: rebuild(dsn, phase_b), b_result, b_done)
            assert either(b_built, b_done)  # refused at once, as B is now: no wait

    try:
        a = await rebuild(dsn, phase_a)
    finally:
        a_done.set()
    assert await asyncio.to_thread(b_done.wait, WAIT_S)
    assert a.members == good["members"]
    await pool.expire_connections()  # the swap replaced the tables the pool's plans named
    assert dict(await pool.fetchrow(COUNTS)) == good
    assert isinstance(b_result[0], RebuildRunning), b_result
    assert (await verify(dsn)).differences == []


async def test_ledgerctl_rebuild_exits_2_while_another_runs_then_cleans_leftovers(
    journal: tuple[str, asyncpg.Pool],
) -> None:
    dsn, pool = journal
    # What a killed rebuild leaves behind: its build tables (with an index).
    await pool.execute("CREATE TABLE ledger_members_rebuild (member_id text PRIMARY KEY)")
    await pool.execute("CREATE TABLE ledger_lots_rebuild (lot_id text)")
    async with pool.acquire() as holder:  # "another rebuild": its session holds the lock
        assert await holder.fetchval("SELECT pg_try_advisory_lock($1)", REBUILD_LOCK_KEY)
        refused = await asyncio.to_thread(ledgerctl, dsn, "rebuild")
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert refused.stderr.startswith("error: another `ledger rebuild` is running")
        assert f"pid {holder.get_server_pid()}" in refused.stderr
        # The refused run touched nothing, the other run's tables included.
        assert await pool.fetchval("SELECT to_regclass('ledger_members_rebuild') IS NOT NULL")
        await holder.execute("SELECT pg_advisory_unlock($1)", REBUILD_LOCK_KEY)
    done = await asyncio.to_thread(ledgerctl, dsn, "rebuild")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rebuilt 200 members" in done.stdout
    left = await pool.fetchval("SELECT count(*) FROM pg_tables WHERE tablename LIKE '%_rebuild'")
    assert left == 0
    assert (await verify(dsn)).differences == []


async def test_verify_during_a_rebuild_sees_no_differences_and_the_swap_waits_for_it(
    journal: tuple[str, asyncpg.Pool],
) -> None:
    """The rebuild swaps while verify has its snapshot but has not read the read models
    yet: a swap there left verify reading the new tables, whose rows its snapshot cannot
    see, and it reported every member missing."""
    dsn, _ = journal
    phases: list[str] = []
    r_result: list[Any] = []
    r_done, r_waits = threading.Event(), threading.Event()

    def phase_r(name: str) -> None:
        phases.append(name)
        if name.startswith("waiting for"):
            r_waits.set()

    def progress(_: int) -> None:  # verify has folded the journal's first rows
        if not phases:
            in_thread(lambda: rebuild(dsn, phase_r), r_result, r_done)
            assert either(r_waits, r_done)

    report = await verify(dsn, progress)
    assert await asyncio.to_thread(r_done.wait, WAIT_S)
    assert report.differences == []
    assert report.members == 200
    assert not isinstance(r_result[0], BaseException), r_result
    assert r_result[0].swap_retries == 0  # it waited for verify, not against its lock
    assert any(p.startswith("waiting for a running `ledger verify`") for p in phases), phases
    assert (await verify(dsn)).differences == []


# ------------------------------------------------------------- tier-only members, sweep_at


@pytest.fixture
async def ledger(fresh_database: str) -> AsyncIterator[tuple[str, asyncpg.Pool, BatchConsumer]]:
    settings = Settings(database_url=fresh_database, bootstrap_servers="")
    async with migrated_pool(fresh_database) as pool:
        handler = projector.make_handler(settings, "ledger", LedgerRules())
        yield fresh_database, pool, consumer_of(pool, "ledger", TOPIC, handler)


TIER_ROW = """
SELECT tier, qualifying_spend, tier_valid_until, next_tier, next_tier_spend
FROM ledger_members WHERE member_id = $1
"""


async def test_a_member_known_only_from_the_tier_history_is_checked_and_restored(
    ledger: tuple[str, asyncpg.Pool, BatchConsumer],
) -> None:
    dsn, pool, consumer = ledger
    now = datetime.now(UTC)
    await consumer.process(direct.records(
        TOPIC,
        grant("m-tier", 1000, now - timedelta(days=3)),
        tier_report("m-tier", now - timedelta(days=3), "member", "silver", "6000.00",
                    ("gold", "20000.00"), now + timedelta(days=360)),
        tier_report("m-tieronly", now - timedelta(days=2), "member", "silver", "5100.00",
                    ("gold", "20000.00"), now + timedelta(days=300)),
    ))  # fmt: skip
    assert (await verify(dsn)).differences == []
    live = dict(await pool.fetchrow(TIER_ROW, "m-tieronly"))
    assert (live["tier"], live["next_tier"]) == ("silver", "gold")

    await pool.execute("DELETE FROM ledger_members WHERE member_id = 'm-tieronly'")
    assert (await verify(dsn)).differences == [
        "m-tieronly: in the tier history but not in ledger_members"
    ]
    await rebuild(dsn)
    await pool.expire_connections()
    assert dict(await pool.fetchrow(TIER_ROW, "m-tieronly")) == live
    assert (await verify(dsn)).differences == []

    await pool.execute(
        "UPDATE ledger_members SET next_tier = 'diamond', next_tier_spend = 1"
        " WHERE member_id = 'm-tier'"
    )
    diffs = (await verify(dsn)).differences
    assert len(diffs) == 1, diffs
    assert diffs[0].startswith("m-tier: tier history says silver")
    assert "next gold at 20000.00" in diffs[0]
    assert "next diamond at 1.00" in diffs[0]
    await rebuild(dsn)
    assert (await verify(dsn)).differences == []


async def test_verify_finds_a_lot_whose_sweep_at_skips_a_warning_not_sent(
    ledger: tuple[str, asyncpg.Pool, BatchConsumer],
) -> None:
    """sweep_at earlier than due is harmless (the sweeper looks, sends nothing twice, moves
    it on: after a rebuild, say); later than the next warning not sent, that warning goes
    out late or never."""
    dsn, pool, consumer = ledger
    now = datetime.now(UTC)
    inside_30_days = grant("m-warn", 900, add_months(now, -12) + timedelta(days=20))
    fresh = grant("m-warn", 400, now - timedelta(days=1))
    await consumer.process(direct.records(TOPIC, inside_30_days, fresh))
    sweeper = ExpirySweeper(pool, "loyalty.ledger.v1", 60, lambda: None)
    assert (await verify(dsn)).differences == []  # not swept yet: the 30-day warning is due
    assert (await sweeper.sweep_once(now))[1] == 1  # sent; its next moment is 7 days ahead
    assert (await verify(dsn)).differences == []
    await rebuild(dsn)  # back to 30 days ahead: early, not late
    assert (await verify(dsn)).differences == []

    lots = [inside_30_days["event_id"], fresh["event_id"]]
    await pool.execute(
        "UPDATE ledger_lots SET sweep_at = expires_at WHERE lot_id = ANY($1::text[])", lots
    )
    diffs = (await verify(dsn)).differences
    assert len(diffs) == 2, diffs
    assert all(" sweep_at " in d and "next warning not sent" in d for d in diffs), diffs
    await rebuild(dsn)
    assert (await verify(dsn)).differences == []
