"""A mixed clinic stream (purchases, sign-ins, refunds), the oracle it must pay, and the
check that the pipeline paid exactly that.

The oracle is the pure evaluator run over the stream in order: whatever the pipeline does
with processes, partitions and crashes, each member's net points must come out the same.
"""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta
from typing import Any

from schemas.activity import parse_activity
from services.rules.engine import evaluate
from services.rules.rulebook_store import DEFAULT_RULESET
from services.rules.ruleset import load_ruleset
from services.rules.state import MemberState
from tests.integration.events import purchase, refund, sign_in
from tests.integration.harness import Stack, wait_until


def mixed_stream(n: int, members: int, start: datetime, seed: int = 7) -> list[dict[str, Any]]:
    """`n` events 5 minutes apart: 5 % refunds of earlier orders, 30 % sign-ins, purchases."""
    rng = random.Random(seed)
    ids = [f"m-{i:03d}" for i in range(members)]
    events: list[dict[str, Any]] = []
    orders: list[tuple[str, str, str]] = []
    for i in range(n):
        member = rng.choice(ids)
        at = start + timedelta(seconds=i * 300)
        if orders and rng.random() < 0.05:
            m, order_id, amount = orders.pop(rng.randrange(len(orders)))
            events.append(refund(m, order_id, amount, at))
        elif rng.random() < 0.3:
            events.append(sign_in(member, at))
        else:
            amount = f"{rng.choice([88, 388, 999, 1280, 2500, 3600])}.00"
            event = purchase(member, amount, at)
            orders.append((member, event["data"]["order_id"], amount))
            events.append(event)
    return events


def expected_points(events: list[dict[str, Any]]) -> dict[str, int]:
    """What the pure evaluator pays for the stream, net of revokes, per member."""
    ruleset = load_ruleset(DEFAULT_RULESET)
    states: dict[str, MemberState] = {}
    totals: dict[str, int] = {}
    seen: set[str] = set()
    for raw in events:
        event = parse_activity(json.dumps(raw))
        if event.event_id in seen:
            continue
        seen.add(event.event_id)
        state = states.get(event.member_id) or MemberState(member_id=event.member_id)
        result = evaluate(state, event, ruleset, {})
        states[event.member_id] = result.state
        for g in result.grants:
            if g.type == "points_granted":
                totals[g.member_id] = totals.get(g.member_id, 0) + g.data.points
            elif g.type == "points_revoked":
                totals[g.member_id] = totals.get(g.member_id, 0) - g.data.points
    return totals


async def assert_paid_exactly_once(
    stack: Stack, events: list[dict[str, Any]], timeout: float = 120
) -> None:
    """Waits until every member's net points equal the oracle's, then checks that no
    grant or revoke was journaled twice and every activity was stored once."""
    expected = {m: p for m, p in expected_points(events).items() if p}

    async def all_journaled() -> bool:
        stack.assert_running()
        got = await stack.fetch("SELECT member_id, earned - revoked AS net FROM ledger_members")
        return {r["member_id"]: r["net"] for r in got if r["net"]} == expected

    await wait_until(all_journaled, timeout=timeout, what="totals equal to the pure evaluator's")
    dupes = await stack.scalar(
        "SELECT count(*) FROM (SELECT source_event_id, rule_id, member_id FROM ledger_entries"
        " WHERE kind IN ('earn', 'revoke') GROUP BY 1, 2, 3, kind HAVING count(*) > 1) d"
    )
    assert dupes == 0
    assert await stack.scalar("SELECT count(*) FROM rules_activity") == len(events)
