"""`ledgerctl ledger rebuild` / `verify` against a real Postgres and a 100,000-entry journal."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from datetime import UTC, datetime, timedelta

import pytest

from services.common.migrations import apply_migrations
from services.ledger.rebuild import rebuild, verify
from services.ledger.redemptions import adjust
from tests.integration.harness import ROOT
from tests.integration.ledger_helpers import copy_journal, generate_journal, pool_for
from tests.integration.rules_helpers import LEDGERCTL

pytestmark = pytest.mark.integration
START = datetime.now(UTC) - timedelta(days=700)


def ledgerctl(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), DATABASE_URL=dsn, COLUMNS="120")
    return subprocess.run(
        [LEDGERCTL, "ledger", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


async def test_rebuild_then_verify_on_100k_entries_while_writes_go_on(
    fresh_database: str,
) -> None:
    dsn = fresh_database
    await asyncio.to_thread(apply_migrations, dsn)
    t0 = time.monotonic()
    records = generate_journal(members=1000, per_member=100, start=START)
    assert len(records) == 100_000
    pool = await pool_for(dsn)
    try:
        async with pool.acquire() as conn:
            await copy_journal(conn, records)
        generated = time.monotonic() - t0

        # Empty read models: verify finds every member missing; the CLI exits non-zero.
        assert len((await verify(dsn)).differences) >= 1000
        failed = await asyncio.to_thread(ledgerctl, dsn, "verify", "--limit", "3")
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert "m-00000: in the journal but not in ledger_members" in failed.stdout

        t1 = time.monotonic()
        done = await asyncio.to_thread(ledgerctl, dsn, "rebuild")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "rebuilt 1000 members" in done.stdout
        # Progress by step, each as it begins (one SQL statement each over the journal).
        steps = ["member totals from 100,000 entries", "lots with points left", "indexes of",
                 "swap"]  # fmt: skip
        at = [done.stdout.find(step) for step in steps]
        assert -1 not in at, done.stdout
        assert at == sorted(at)
        rebuilt_s = time.monotonic() - t1
        async with pool.acquire() as conn:
            # Each lot keeps its grant's rule-set version, which its expiry event carries.
            versions = await conn.fetch(
                "SELECT l.ruleset_version AS lot, e.ruleset_version AS grant_version"
                " FROM ledger_lots AS l JOIN ledger_entries AS e ON e.entry_id = l.lot_id"
            )
            assert [r for r in versions if r["lot"] != r["grant_version"]] == []
            assert any(r["lot"] == "v1" for r in versions)
        t2 = time.monotonic()
        ok = await asyncio.to_thread(ledgerctl, dsn, "verify")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        verified_s = time.monotonic() - t2
        print(
            f"\n100k entries: generate {generated:.1f}s, rebuild {rebuilt_s:.1f}s (CLI),"
            f" verify {verified_s:.1f}s (CLI)"
        )

        # A second rebuild while the API path keeps writing: the swap catches them up.
        async def writer() -> int:
            n = 0
            for i in range(60):
                async with pool.acquire() as conn:
                    await adjust(
                        conn,
                        "t.loyalty.ledger.v1",
                        f"adj-live-{i}",
                        member_id=f"m-{(i * 37) % 1000:05d}",
                        points=10 + i,
                        reason="live during rebuild",
                        operator="ops-test",
                        allow_debt=False,
                        now=datetime.now(UTC),
                    )
                n += 1
                await asyncio.sleep(0)
            return n

        report, written = await asyncio.gather(rebuild(dsn), writer())
        assert written == 60
        assert report.members == 1000
        assert (await verify(dsn)).differences == []
        async with pool.acquire() as conn:
            live = await conn.fetchval(
                "SELECT count(*) FROM ledger_entries WHERE adjustment_id LIKE 'adj-live-%'"
            )
            assert live == 60
            # Indexes and the primary key survived the swap under their own names.
            indexes = {
                r["indexname"]
                for r in await conn.fetch(
                    "SELECT indexname FROM pg_indexes WHERE tablename IN"
                    " ('ledger_members', 'ledger_lots')"
                )
            }
            assert {
                "ledger_members_pkey",
                "ledger_lots_pkey",
                "ledger_lots_member_live",
                "ledger_lots_sweep",
            } <= indexes

            # Corrupt the read models: verify names each difference.
            await conn.execute(
                "UPDATE ledger_members SET earned = earned + 1 WHERE member_id = 'm-00007'"
            )
            lot = await conn.fetchrow(
                "SELECT lot_id, member_id FROM ledger_lots"
                " WHERE remaining > 1 ORDER BY lot_id LIMIT 1"
            )
            await conn.execute(
                "UPDATE ledger_lots SET remaining = remaining - 1 WHERE lot_id = $1", lot["lot_id"]
            )
            await conn.execute(
                "UPDATE ledger_members SET tier = 'gold' WHERE member_id = 'm-00009'"
            )
            # A lot attributed to another rule and source (its points untouched): the
            # expiry events and the per-store report read those from the lot.
            misattributed = await conn.fetchrow(
                "SELECT lot_id, member_id FROM ledger_lots"
                " WHERE remaining > 0 AND member_id <> $1 ORDER BY lot_id DESC LIMIT 1",
                lot["member_id"],
            )
            await conn.execute(
                "UPDATE ledger_lots SET rule_id = 'combo', source_event_id = 'e-forged'"
                " WHERE lot_id = $1",
                misattributed["lot_id"],
            )
        diffs = (await verify(dsn)).differences
        assert len(diffs) == 4, diffs
        assert any(d.startswith("m-00007: earned journal=") for d in diffs)
        assert any(f"lot {lot['lot_id']}" in d for d in diffs)
        assert any(d.startswith("m-00009: tier history says member") for d in diffs)
        forged = [d for d in diffs if f"lot {misattributed['lot_id']}" in d]
        assert len(forged) == 1
        assert "rule combo" in forged[0]
        assert "source e-forged" in forged[0]
        bad = await asyncio.to_thread(ledgerctl, dsn, "verify")
        assert bad.returncode == 1
        assert "4 difference(s)" in bad.stdout

        # Rebuild repairs totals and lots from the journal, tiers from the tier history.
        await rebuild(dsn)
        assert (await verify(dsn)).differences == []
    finally:
        await pool.close()


async def test_rebuild_and_verify_finish_under_a_dbas_timeouts(fresh_database: str) -> None:
    """A DBA's `statement_timeout` / `lock_timeout` on the database, meant for the
    services' short statements, cancelled the rebuild's whole-journal statements halfway
    (it never finished) and a verify's read: ops sessions lift them (`ops_session`)."""
    dsn = fresh_database
    await asyncio.to_thread(apply_migrations, dsn)
    pool = await pool_for(dsn)
    try:
        async with pool.acquire() as conn:
            await copy_journal(conn, generate_journal(members=200, per_member=50, start=START))
            name = await conn.fetchval("SELECT current_database()")
            await conn.execute(
                f"ALTER DATABASE \"{name}\" SET statement_timeout = '1ms';"
                f" ALTER DATABASE \"{name}\" SET lock_timeout = '1ms'"
            )
    finally:
        await pool.close()
    report = await rebuild(dsn)
    assert report.members == 200
    assert not (await verify(dsn)).differences
    done = await asyncio.to_thread(ledgerctl, dsn, "verify")
    assert done.returncode == 0, done.stdout + done.stderr
