"""Webhook delivery's turns (services/notifier/delivery.py): a receiver that is slow, or
never finishes its answer, holds up only its own member, never the others' notifications
nor a database transaction; a member's backlog takes one turn of a round, not the round;
a retry's back-off counts from the failed attempt; and two notifier processes still post
each member's notifications one at a time, in order."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from services.common.config import Settings
from services.notifier import delivery
from services.notifier.app import make_handler
from services.notifier.delivery import PER_MEMBER, POST_TIMEOUT_S, Deliverer
from tests.integration import direct
from tests.integration.direct import consumer_of, migrated_pool, webhook

pytestmark = pytest.mark.integration
TOPIC = "loyalty.ledger.v1"
DUE_NOW = ("UPDATE notifications SET next_attempt_at = now()"
           " WHERE status = 'pending' AND next_attempt_at > now()")  # fmt: skip


class Receiver:
    """Answers 204 at once unless told otherwise; logs what it accepted, and when."""

    def __init__(self) -> None:
        self.accepted: list[tuple[str, float]] = []  # (notification id, when)
        self.refused_at: dict[str, float] = {}
        self.refuse: set[str] = set()  # 503 to these, every time
        self.slow: dict[str, float] = {}  # member -> seconds before the answer
        self.trickle: set[str] = set()  # 200 at once, then a byte a second, never ending
        self.flaky: random.Random | None = None  # 503 to a quarter of all posts
        self.in_flight: set[str] = set()  # members being posted to
        self.overlaps: list[str] = []  # a member posted to while a post of theirs was open

    async def hook(self, request: Request) -> Response:
        body = json.loads(await request.body())
        nid, member = body["notification_id"], body["member_id"]
        if nid in self.trickle:
            return StreamingResponse(_trickle(), status_code=200)
        if member in self.in_flight:
            self.overlaps.append(nid)
        self.in_flight.add(member)
        try:
            await asyncio.sleep(self.slow.get(member, 0.0))
        finally:
            self.in_flight.discard(member)
        if nid in self.refuse or (self.flaky is not None and self.flaky.random() < 0.25):
            self.refused_at[nid] = time.time()
            return Response(status_code=503)
        self.accepted.append((nid, time.time()))
        return Response(status_code=204)

    def ids(self, prefix: str = "") -> list[str]:
        return [nid for nid, _ in self.accepted if nid.startswith(prefix)]


async def _trickle() -> AsyncIterator[bytes]:
    while True:
        yield b"x"
        await asyncio.sleep(1.0)  # well within httpx's 10 s between reads


@pytest.fixture
async def env(fresh_database: str) -> AsyncIterator[tuple[asyncpg.Pool, Any, Receiver, str]]:
    rec = Receiver()
    async with migrated_pool(fresh_database, max_size=6) as pool, webhook(rec.hook) as url:
        settings = Settings(database_url=fresh_database, bootstrap_servers="", webhook_url=url,
                            webhook_secret="s")  # fmt: skip
        yield (
            pool,
            consumer_of(pool, "notifier", TOPIC, make_handler(settings, "notifier")),
            rec,
            url,
        )


def earned(eid: str, member: str, balance: int = 10) -> dict[str, Any]:
    return {"event_id": eid, "type": "points_earned", "schema_version": 1,
            "occurred_at": "2026-03-01T10:00:00+08:00", "member_id": member,
            "data": {"points": 10, "balance_after": balance, "rule_id": "base"}}  # fmt: skip


async def record(consumer: Any, *events: dict[str, Any]) -> None:
    await consumer.process(direct.records(TOPIC, *events))


async def open_transactions(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND state LIKE 'idle in transaction%'"
    ))  # fmt: skip


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_receiver_that_trickles_its_answer_is_cut_off_at_the_posts_deadline(
    env: Any,
) -> None:
    # httpx's timeout bounds each read: a byte a second kept the post, its round and the
    # round's transaction open for good.
    pool, consumer, rec, url = env
    rec.trickle.add("t-1")
    await record(consumer, earned("t-1", "m-t"))
    async with httpx.AsyncClient(timeout=10.0) as client:
        async with asyncio.timeout(POST_TIMEOUT_S + 5):
            assert await Deliverer(pool, url, "s").deliver_once(client) == 1
    row = await pool.fetchrow("SELECT status, attempts, last_error, leased_until"
                              " FROM notifications WHERE notification_id = 't-1'")  # fmt: skip
    assert (row["status"], row["attempts"], row["leased_until"]) == ("pending", 1, None)
    assert row["last_error"].startswith("timeout")


async def test_other_members_go_on_while_one_receivers_answer_is_slow(env: Any) -> None:
    # A round ended with its slowest post, and held one transaction across all its posts:
    # every other member's new notification waited for that one receiver.
    pool, consumer, rec, url = env
    rec.slow["m-slow"] = 4.0
    deliverer = Deliverer(pool, url, "s")
    task = asyncio.create_task(deliverer.run())
    await record(consumer, earned("slow-1", "m-slow"))
    deliverer.wake()
    recorded: dict[str, float] = {}
    try:
        for i in range(4):
            await asyncio.sleep(0.5)
            await record(consumer, earned(f"q-{i}", f"m-q{i}"))
            recorded[f"q-{i}"] = time.time()
            deliverer.wake()
        await asyncio.sleep(0.5)
        assert rec.ids("slow-") == []  # still being posted
        assert await open_transactions(pool) == 0
    finally:
        await stop(task)
    late = {nid: round(at - recorded[nid], 1) for nid, at in rec.accepted if nid in recorded}
    assert sorted(late) == sorted(recorded)
    assert max(late.values()) < 1.0, late
    # Stopped midway, it lets its member go at once, for another process to take.
    row = await pool.fetchrow("SELECT status, leased_until FROM notifications"
                              " WHERE notification_id = 'slow-1'")  # fmt: skip
    assert tuple(row) == ("pending", None)


async def test_a_member_is_posted_to_only_while_the_lease_lasts_then_let_go(
    env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past its lease another process may take the member: no post of it may start that
    # could end, or be recorded, after the lease (here it leaves half a second to post).
    pool, consumer, rec, url = env
    monkeypatch.setattr(delivery, "LEASE_S", delivery.POST_TIMEOUT_S + delivery.RECORD_S + 0.5)
    rec.slow["m-l"] = 0.6
    await record(consumer, *(earned(f"l-{i}", "m-l", i + 1) for i in range(3)))
    async with httpx.AsyncClient(timeout=10.0) as client:
        assert await Deliverer(pool, url, "s").deliver_once(client) == 1
    assert rec.ids() == ["l-0"]
    rows = await pool.fetch("SELECT status, attempts, leased_until FROM notifications"
                            " ORDER BY seq")  # fmt: skip
    assert [tuple(r) for r in rows] == [("delivered", 1, None), *[("pending", 0, None)] * 2]


async def test_a_members_backlog_takes_one_turn_of_a_round(env: Any) -> None:
    # The round took its 50 rows in `seq` order: a member 50 behind (the notifier caught up
    # after lag) filled it, and every other member waited a round per 50 of theirs.
    pool, consumer, rec, url = env
    await record(consumer, *(earned(f"big-{i:03}", "m-big", i + 1) for i in range(50)))
    await record(consumer, *(earned(f"x-{i:02}", f"m-x{i}") for i in range(20)))
    async with httpx.AsyncClient(timeout=10.0) as client:
        assert await Deliverer(pool, url, "s").deliver_once(client) == 20 + PER_MEMBER
    assert sorted(rec.ids("x-")) == [f"x-{i:02}" for i in range(20)]
    assert rec.ids("big-") == [f"big-{i:03}" for i in range(PER_MEMBER)]


async def test_a_backlog_behind_a_retry_does_not_take_the_turn_of_members_due_before_it(
    env: Any,
) -> None:
    pool, consumer, rec, url = env
    await record(consumer, *(earned(f"a-{i:03}", "m-a", i + 1) for i in range(60)))
    rec.refuse.add("a-000")
    deliverer = Deliverer(pool, url, "s")
    async with httpx.AsyncClient(timeout=10.0) as client:
        await deliverer.deliver_once(client)  # a-000 refused: the other 59 wait behind it
        rec.refuse.clear()
        await record(consumer, *(earned(f"o-{i}", f"m-o{i}") for i in range(10)))
        # Its back-off over (what time passing would do): the member and the others due.
        await pool.execute("UPDATE notifications SET next_attempt_at = now()"
                           " WHERE member_id = 'm-a'")  # fmt: skip
        await deliverer.deliver_once(client)
    assert sorted(rec.ids("o-")) == [f"o-{i}" for i in range(10)]
    assert rec.ids("a-") == [f"a-{i:03}" for i in range(PER_MEMBER)]


async def test_a_retry_is_due_its_back_off_after_the_failed_attempt_not_after_the_round(
    env: Any,
) -> None:
    # The back-off was counted from when the round wrote its outcomes: after its slowest
    # post, 3 s here, so the first retry came 5 s after the refusal instead of 2.
    pool, consumer, rec, url = env
    await record(consumer, earned("r-fast", "m-fast"), earned("r-slow", "m-slow"))
    rec.refuse.add("r-fast")
    rec.slow["m-slow"] = 3.0
    async with httpx.AsyncClient(timeout=10.0) as client:
        await Deliverer(pool, url, "s").deliver_once(client)
    due = await pool.fetchval("SELECT extract(epoch FROM next_attempt_at) FROM notifications"
                              " WHERE notification_id = 'r-fast'")  # fmt: skip
    assert 1.5 < float(due) - rec.refused_at["r-fast"] < 2.5  # the first back-off, 2 s


async def test_two_processes_post_each_members_notifications_one_at_a_time_in_order(
    env: Any,
) -> None:
    pool, consumer, rec, url = env
    rec.flaky = random.Random(7)
    for m in range(12):
        rec.slow[f"m-{m:02}"] = 0.02
    events = [earned(f"o-{m:02}-{k:02}", f"m-{m:02}", k + 1) for k in range(12) for m in range(12)]
    for i in range(0, len(events), 37):
        await record(consumer, *events[i : i + 37])
    deliverers = [Deliverer(pool, url, "s"), Deliverer(pool, url, "s")]
    tasks = [asyncio.create_task(d.run()) for d in deliverers]
    try:
        async with asyncio.timeout(15):
            while await pool.fetchval("SELECT count(*) FROM notifications"
                                      " WHERE status = 'pending'"):  # fmt: skip
                await asyncio.sleep(0.2)
                # Back-offs over (what time passing would do).
                await pool.execute(DUE_NOW)
                for d in deliverers:
                    d.wake()
    finally:
        for t in tasks:
            await stop(t)
    assert rec.overlaps == []
    assert sorted(set(rec.ids())) == sorted(e["event_id"] for e in events)
    for m in range(12):
        mine = rec.ids(f"o-{m:02}-")
        assert mine == sorted(set(mine)), mine  # in order, none twice


def _rows_read(plan: dict[str, Any]) -> int:
    """Rows the plan's scans of `notifications` returned, over all their loops."""
    own = 0
    if plan.get("Relation Name") == "notifications" and "Scan" in plan["Node Type"]:
        own = int(plan["Actual Rows"]) * int(plan["Actual Loops"])
    return own + sum(_rows_read(p) for p in plan.get("Plans", []))


async def test_a_take_reads_a_turn_of_a_members_backlog_not_the_whole_of_it(
    fresh_database: str,
) -> None:
    """Checking every earlier pending row for a retry or a lease walked the backlog for
    each row of it: with a long history of delivered rows, a take of one member with 10,000
    pending took 20 s. Retries and leases sit on a member's first pending row, so that row
    alone is read, and a turn's rows come from the member's own index range."""
    async with migrated_pool(fresh_database) as pool, pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO notifications (notification_id, member_id, kind, message, payload)"
            " SELECT 'n-' || g, 'm-big', 'points_earned', 'm', '{}'"
            " FROM generate_series(1, 5000) AS g"
        )
        await conn.execute("ANALYZE notifications")
        # At most: the candidates' due rows and one first-row probe for each; a turn's rows
        # and their first row (the old check read 10,000 here, the backlog twice).
        bounds = (
            (delivery._CANDIDATES, (50,), 4 * delivery._CANDIDATE_ROWS),
            (delivery._LEASE, (["m-big"], 60.0), 4 * PER_MEMBER),
        )
        for sql, args, most in bounds:
            explained = conn.transaction()  # EXPLAIN ANALYZE runs the lease: rolled back
            await explained.start()
            got = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
            await explained.rollback()
            plan = (json.loads(got) if isinstance(got, str) else got)[0]["Plan"]
            assert _rows_read(plan) <= most, sql
        taken = await conn.fetch(delivery._LEASE, ["m-big"], 60.0)
        assert [r["notification_id"] for r in sorted(taken, key=lambda r: r["seq"])] == [
            f"n-{i}" for i in range(1, PER_MEMBER + 1)
        ]
        # Leased: the member's later rows wait behind the turn, in the take and in candidates.
        assert await conn.fetch(delivery._LEASE, ["m-big"], 60.0) == []
        assert await conn.fetch(delivery._CANDIDATES, 50) == []
