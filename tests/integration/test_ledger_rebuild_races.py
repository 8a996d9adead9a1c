"""`ledger rebuild` beside another rebuild or a `ledger verify`, and what both restore and check
of the members known only from the tier history, against a real Postgres.

The overlaps are made with the rebuild's and verify's own progress callbacks as hooks (one
run stops at a known step while the other goes on), so no test depends on timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from services.ledger.rebuild import REBUILD_LOCK_KEY, RebuildRunning, rebuild, verify
from tests.integration.direct import migrated_pool
from tests.integration.ledger_helpers import copy_journal, generate_journal
from tests.integration.test_ledger_rebuild import ledgerctl

pytestmark = pytest.mark.integration
START = datetime.now(UTC) - timedelta(days=700)
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
            assert b_built.wait(WAIT_S) or b_done.wait(WAIT_S)

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
            assert r_waits.wait(WAIT_S) or r_done.wait(WAIT_S)

    report = await verify(dsn, progress)
    assert await asyncio.to_thread(r_done.wait, WAIT_S)
    assert report.differences == []
    assert report.members == 200
    assert not isinstance(r_result[0], BaseException), r_result
    assert r_result[0].swap_retries == 0  # it waited for verify, not against its lock
    assert any(p.startswith("waiting for a running `ledger verify`") for p in phases), phases
    assert (await verify(dsn)).differences == []
