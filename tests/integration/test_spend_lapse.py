"""A quiet member's qualifying spend drops in the member view when an order leaves the
12-month window: the rules service's tier sweep reports it, through the ledger.

Without it the view kept the spend of the last purchase's report for good, and told a
member to spend less than the next tier takes."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import pytest

from schemas.grants import grant_id
from services.rules.engine import spend_report_id
from services.rules.pruning import add_months
from tests.integration.events import CST, purchase, sign_in
from tests.integration.harness import Stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("fast_tier_sweep")]
NOW = datetime.now(CST).replace(microsecond=0)


async def test_the_member_view_shows_the_spend_left_in_the_window(stack: Stack) -> None:
    old, recent = NOW - timedelta(days=400), NOW - timedelta(days=100)
    await stack.produce(
        [
            # 8,000 thirteen months ago, then only a sign-in: no purchase reports again.
            purchase("m-gone", "8000.00", old),
            sign_in("m-gone", NOW - timedelta(days=10)),
            # 6,000 then 3,000: the report at the second says 9,000; the 6,000 has left.
            purchase("m-some", "6000.00", old),
            purchase("m-some", "3000.00", recent),
        ]
    )

    async def views() -> dict[str, Any] | None:
        got = {m: (await stack.get(f"/v1/members/{m}")).json() for m in ("m-gone", "m-some")}
        if got["m-gone"].get("qualifying_spend") != "0.00":
            return None
        if got["m-some"].get("qualifying_spend") != "3000.00":
            return None
        return got

    got = await wait_until(views, what="the spend that left the window to leave the view")
    assert (got["m-gone"]["tier"], got["m-gone"]["next_tier"]) == (
        "member",
        {"tier": "silver", "spend_needed": "10000.00"},
    )
    assert (got["m-some"]["tier"], got["m-some"]["next_tier"]) == (
        "member",
        {"tier": "silver", "spend_needed": "7000.00"},
    )
    # Reported at the moment the orders left, under ids from the member and that moment.
    left = add_months(old, 12)
    rows = await stack.fetch(
        "SELECT member_id, occurred_at, tier, qualifying_spend, event_id"
        " FROM ledger_tier_history WHERE member_id IN ('m-gone', 'm-some')"
        " ORDER BY member_id, seq"
    )
    assert [(r["member_id"], r["occurred_at"], r["tier"], r["qualifying_spend"]) for r in rows] == [
        ("m-gone", old, "member", 8000),
        ("m-gone", left, "member", 0),
        ("m-some", old, "member", 6000),
        ("m-some", recent, "member", 9000),
        ("m-some", left, "member", 3000),
    ]
    source = spend_report_id("m-gone", left, Decimal(0))
    assert rows[1]["event_id"] == grant_id(source, "tier", "m-gone", "tier")
    # The 3,000 is due to leave a year after it was spent: the sweep waits for it.
    assert await stack.scalar(
        "SELECT tier_due_at FROM rules_member_state WHERE member_id = 'm-some'"
    ) == add_months(recent, 12)
    assert (
        await stack.scalar("SELECT tier_due_at FROM rules_member_state WHERE member_id = 'm-gone'")
        is None
    )
    # ?as_of= a day before the order left still shows it.
    before = await stack.get(f"/v1/members/m-gone?as_of={quote(str(left - timedelta(days=1)))}")
    assert before.json()["qualifying_spend"] == "8000.00"

    # No tier changed, so none is published (and the notifier tells nobody).
    records = await stack.read_topic(stack.topics.ledger, expect=10**6, timeout=1)
    events = [json.loads(r.value) for r in records]
    assert not [e for e in events if e["type"] == "tier_changed"]
