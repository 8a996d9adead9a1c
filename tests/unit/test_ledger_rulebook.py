"""The ledger's view of the rule book (services/ledger/rulebook.py), on a stub connection:
only the two queries it makes (the book's stamp, the published versions) are answered."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from rules_factories import DEFAULT

from services.ledger import rulebook
from services.ledger.redemption import DEFAULT_POLICY
from services.ledger.rulebook import LedgerRules
from services.rules.rulebook_store import DEFAULT_RULESET

SEED = DEFAULT_RULESET.read_text(encoding="utf-8")
SHANGHAI = ZoneInfo("Asia/Shanghai")
CLINIC = (
    'version: "clinic-b"\neffective_from: 2026-06-01T00:00:00+08:00\n'
    "expiry:\n  lot_lifetime_months: 6\n"
    "redemption:\n  min_balance: 100\n"
    "  points_per_cny: {member: 50, silver: 50, gold: 40, diamond: 30}\n"
)
# Published before the check at publish existed: loads, but the ledger cannot price cash.
BROKEN = 'version: "broken"\neffective_from: 2026-09-01T00:00:00+08:00\n' + (
    "redemption:\n  points_per_cny: {gold: 70}\n"
)


class Conn:
    def __init__(self, *bodies: str) -> None:
        self.bodies = list(bodies)

    async def fetchrow(self, sql: str, *args: Any) -> tuple[int, object]:
        return (len(self.bodies), tuple(self.bodies))

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, str]]:
        return [{"version": "?", "body": b} for b in self.bodies]


def test_lifetimes_and_policies_come_from_the_versions() -> None:
    async def go() -> None:
        rules = LedgerRules()
        conn = Conn(SEED, CLINIC)
        await rules.refresh(conn)
        assert rules.lifetime_months("clinic-b") == 6
        assert rules.lifetime_months(DEFAULT.version) == 12
        assert rules.lifetime_months("from-another-system") == 12
        assert rules.zone("clinic-b") == rules.zone("from-another-system") == SHANGHAI
        assert await rules.lifetime_at(conn, datetime(2026, 7, 1, tzinfo=UTC)) == (6, SHANGHAI)
        before = await rules.policy_at(conn, datetime(2026, 5, 1, tzinfo=UTC))
        after = await rules.policy_at(conn, datetime(2026, 7, 1, tzinfo=UTC))
        assert before == DEFAULT_POLICY
        assert (after.min_balance, after.rate("gold")) == (100, 40)

    asyncio.run(go())


def test_a_book_the_ledger_cannot_use_is_logged_and_the_last_good_one_kept() -> None:
    async def go() -> None:
        rules = LedgerRules()
        conn = Conn(SEED, CLINIC)
        await rules.refresh(conn)
        conn.bodies.append(BROKEN)
        book = await rules.refresh(conn)
        assert [r.version for r in book.versions] == [DEFAULT.version, "clinic-b"]
        at = datetime(2026, 10, 1, tzinfo=UTC)
        assert (await rules.policy_at(conn, at)).rate("gold") == 40
        # With no good book yet, the seed file's numbers.
        fresh = LedgerRules()
        assert await fresh.policy_at(Conn(SEED, BROKEN), at) == DEFAULT_POLICY

    asyncio.run(go())


class SlowConn(Conn):
    """The versions query waits for `go` (a refresh caught half-way through its read)."""

    def __init__(self, *bodies: str) -> None:
        super().__init__(*bodies)
        self.entered, self.go = asyncio.Event(), asyncio.Event()

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, str]]:
        self.entered.set()
        await self.go.wait()
        return await super().fetch(sql, *args)


def test_a_refresh_during_another_refresh_waits_for_the_new_book() -> None:
    """An API call and a consumer batch refreshing at once, right after a publish: the
    batch must not see "stamp unchanged" while the API call is still reading the new book
    and price a grant of the new version with the old book's (default) lifetime."""

    async def go() -> None:
        rules = LedgerRules()
        await rules.refresh(Conn(SEED))
        slow = SlowConn(SEED, CLINIC)  # clinic-b published: the stamp changed

        async def batch() -> int:
            await rules.refresh(Conn(SEED, CLINIC))
            return rules.lifetime_months("clinic-b")

        api = asyncio.create_task(rules.refresh(slow))
        await slow.entered.wait()
        consumer = asyncio.create_task(batch())
        for _ in range(5):
            await asyncio.sleep(0)
        slow.go.set()
        await api
        assert await consumer == 6

    asyncio.run(go())


class CountingConn(Conn):
    def __init__(self, *bodies: str) -> None:
        super().__init__(*bodies)
        self.stamps = 0

    async def fetchrow(self, sql: str, *args: Any) -> tuple[int, object]:
        self.stamps += 1
        return await super().fetchrow(sql, *args)


def test_a_recently_checked_book_is_handed_out_without_a_query(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The member view reads the book for every member without a tier report: it must
    not queue each request behind the refresh lock for a stamp query (the reads bench
    fell from thousands of requests a second to 1,388 when it did)."""
    clock = [1000.0]
    monkeypatch.setattr(rulebook.time, "monotonic", lambda: clock[0])

    async def go() -> None:
        rules = LedgerRules()
        conn = CountingConn(SEED)
        await rules.recent(conn)
        await rules.recent(conn)
        assert conn.stamps == 1
        clock[0] += rulebook.RECENT_S
        newer = CountingConn(SEED, CLINIC)
        book = await rules.recent(newer)  # old enough: looked at again, and reloaded
        assert newer.stamps == 1
        assert [r.version for r in book.versions][-1] == "clinic-b"

    asyncio.run(go())
