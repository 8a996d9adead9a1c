"""A quiet member's tier lapses on time: the rules service's tier sweep, through the ledger.

Without it a member who stops coming kept a lapsed tier (and its cash rate at the desk)
until their next event; the evaluator only applied the expiry then."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest

from services.rules.pruning import add_months
from tests.integration.events import CST, purchase
from tests.integration.harness import Stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("fast_tier_sweep")]
NOW = datetime.now(CST).replace(microsecond=0)


async def test_a_quiet_gold_members_tier_lapses_without_another_event(stack: Stack) -> None:
    bought = NOW - timedelta(days=400)
    lapsed = add_months(bought, 12)
    # Gold from one purchase 13 months ago; a member who still comes keeps silver.
    await stack.produce(
        [
            purchase("m-quiet", "30000.00", bought),
            purchase("m-kept", "30000.00", bought),
            purchase("m-kept", "100.00", add_months(bought, 11)),  # gold again, to month 23
            purchase("m-kept", "12000.00", add_months(bought, 12) + timedelta(days=3)),
        ]
    )

    async def tiers() -> dict[str, str] | None:
        rows = await stack.fetch(
            "SELECT member_id, tier, tier_valid_until FROM ledger_members"
            " WHERE member_id IN ('m-quiet', 'm-kept')"
        )
        got = {r["member_id"]: r for r in rows}
        if len(got) < 2 or got["m-quiet"]["tier"] != "member":
            return None
        return {m: r["tier"] for m, r in got.items()}

    assert await wait_until(tiers, what="the quiet member's tier to lapse") == {
        "m-quiet": "member",
        "m-kept": "gold",
    }

    async def quiet_changes() -> list[dict[str, Any]] | None:
        """The quiet member's tier changes on the ledger topic, once both are there: the
        relay publishes after the commit the read model shows, so read until they are."""
        records = await stack.read_topic(stack.topics.ledger, expect=10**6, timeout=1)
        events = [json.loads(r.value) for r in records]
        changed = [e for e in events if e["type"] == "tier_changed" and e["member_id"] == "m-quiet"]
        return changed if len(changed) >= 2 else None

    changed = await wait_until(quiet_changes, what="the quiet member's tier changes published")
    assert [(e["data"]["previous_tier"], e["data"]["tier"]) for e in changed] == [
        ("member", "gold"),
        ("gold", "member"),
    ]
    assert datetime.fromisoformat(changed[1]["occurred_at"]) == lapsed
    assert changed[1]["data"]["source_event_id"] == f"tier-expiry|m-quiet|{lapsed.isoformat()}"
    assert await stack.scalar(
        "SELECT tier_valid_until IS NULL AND activity_partition IS NOT NULL"
        " FROM rules_member_state WHERE member_id = 'm-quiet'"
    )
    # The member who is still gold (to month 23) is not touched, and its due moment is kept.
    assert await stack.scalar(
        "SELECT tier_valid_until FROM rules_member_state WHERE member_id = 'm-kept'"
    ) == add_months(add_months(bought, 11), 12)
    # The history answers for the moment before and after the lapse.
    before = await stack.get(f"/v1/members/m-quiet?as_of={_q(lapsed - timedelta(days=1))}")
    after = await stack.get(f"/v1/members/m-quiet?as_of={_q(lapsed + timedelta(days=1))}")
    assert (before.json()["tier"], after.json()["tier"]) == ("gold", "member")


def _q(at: datetime) -> str:
    return quote(at.isoformat())
