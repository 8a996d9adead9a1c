"""Migrations that change existing tables keep what those tables hold (an upgrade, not
only a fresh install): 0012 (the outbox's key), 0013 (json documents), 0014 (lots' sweep
moment), 0015 (members' tier end), 0016 (what member states may have forgotten), 0023 (when
the tier sweep must next look at each member), 0024 (an adjustment's lot's id), 0026 (the
index of a member's lots, built outside a transaction), 0027 (the stores' members)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest
from yoyo import get_backend, read_migrations

from services.common.migrations import MIGRATIONS_DIR, _yoyo_url, apply_migrations
from services.ledger.journal import SELECT_LOTS
from services.ledger.reads import MEMBER_WITH_LOTS
from services.ledger.rebuild import MEMBER_LOTS
from services.ledger.sweeper import AVAILABLE_NOW
from services.rules.pruning import add_months
from services.rules.state import load_state

pytestmark = pytest.mark.integration

STATE = {"member_id": "m-1", "tier": "silver", "orders": {"o-1": {"amount": "12.50"}}}
PAYLOAD = {"event_id": "e-1", "type": "points_earned", "data": {"points": 7, "reason": "补偿"}}


@asynccontextmanager
async def migrated_until(dsn: str, first_not_applied: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the database with the migrations before `first_not_applied` applied."""
    backend = get_backend(_yoyo_url(dsn))
    migrations = read_migrations(str(MIGRATIONS_DIR))
    with backend.lock():
        backend.apply_migrations(
            backend.to_apply(migrations.filter(lambda m: m.id < first_not_applied))
        )
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def test_an_existing_database_keeps_its_rows_through_0012_and_0013(
    fresh_database: str,
) -> None:
    async with migrated_until(fresh_database, "0012") as conn:
        await conn.execute(
            "INSERT INTO outbox (service, topic, key, payload) VALUES"
            " ('rules', 'g', 'm-1', 'a'), ('ledger', 'l', 'm-1', 'b'), ('rules', 'g', 'm-2', 'c')"
        )
        await conn.execute(
            "INSERT INTO rules_member_state (member_id, state) VALUES ('m-1', $1::jsonb)",
            json.dumps(STATE),
        )
        await conn.execute(
            "INSERT INTO notifications (notification_id, member_id, kind, message, payload)"
            " VALUES ('e-1', 'm-1', 'points_earned', '您获得7积分', $1::jsonb)",
            json.dumps(PAYLOAD),
        )
        assert apply_migrations(fresh_database) >= 2

        key = await conn.fetchval(
            "SELECT pg_get_indexdef(indexrelid) FROM pg_index"
            " WHERE indrelid = 'outbox'::regclass AND indisprimary"
        )
        assert key.endswith("(service, id)")
        assert (
            await conn.fetchval("SELECT count(*) FROM pg_index WHERE indrelid = 'outbox'::regclass")
            == 1
        )
        rows = await conn.fetch(
            "SELECT service, key, payload FROM outbox WHERE service = 'rules' ORDER BY id"
        )
        assert [(r["service"], r["key"], r["payload"]) for r in rows] == [
            ("rules", "m-1", b"a"),
            ("rules", "m-2", b"c"),
        ]

        types = dict(
            await conn.fetch(
                "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns"
                " WHERE (table_name, column_name) IN"
                " (('rules_member_state', 'state'), ('notifications', 'payload'))"
            )
        )
        assert types == {"rules_member_state.state": "json", "notifications.payload": "json"}
        state = json.loads(await conn.fetchval("SELECT state::text FROM rules_member_state"))
        # 0016 adds what the state may have forgotten (its own test below); the rest is kept.
        assert {k: v for k, v in state.items() if not k.endswith("_since")} == STATE
        payload = await conn.fetchval("SELECT payload::text FROM notifications")
        assert json.loads(payload) == PAYLOAD


async def test_0014_makes_every_existing_lot_due_for_one_sweep(fresh_database: str) -> None:
    async with migrated_until(fresh_database, "0014") as conn:
        await conn.execute(
            "INSERT INTO ledger_lots (lot_id, member_id, points, remaining, earned_at,"
            " available_from, expires_at, source_event_id)"
            " VALUES ('l-1', 'm-1', 100, 60, now(), now(), now() + interval '1 year', 'e-1')"
        )
        assert apply_migrations(fresh_database) >= 1

        lot = await conn.fetchrow("SELECT remaining, sweep_at::text FROM ledger_lots")
        assert (lot["remaining"], lot["sweep_at"]) == (60, "-infinity")
        indexes = {
            r["indexname"]
            for r in await conn.fetch(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'ledger_lots'"
            )
        }
        assert "ledger_lots_sweep" in indexes
        assert "ledger_lots_expiry" not in indexes
        # A lot is never due after its expiry: the expiry scan relies on it.
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE ledger_lots SET sweep_at = expires_at + interval '1 second'")


async def test_0015_copies_each_members_tier_end_out_of_the_state(fresh_database: str) -> None:
    async with migrated_until(fresh_database, "0015") as conn:
        await conn.execute(
            "INSERT INTO rules_member_state (member_id, state) VALUES"
            " ('m-gold', $1::json), ('m-plain', $2::json)",
            json.dumps({"member_id": "m-gold", "tier": "gold",
                        "tier_valid_until": "2026-03-02T10:00:00+08:00"}),
            json.dumps({"member_id": "m-plain"}),
        )  # fmt: skip
        assert apply_migrations(fresh_database) >= 1

        rows = dict(
            await conn.fetch(
                "SELECT member_id, tier_valid_until::text FROM rules_member_state"
                " ORDER BY member_id"
            )
        )
        await conn.execute("SET TIME ZONE 'UTC'")
        assert (
            await conn.fetchval(
                "SELECT tier_valid_until::text FROM rules_member_state WHERE member_id = 'm-gold'"
            )
            == "2026-03-02 02:00:00+00"
        )
        assert rows["m-plain"] is None
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM pg_indexes WHERE indexname = 'rules_member_state_tier_due'"
            )
            == 1
        )


async def test_0016_says_what_existing_states_may_have_forgotten(fresh_database: str) -> None:
    async with migrated_until(fresh_database, "0016") as conn:
        await conn.execute(
            "INSERT INTO rules_member_state (member_id, state) VALUES ('m-old', $1::json),"
            " ('m-new', $2::json)",
            json.dumps({"member_id": "m-old", "tier": "silver",
                        "engagement_by_day": {"2026-11-20": 50}}),
            json.dumps({"member_id": "m-new", "spend_since": "2025-01-01T00:00:00Z"}),
        )  # fmt: skip
        assert apply_migrations(fresh_database) >= 1
        states = {
            r["member_id"]: load_state(r["state"])
            for r in await conn.fetch(
                "SELECT member_id, state::text AS state FROM rules_member_state"
            )
        }
        today = await conn.fetchval("SELECT current_date")
        now = await conn.fetchval("SELECT now()")
        old = states["m-old"]
        assert (old.tier, old.engagement_by_day) == ("silver", {date(2026, 11, 20): 50})
        assert old.counters_since == today - timedelta(days=1)
        assert old.spend_since is not None
        assert abs(old.spend_since - add_months(now, -12)) < timedelta(minutes=5)
        # A state that already says it is left as it is.
        assert states["m-new"].spend_since == datetime(2025, 1, 1, tzinfo=UTC)
        assert states["m-new"].counters_since is None


async def test_0017_gives_each_lot_with_points_left_its_grants_version(
    fresh_database: str,
) -> None:
    async with migrated_until(fresh_database, "0017") as conn:
        entries = [("g-live", "earn", "2026.2"), ("g-spent", "earn", "2026.1"),
                   ("a-live", "adjust", None)]  # fmt: skip
        for entry_id, kind, version in entries:
            await conn.execute(
                "INSERT INTO ledger_entries (entry_id, member_id, kind, points, balance_after,"
                " occurred_at, expires_at, ruleset_version)"
                " VALUES ($1, 'm-1', $2, 100, 100, now(), now() + interval '1 year', $3)",
                entry_id, kind, version,
            )  # fmt: skip
            await conn.execute(
                "INSERT INTO ledger_lots (lot_id, member_id, points, remaining, earned_at,"
                " available_from, expires_at, source_event_id)"
                " VALUES ($1, 'm-1', 100, $2, now(), now(), now() + interval '1 year', 'e-1')",
                entry_id, 0 if entry_id == "g-spent" else 100,
            )  # fmt: skip
        assert apply_migrations(fresh_database) >= 1
        versions = dict(await conn.fetch("SELECT lot_id, ruleset_version FROM ledger_lots"))
        # An emptied lot is never read again, so it is not rewritten.
        assert versions == {"g-live": "2026.2", "g-spent": None, "a-live": None}


async def test_0023_makes_members_with_spend_due_for_one_spend_report(fresh_database: str) -> None:
    async with migrated_until(fresh_database, "0023") as conn:
        states = {
            "m-gold": {"member_id": "m-gold", "tier": "gold",
                       "tier_valid_until": "2026-03-02T10:00:00+08:00",
                       "orders": {"o-1": {"amount": "30000"}}},
            "m-gold-later": {"member_id": "m-gold-later", "tier": "gold",
                             "tier_valid_until": "2999-03-02T10:00:00+08:00",
                             "orders": {"o-1": {"amount": "30000"}}},
            "m-spent": {"member_id": "m-spent", "orders": {"o-1": {"amount": "12.50"}}},
            "m-forgot": {"member_id": "m-forgot", "spend_history": [["2026-01-01T00:00:00Z", "9"]]},
            "m-plain": {"member_id": "m-plain"},
        }  # fmt: skip
        for member, state in states.items():
            await conn.execute(
                "INSERT INTO rules_member_state (member_id, state, tier_valid_until)"
                " VALUES ($1, $2::json, ($2::json ->> 'tier_valid_until')::timestamptz)",
                member, json.dumps(state),
            )  # fmt: skip
        assert apply_migrations(fresh_database) >= 1

        now = await conn.fetchval("SELECT now()")
        due = dict(await conn.fetch("SELECT member_id, tier_due_at FROM rules_member_state"))
        # A tier that ends before now is due at its end, as before; spend is reported once now.
        assert due["m-gold"] == datetime(2026, 3, 2, 2, 0, tzinfo=UTC)
        for member in ("m-gold-later", "m-spent", "m-forgot"):
            assert abs(due[member] - now) < timedelta(minutes=5), member
        assert due["m-plain"] is None
        index = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'rules_member_state_tier_due'"
        )
        assert "(tier_due_at, member_id)" in index


async def test_0024_tells_an_adjustments_lot_from_a_grants_by_its_creating_entry(
    fresh_database: str,
) -> None:
    """Before, an adjustment's lot kept the adjustment's id as its source event id."""
    async with migrated_until(fresh_database, "0024") as conn:
        lots = [("g-1", "earn", "e-1", None), ("a-1", "adjust", "adj-1", "adj-1"),
                ("a-spent", "adjust", "adj-2", "adj-2")]  # fmt: skip
        for entry_id, kind, source, adjustment in lots:
            await conn.execute(
                "INSERT INTO ledger_entries (entry_id, member_id, kind, points, balance_after,"
                " occurred_at, expires_at, source_event_id, adjustment_id)"
                " VALUES ($1, 'm-1', $2, 100, 100, now(), now() + interval '1 year', $3, $4)",
                entry_id, kind, None if adjustment else source, adjustment,
            )  # fmt: skip
            await conn.execute(
                "INSERT INTO ledger_lots (lot_id, member_id, points, remaining, earned_at,"
                " available_from, expires_at, source_event_id)"
                " VALUES ($1, 'm-1', 100, $2, now(), now(), now() + interval '1 year', $3)",
                entry_id, 0 if entry_id == "a-spent" else 100, source,
            )  # fmt: skip
        assert apply_migrations(fresh_database) >= 1
        rows = await conn.fetch("SELECT lot_id, source_event_id, adjustment_id FROM ledger_lots")
        assert {r["lot_id"]: (r["source_event_id"], r["adjustment_id"]) for r in rows} == {
            "g-1": ("e-1", None), "a-1": (None, "adj-1"), "a-spent": (None, "adj-2"),
        }  # fmt: skip


LOTS_0026 = [("l-live", 60, 1), ("l-spent", 0, 1), ("l-lapsed", 0, -1), ("l-pending", 40, 1)]


async def _lots_before_0026(conn: asyncpg.Connection) -> None:
    await conn.execute("INSERT INTO ledger_members (member_id) VALUES ('m-1'), ('m-2')")
    for lot_id, remaining, years in LOTS_0026:
        await conn.execute(
            "INSERT INTO ledger_lots (lot_id, member_id, points, remaining, earned_at,"
            " available_from, expires_at)"
            " VALUES ($1, 'm-1', 100, $2, now(), now() + make_interval(days => $4),"
            " now() + make_interval(years => $3))",
            lot_id, remaining, years, 3 if lot_id == "l-pending" else 0,
        )  # fmt: skip
    await conn.execute(
        "INSERT INTO ledger_lots (lot_id, member_id, points, remaining, earned_at,"
        " available_from, expires_at) VALUES ('l-other', 'm-2', 9, 9, now(), now(),"
        " now() + interval '1 year')"
    )


async def _lot_indexes(conn: asyncpg.Connection) -> dict[str, tuple[str, bool]]:
    rows = await conn.fetch(
        "SELECT indexrelid::regclass::text AS name, pg_get_indexdef(indexrelid) AS def,"
        " indisvalid FROM pg_index WHERE indrelid = 'ledger_lots'::regclass"
    )
    return {r["name"]: (r["def"].split(" USING ", 1)[1], r["indisvalid"]) for r in rows}


async def test_0026_indexes_a_members_lots_with_points_left_only(fresh_database: str) -> None:
    """Spent and lapsed lots stay in the table; every member-keyed query asks for
    `remaining > 0`, so the index need not walk past them. The queries still find exactly
    the lots with points left, and can do so through the partial index."""
    async with migrated_until(fresh_database, "0026") as conn:
        await _lots_before_0026(conn)
        assert "ledger_lots_member" in await _lot_indexes(conn)
        assert apply_migrations(fresh_database) >= 1

        assert await _lot_indexes(conn) == {
            "ledger_lots_pkey": ("btree (lot_id)", True),
            "ledger_lots_sweep": ("btree (sweep_at, lot_id) WHERE (remaining > 0)", True),
            "ledger_lots_member_live": (
                "btree (member_id, expires_at) WHERE (remaining > 0)", True,
            ),
        }  # fmt: skip
        now = await conn.fetchval("SELECT now()")
        member_keyed = {
            "SELECT_LOTS": (SELECT_LOTS, [["m-1"]]),
            "MEMBER_WITH_LOTS": (MEMBER_WITH_LOTS, ["m-1"]),
            "AVAILABLE_NOW": (AVAILABLE_NOW, [["m-1"], now]),
            "MEMBER_LOTS": (MEMBER_LOTS, [["m-1"]]),
        }
        await conn.execute("SET enable_seqscan = off")  # a handful of rows: force a choice
        for name, (sql, args) in member_keyed.items():
            plan = await conn.fetchval("EXPLAIN (FORMAT JSON) " + sql, *args)
            assert '"ledger_lots_member_live"' in plan, (name, plan)
        lots = await conn.fetch(SELECT_LOTS, ["m-1"])
        assert sorted((r["lot_id"], r["remaining"]) for r in lots) == [
            ("l-live", 60), ("l-pending", 40),
        ]  # fmt: skip
        view = await conn.fetch(MEMBER_WITH_LOTS, "m-1")
        assert sorted(r["lot_remaining"] for r in view) == [40, 60]
        assert (await conn.fetchrow(AVAILABLE_NOW, ["m-1"], now))["available"] == 60
        assert len(await conn.fetch(MEMBER_LOTS, ["m-1"])) == 2


async def test_0026_run_again_after_a_failed_build_replaces_the_invalid_index(
    fresh_database: str,
) -> None:
    """A concurrent build that fails leaves an INVALID index under its name, which
    `IF NOT EXISTS` alone would keep, unused, while the full index was dropped."""
    async with migrated_until(fresh_database, "0026") as conn:
        await _lots_before_0026(conn)
        with pytest.raises(asyncpg.UniqueViolationError):  # a build that fails half-way
            await conn.execute(
                "CREATE UNIQUE INDEX CONCURRENTLY ledger_lots_member_live"
                " ON ledger_lots (member_id) WHERE remaining > 0"
            )
        assert (await _lot_indexes(conn))["ledger_lots_member_live"][1] is False
        assert apply_migrations(fresh_database) >= 1

        indexes = await _lot_indexes(conn)
        assert indexes["ledger_lots_member_live"] == (
            "btree (member_id, expires_at) WHERE (remaining > 0)", True,
        )  # fmt: skip
        assert "ledger_lots_member" not in indexes


async def test_0027_records_the_stores_of_the_journal_before_it_and_of_every_entry_after(
    fresh_database: str,
) -> None:
    """The summary's store tiers read these pairs instead of the journal: a pair missing
    would drop a member from their store's count."""
    async with migrated_until(fresh_database, "0027") as conn:
        await conn.execute(
            "INSERT INTO ledger_entries (entry_id, member_id, kind, points, balance_after,"
            " occurred_at, store_id) VALUES ('e-1', 'm-1', 'earn', 10, 10, now(), 's-1'),"
            " ('e-2', 'm-1', 'earn', 10, 20, now(), 's-1'), ('e-3', 'm-2', 'earn', 10, 10,"
            " now(), NULL), ('e-4', 'm-2', 'redeem', -5, 5, now(), 's-2')"
        )
        assert apply_migrations(fresh_database) >= 1

        async def pairs() -> list[tuple[str, str]]:
            rows = await conn.fetch("SELECT store_id, member_id FROM ledger_member_stores")
            return sorted((r["store_id"], r["member_id"]) for r in rows)

        assert await pairs() == [("s-1", "m-1"), ("s-2", "m-2")]
        # As the ledger appends (COPY), and by INSERT: a pair already there, two new ones.
        at = datetime.now(UTC)
        await conn.copy_records_to_table(
            "ledger_entries",
            records=[("e-5", "m-1", "earn", 1, 21, at, "s-1"), ("e-6", "m-3", "earn", 1, 1, at,
                     "s-2"), ("e-7", "m-3", "earn", 1, 2, at, None)],
            columns=["entry_id", "member_id", "kind", "points", "balance_after", "occurred_at",
                     "store_id"],
        )  # fmt: skip
        await conn.execute(
            "INSERT INTO ledger_entries (entry_id, member_id, kind, points, balance_after,"
            " occurred_at, store_id) VALUES ('e-8', 'm-2', 'earn', 10, 15, now(), 's-1')"
        )
        assert await pairs() == [("s-1", "m-1"), ("s-1", "m-2"), ("s-2", "m-2"), ("s-2", "m-3")]
