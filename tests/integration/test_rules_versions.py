"""Rule-set versions and held engagement on the running pipeline (real broker + Postgres)."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from schemas.grants import PointsGranted, parse_grant
from tests.integration.events import CST, purchase
from tests.integration.harness import Stack, wait_until
from tests.integration.rules_helpers import ctl, default_with

pytestmark = pytest.mark.integration


async def _grants(stack: Stack, expect: int) -> list[Any]:
    records = await stack.read_topic(stack.topics.grants, expect=expect, timeout=90)
    return [parse_grant(r.value) for r in records]


async def test_rule_change_applies_from_effective_from_and_a_replay_reproduces_grants(
    stack: Stack, tmp_path: Path
) -> None:
    # Far enough ahead that `ledgerctl rules publish` (a process start and a connection)
    # is still before it on a loaded machine: 8 s was not, once, with the CPUs shared.
    effective = datetime.now(CST).replace(microsecond=0) + timedelta(seconds=15)
    v2 = default_with(tmp_path, "v2.yaml", version="it-v2", effective_from=effective.isoformat(),
                      purchase={"points_per_cny": 3})  # fmt: skip
    sent: list[dict[str, Any]] = []

    async def flow() -> None:
        # One purchase every 200 ms, stamped with the time it is sent, until 3 s past the
        # switch: the change is published while events flow.
        i = 0
        while datetime.now(CST) < effective + timedelta(seconds=3):
            event = purchase(f"m-flow-{i % 7}", "100.00", datetime.now(CST))
            sent.append(event)
            await stack.produce([event])
            i += 1
            await asyncio.sleep(0.2)

    producer = asyncio.create_task(flow())
    ran = await ctl(stack.dsn, "publish", str(v2))
    await producer
    assert ran.code == 0, ran.stderr
    before = [e for e in sent if datetime.fromisoformat(e["occurred_at"]) < effective]
    after = [e for e in sent if datetime.fromisoformat(e["occurred_at"]) >= effective]
    assert before
    assert after

    # 7 members: a first-purchase bonus each, a base grant per event, a tier evaluation each.
    expected_count = 2 * len(sent) + 7
    grants = await _grants(stack, expected_count)
    base = {g.data.source_event_id: g for g in grants
            if isinstance(g, PointsGranted) and g.data.rule_id == "base"}  # fmt: skip
    assert len(base) == len(sent)
    for e in before:
        g = base[e["event_id"]]
        assert (g.data.points, g.data.ruleset_version) == (100, "2026.1"), e["occurred_at"]
    for e in after:
        g = base[e["event_id"]]
        assert (g.data.points, g.data.ruleset_version) == (300, "it-v2"), e["occurred_at"]
    first_run = {g.event_id: g for g in grants}
    total = sum(g.data.points for g in first_run.values() if isinstance(g, PointsGranted))
    await wait_until(
        lambda: stack.scalar("SELECT coalesce(sum(earned), 0) = $1 FROM ledger_members", total),
        what="the ledger to journal every grant",
    )

    # Replay: a fresh rules state re-reads the same topic from offset 0.
    stack.kill("rules")
    await stack.fetch("TRUNCATE rules_activity, rules_member_state, rules_held")
    await stack.fetch(
        "UPDATE consumer_offsets SET next_offset = 0 WHERE consumer = $1",
        stack.topics.prefix + "rules",
    )
    stack.start("rules")
    again = await _grants(stack, 2 * len(first_run))
    by_id: dict[str, list[Any]] = defaultdict(list)
    for g in again:
        by_id[g.event_id].append(g)
    assert set(by_id) == set(first_run)
    for grant_id, copies in by_id.items():
        assert copies == [first_run[grant_id]] * 2, grant_id  # same ids, same points, version
    # The ledger dedupes the replayed grants: nothing is paid twice.
    await wait_until(
        lambda: stack.scalar("SELECT count(*) = 0 FROM outbox WHERE service = 'rules'"),
        what="the replayed grants to be relayed",
    )
    assert await stack.scalar("SELECT sum(earned) FROM ledger_members") == total
    dupes = await stack.scalar(
        "SELECT count(*) FROM (SELECT source_event_id, rule_id, member_id FROM ledger_entries"
        " WHERE kind = 'earn' GROUP BY 1, 2, 3 HAVING count(*) > 1) d"
    )
    assert dupes == 0


def _engagement(kind: str, member: str, at: datetime, n: int) -> dict[str, Any]:
    base = {"event_id": f"{kind}-{member}-{n}", "type": kind, "occurred_at": at.isoformat(),
            "member_id": member, "store_id": None, "source": "app"}  # fmt: skip
    if kind == "share":
        data = {"share_id": f"s-{n}", "channel": "wechat", "approved": False, "likes": 0}
    else:
        data = {"review_id": f"r-{n}", "rating": 5, "featured": False}
    return {**base, "data": data}


async def test_a_burst_is_held_then_released_to_the_ledger_or_rejected(stack: Stack) -> None:
    t0 = datetime.now(CST).replace(microsecond=0) - timedelta(hours=1)
    # 20 unpaid shares (no approval, no likes) in 20 s fill the burst window; the reviews
    # that follow within the minute are held instead of paid.
    events = [_engagement("share", "m-burst", t0 + timedelta(seconds=i), i) for i in range(20)]
    events += [_engagement("review", "m-burst", t0 + timedelta(seconds=20 + i), i) for i in (1, 2)]
    await stack.produce(events)
    await wait_until(
        lambda: stack.scalar("SELECT count(*) = 2 FROM rules_held WHERE status = 'pending'"),
        what="two held reviews",
    )
    listed = await ctl(stack.dsn, "held", "list", "--json")
    held = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [h["event_id"] for h in held] == ["review-m-burst-1", "review-m-burst-2"]
    assert "20 engagement events" in held[0]["reason"]
    env = {"LOYALTY_TOPIC_PREFIX": stack.topics.prefix}
    released = await ctl(stack.dsn, "held", "release", "review-m-burst-1", env=env)
    assert released.code == 0, released.stderr
    rejected = await ctl(stack.dsn, "held", "reject", "review-m-burst-2", env=env)
    assert rejected.code == 0, rejected.stderr

    async def journaled() -> list[dict[str, Any]] | None:
        resp = await stack.get("/v1/members/m-burst/entries")
        entries = resp.json()["entries"] if resp.status_code == 200 else []
        return entries or None

    entries = await wait_until(journaled, what="the released review in the ledger")
    assert [(e["rule_id"], e["points"], e["source_event_id"]) for e in entries] == [
        ("review", 50, "review-m-burst-1")
    ]
    statuses = await stack.fetch("SELECT event_id, status FROM rules_held ORDER BY 1")
    assert [r["status"] for r in statuses] == ["released", "rejected"]
