"""The expiry sweeper pages through lapsed lots and due warnings with cursors: with pages
far smaller than the work, every lapsed lot is expired once and every lot inside a window
is warned once, ties across a page boundary included; afterwards no lot is due until its
next warning or its expiry (`ledger_lots.sweep_at`), so an idle sweep reads nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import pytest

from services.common.migrations import apply_migrations
from services.common.runtime import init_connection
from services.ledger.rebuild import rebuild, verify
from services.ledger.redemptions import adjust
from services.ledger.sweeper import ExpirySweeper, warning_id

pytestmark = pytest.mark.integration
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
MEMBERS = [f"m{i:02d}" for i in range(10)]
TOPIC = "loyalty.ledger.v1"


@pytest.fixture
async def pool(fresh_database: str) -> AsyncIterator[asyncpg.Pool]:
    apply_migrations(fresh_database)
    p = await asyncpg.create_pool(fresh_database, min_size=1, max_size=2, init=init_connection)
    assert p is not None
    try:
        yield p
    finally:
        await p.close()


async def add_lot(conn: asyncpg.Connection, lot_id: str, member: str, expires: datetime) -> None:
    """Every other lot names its first warning's moment, as the ledger writes lots; the
    rest keep the column's default (due at once), as after migration 0014."""
    earned = expires - timedelta(days=365)
    first_warning = expires - timedelta(days=30) if sum(lot_id.encode()) % 2 else None
    await conn.execute(
        "INSERT INTO ledger_members (member_id, earned) VALUES ($1, 100)"
        " ON CONFLICT (member_id) DO UPDATE SET earned = ledger_members.earned + 100",
        member,
    )
    await conn.execute(
        "INSERT INTO ledger_lots (lot_id, member_id, points, remaining, earned_at,"
        " available_from, expires_at, source_event_id, rule_id, sweep_at)"
        " VALUES ($1, $2, 100, 100, $3, $3, $4, $5, 'base',"
        " COALESCE($6::timestamptz, '-infinity'))",
        lot_id,
        member,
        earned,
        expires,
        f"ev-{lot_id}",
        first_warning,
    )


async def published(pool: asyncpg.Pool, kind: str) -> list[dict[str, object]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT payload FROM outbox WHERE service = 'ledger' ORDER BY id")
    events = [orjson.loads(r["payload"]) for r in rows]
    return [e for e in events if e["type"] == kind]


async def test_small_pages_expire_and_warn_every_lot_once(pool: asyncpg.Pool) -> None:
    lapsed: set[str] = set()
    month: set[str] = set()  # inside the 30-day window only
    week: set[str] = set()  # inside both windows: warned once, at 7 days
    async with pool.acquire() as conn:
        for i, member in enumerate(MEMBERS):
            for k in range(i % 3 + 1):
                lot = f"lapsed-{member}-{k}"
                await add_lot(conn, lot, member, NOW - timedelta(hours=k + 1))
                lapsed.add(lot)
            # The same expiry time for every member: ties across the warning pages.
            await add_lot(conn, f"month-{member}", member, NOW + timedelta(days=20))
            month.add(f"month-{member}")
            await add_lot(conn, f"week-{member}", member, NOW + timedelta(days=3, hours=i))
            week.add(f"week-{member}")
            await add_lot(conn, f"later-{member}", member, NOW + timedelta(days=60))
    wakes: list[None] = []
    sweeper = ExpirySweeper(
        pool, TOPIC, 60, lambda: wakes.append(None), lapsed_per_batch=3, warnings_per_batch=4
    )

    assert await sweeper.sweep_once(NOW) == (len(lapsed), len(month) + len(week))

    async with pool.acquire() as conn:
        remaining = {
            r["lot_id"]: r["remaining"]
            for r in await conn.fetch("SELECT lot_id, remaining FROM ledger_lots")
        }
        expire_rows = await conn.fetch(
            "SELECT member_id, points, allocations FROM ledger_entries WHERE kind = 'expire'"
        )
        claimed = {
            (r["lot_id"], r["threshold_days"])
            for r in await conn.fetch("SELECT lot_id, threshold_days FROM ledger_expiry_warnings")
        }
        expired_totals = dict(
            await conn.fetch("SELECT member_id, expired FROM ledger_members ORDER BY member_id")
        )
    assert {lot for lot, left in remaining.items() if left == 0} == lapsed
    assert all(left == 100 for lot, left in remaining.items() if lot not in lapsed)
    allocated = [lot for r in expire_rows for lot, _ in r["allocations"]]
    assert sorted(allocated) == sorted(lapsed)
    assert all(r["points"] == -100 for r in expire_rows)
    assert expired_totals == {m: 100 * (i % 3 + 1) for i, m in enumerate(MEMBERS)}
    assert claimed == {(lot, 30) for lot in month | week} | {(lot, 7) for lot in week}

    warnings = await published(pool, "points_expiring")
    assert sorted(str(e["event_id"]) for e in warnings) == sorted(
        [warning_id(lot, 30) for lot in month] + [warning_id(lot, 7) for lot in week]
    )
    for event in warnings:
        data = event["data"]
        assert isinstance(data, dict)
        lot = str(data["source_event_id"]).removeprefix("ev-")
        assert event["event_id"] in (warning_id(lot, 30), warning_id(lot, 7))
        assert (data["rule_id"], data["points"], event["member_id"]) == ("base", 100, lot[-3:])
    assert len(await published(pool, "points_expired")) == len(lapsed)
    assert len(wakes) >= 2  # woken page by page, not only at the end

    # Each lot waits for its next warning, else its expiry: nothing is due now.
    async with pool.acquire() as conn:
        moments = {
            r["lot_id"]: r["sweep_at"]
            for r in await conn.fetch(
                "SELECT lot_id, sweep_at FROM ledger_lots WHERE remaining > 0"
            )
        }
    expires = {
        **{lot: NOW + timedelta(days=20) for lot in month},
        **{f"week-{m}": NOW + timedelta(days=3, hours=i) for i, m in enumerate(MEMBERS)},
        **{f"later-{m}": NOW + timedelta(days=60) for m in MEMBERS},
    }
    assert moments == {
        lot: at - timedelta(days=7 if lot in month else 0 if lot in week else 30)
        for lot, at in expires.items()
    }

    # Nothing is done twice, even when every lot is due again (as after a rebuild);
    # a lot added later is picked up by the next sweep.
    assert await sweeper.sweep_once(NOW) == (0, 0)
    async with pool.acquire() as conn:
        await conn.execute("UPDATE ledger_lots SET sweep_at = '-infinity'")
    assert await sweeper.sweep_once(NOW) == (0, 0)
    async with pool.acquire() as conn:
        await add_lot(conn, "late-lapsed", MEMBERS[4], NOW - timedelta(minutes=5))
        await add_lot(conn, "late-month", MEMBERS[4], NOW + timedelta(days=20))
    assert await sweeper.sweep_once(NOW) == (1, 1)
    assert len(await published(pool, "points_expiring")) == len(month) + len(week) + 1


async def test_warning_days_are_24_hours_whatever_the_servers_time_zone(
    fresh_database: str,
) -> None:
    """A lot expiring just after summer time ends in New York, swept on a session in that
    zone: its 30-day warning is claimed and its next moment is 7 × 24 hours before expiry,
    as the ledger counts a new lot's first moment, not 7 calendar days of the session's
    zone (an hour later across the change)."""
    apply_migrations(fresh_database)
    ny = await asyncpg.create_pool(
        fresh_database, min_size=1, max_size=2, init=init_connection,
        server_settings={"timezone": "America/New_York"},
    )  # fmt: skip
    assert ny is not None
    now = datetime(2026, 10, 20, 12, 0, tzinfo=UTC)
    expires = datetime(2026, 11, 5, 12, 0, tzinfo=UTC)  # DST ended on 1 November
    try:
        async with ny.acquire() as conn:
            await add_lot(conn, "lot-dst", "m-ny", expires)
        sweeper = ExpirySweeper(ny, TOPIC, 60, lambda: None)
        assert await sweeper.sweep_once(now) == (0, 1)
        async with ny.acquire() as conn:
            moment = await conn.fetchval(
                "SELECT sweep_at FROM ledger_lots WHERE lot_id = 'lot-dst'"
            )
            warned = await conn.fetchval(
                "SELECT threshold_days FROM ledger_expiry_warnings WHERE lot_id = 'lot-dst'"
            )
        assert warned == 30
        assert moment == expires - timedelta(days=7)
    finally:
        await ny.close()


async def test_an_adjustments_lot_is_warned_and_expired_naming_the_adjustment(
    pool: asyncpg.Pool, fresh_database: str
) -> None:
    """Its warning and expiry carried the adjustment's id as `source_event_id`, with a null
    `adjustment_id`. A rebuild makes the lot as the ledger did: verify finds no difference."""
    async with pool.acquire() as conn:
        await adjust(
            conn, TOPIC, "adj-1", member_id="m-1", points=300, reason="goodwill",
            operator="ops", allow_debt=False, now=NOW - timedelta(days=340), new_member=True,
        )  # fmt: skip
    assert (await verify(fresh_database)).differences == []
    await rebuild(fresh_database)
    assert (await verify(fresh_database)).differences == []
    sweeper = ExpirySweeper(pool, TOPIC, 60, lambda: None)
    assert await sweeper.sweep_once(NOW) == (0, 1)
    assert await sweeper.sweep_once(NOW + timedelta(days=40)) == (1, 0)
    events = [*await published(pool, "points_expiring"), *await published(pool, "points_expired")]
    assert len(events) == 2
    for event in events:
        data = event["data"]
        assert isinstance(data, dict)
        assert (data["adjustment_id"], data["source_event_id"], data["rule_id"]) == (
            "adj-1", None, None,
        )  # fmt: skip
