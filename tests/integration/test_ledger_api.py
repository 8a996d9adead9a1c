"""The ledger's HTTP API end to end: redemptions, adjustments, pending points, reports,
entries pages under concurrent writes, expiry, concurrency. Real broker, real Postgres, the
real ledger process; grants go straight to the grants topic (the rules service is idle)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import asyncpg
import pytest
import yaml

from services.ledger.accounting import add_months
from services.ledger.reports import SHANGHAI, next_month
from services.rules.rulebook_store import DEFAULT_RULESET, publish
from tests.integration.harness import OPS_KEY, READER_KEY, REDEEMER_KEY, Stack, wait_until
from tests.integration.ledger_helpers import (
    assert_problem,
    assert_verified,
    give,
    grant,
    member,
    post,
    revoke,
    tier_report,
)

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def fast_sweeper(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ledger process inherits the environment: sweep every second, not every minute."""
    monkeypatch.setenv("EXPIRY_SWEEP_SECONDS", "1")
    monkeypatch.setenv("EXPIRY_GRACE_SECONDS", "0")


async def ledger_events(stack: Stack, expect: int, timeout: float = 30) -> list[dict]:
    records = await stack.read_topic(stack.topics.ledger, expect, timeout)
    return [json.loads(r.value) for r in records]


async def test_redemptions_adjustments_and_reports_through_the_api(stack: Stack) -> None:
    now = datetime.now(UTC)
    await give(
        stack,
        grant("m-r", 3000, now - timedelta(days=40), rule="base", store="sh-jingan"),
        grant("m-r", 1000, now - timedelta(days=10), rule="big_ticket", store="sh-xuhui"),
        grant("m-r", 700, now - timedelta(hours=1), rule="base", pending_days=7),
        grant("m-poor", 300, now - timedelta(days=1)),
    )
    doc = await member(stack, "m-r")
    assert doc["points"]["available"] == 4000
    assert doc["points"]["pending"] == 700

    path = "/v1/members/m-r/redemptions"
    # Auth and validation errors are problem+json.
    assert_problem(await post(stack, path, {"redemption_id": "x", "points": 500}, key=None), 401)
    assert_problem(await post(stack, path, {"redemption_id": "x", "points": 500}, READER_KEY), 403)
    assert_problem(
        await post(stack, "/v1/members/nobody/redemptions", {"redemption_id": "x", "points": 500}),
        404,
    )
    assert_problem(await post(stack, path, {"redemption_id": "x", "points": 5, "cash": "1"}), 422)
    assert_problem(await post(stack, path, {"redemption_id": "x", "reward": "yacht"}), 422)
    # Under the 500-point minimum balance: 422; more than available (pending excluded): 409.
    low = assert_problem(
        await post(
            stack, "/v1/members/m-poor/redemptions", {"redemption_id": "r-low", "points": 100}
        ),
        422,
    )
    assert low["minimum"] == 500
    short = assert_problem(await post(stack, path, {"redemption_id": "r-big", "points": 4001}), 409)
    assert short["available"] == 4000
    # A refusal is the first answer to its id too (CONTRACT.md): given again.
    retried = await post(stack, path, {"redemption_id": "r-big", "points": 4001})
    assert retried.headers["idempotent-replayed"] == "true"
    assert assert_problem(retried, 409) == short

    # By points: FIFO takes the 40-day-old lot first.
    first = await post(stack, path, {"redemption_id": "r-1", "points": 1200, "store_id": "s1"})
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["points"] == 1200
    assert body["available_after"] == 2800
    assert body["cash_value"] == "12.00"
    # The same id and body: the first answer again; another body: 409.
    again = await post(stack, path, {"redemption_id": "r-1", "points": 1200, "store_id": "s1"})
    assert again.status_code == 201
    assert again.json() == body
    assert again.headers["idempotent-replayed"] == "true"
    assert_problem(await post(stack, path, {"redemption_id": "r-1", "points": 1300}), 409)
    # By catalogue reward and by cash at the member rate (100 points per CNY, rounded up).
    reward = await post(stack, path, {"redemption_id": "r-2", "reward": "face-mask"})
    assert reward.json()["points"] == 500
    cash = await post(stack, path, {"redemption_id": "r-3", "cash": "5.005"})
    assert_problem(cash, 422)  # at most two decimals
    cash = await post(stack, path, {"redemption_id": "r-3", "cash": "5.01"})
    assert cash.status_code == 201, cash.text
    assert cash.json()["points"] == 501
    assert cash.json()["cash_value"] == "5.01"
    doc = await member(stack, "m-r")
    assert doc["points"]["available"] == 4000 - 1200 - 500 - 501
    assert doc["points"]["redeemed"] == 2201
    assert doc["points"]["pending"] == 700

    # Adjustments: ops only, idempotent, journaled with reason and operator.
    adj = {
        "adjustment_id": "a-1",
        "member_id": "m-r",
        "points": -300,
        "reason": "duplicate",
        "operator": "ops-7",
    }
    assert_problem(await post(stack, "/v1/adjustments", adj, key=READER_KEY), 403)
    assert_problem(await post(stack, "/v1/adjustments", {**adj, "points": 0}), 422)
    assert_problem(await post(stack, "/v1/adjustments", {**adj, "reason": " "}), 422)
    unknown = assert_problem(
        await post(stack, "/v1/adjustments", {**adj, "member_id": "nobody"}), 404
    )
    assert '"new_member": true' in unknown["detail"]
    assert_problem(
        await post(stack, "/v1/adjustments", {**adj, "adjustment_id": "a-x", "points": -99999}), 409
    )
    made = await post(stack, "/v1/adjustments", adj)
    assert made.status_code == 201, made.text
    assert made.json()["available_after"] == 1799 - 300
    assert (await post(stack, "/v1/adjustments", adj)).json() == made.json()
    assert_problem(await post(stack, "/v1/adjustments", {**adj, "points": -301}), 409)
    plus = await post(stack, "/v1/adjustments", {**adj, "adjustment_id": "a-2", "points": 50})
    assert plus.status_code == 201
    row = (
        await stack.fetch(
            "SELECT kind, points, reason, operator FROM ledger_entries WHERE adjustment_id = 'a-1'"
        )
    )[0]
    assert dict(row) == {
        "kind": "adjust",
        "points": -300,
        "reason": "duplicate",
        "operator": "ops-7",
    }

    entries = (await stack.get("/v1/members/m-r/entries")).json()["entries"]
    assert [e["kind"] for e in entries[:5]] == ["adjust", "adjust", "redeem", "redeem", "redeem"]
    assert entries[2]["redemption_id"] == "r-3"

    # Every movement is a ledger event, through the outbox.
    events = await ledger_events(stack, expect=4 + 3 + 2)
    kinds = [e["type"] for e in events if e["member_id"] == "m-r"]
    assert kinds.count("points_redeemed") == 3
    assert kinds.count("points_adjusted") == 2
    redeemed = next(e for e in events if e["data"].get("redemption_id") == "r-1")
    assert redeemed["data"]["points"] == -1200
    assert redeemed["data"]["balance_after"] == 2800

    # Reports: ops only; period and store filters.
    assert_problem(await stack.get("/v1/reports/summary", key=READER_KEY), 403)
    assert_problem(await stack.get("/v1/reports/summary?from=yesterday", key=OPS_KEY), 422)
    rep = (await stack.get("/v1/reports/summary", key=OPS_KEY)).json()
    assert rep["issued"] == 3000 + 1000 + 700 + 300
    assert rep["redeemed"] == 2201
    assert rep["expired"] == 0
    assert rep["outstanding"] == 5000 - 2201 - 300 + 50
    assert rep["liability_cny"] == "25.49"
    assert rep["redemption_rate"] == round(2201 / 5000, 4)
    assert rep["active_members"] == 2
    assert rep["by_rule"] == {"base": 4000, "big_ticket": 1000}
    assert rep["tiers"] == {"member": 2, "silver": 0, "gold": 0, "diamond": 0}
    since = (now - timedelta(days=20)).isoformat()
    rep = (
        await stack.get(
            f"/v1/reports/summary?from={since.replace('+', '%2B')}&store_id=sh-xuhui", key=OPS_KEY
        )
    ).json()
    assert rep["issued"] == 1000
    assert rep["by_rule"] == {"big_ticket": 1000}
    assert rep["active_members"] == 1

    # A member whose only entry in the period is an expiry is not active in it.
    recent = (now - timedelta(days=60)).isoformat().replace("+", "%2B")
    before = (await stack.get(f"/v1/reports/summary?from={recent}", key=OPS_KEY)).json()
    await give(stack, grant("m-lapsed", 70, now - timedelta(days=400)))  # expired at once
    after = (await stack.get(f"/v1/reports/summary?from={recent}", key=OPS_KEY)).json()
    assert after["expired"] == before["expired"] + 70
    assert after["active_members"] == before["active_members"]

    # A member new to the ledger (registered, nothing earned yet) gets a goodwill grant
    # when ops say so; a deduction cannot make one.
    welcome = {**adj, "adjustment_id": "a-new", "member_id": "m-new", "points": 200}
    assert_problem(await post(stack, "/v1/adjustments", {**welcome, "points": -5,
                                                        "new_member": True}), 422)  # fmt: skip
    assert_problem(await post(stack, "/v1/adjustments", {**welcome, "new_member": "yes"}), 422)
    created = await post(stack, "/v1/adjustments", {**welcome, "new_member": True})
    assert created.status_code == 201, created.text
    assert (await member(stack, "m-new"))["points"]["available"] == 200
    again = await post(stack, "/v1/adjustments", {**welcome, "new_member": True})
    assert again.json() == created.json()
    assert_problem(await post(stack, "/v1/adjustments", welcome), 409)  # another request

    await assert_verified(stack.dsn)


async def test_an_id_used_for_another_member_reveals_nothing_of_it(stack: Stack) -> None:
    """Ids are global: two stores' POS counters meet. The second caller gets a bare 409,
    not the first member's request; an unknown member is a 404 whether or not the id is
    in use, so a redeemer key cannot collect other members' redemptions by trying ids."""
    now = datetime.now(UTC)
    await give(stack, grant("m-alice", 3000, now - timedelta(days=3)),
               grant("m-bob", 3000, now - timedelta(days=3)))  # fmt: skip
    alice = {"redemption_id": "r-0001", "points": 1000, "store_id": "store-of-alice"}
    made = await post(stack, "/v1/members/m-alice/redemptions", alice, key=REDEEMER_KEY)
    assert made.status_code == 201, made.text
    secrets = ("m-alice", "store-of-alice", "1000", "first_request")
    for body in [{"redemption_id": "r-0001", "points": 600, "store_id": "bj"}, alice]:
        bob = await post(stack, "/v1/members/m-bob/redemptions", body, key=REDEEMER_KEY)
        assert not [s for s in secrets if s in bob.text], bob.text
        assert "already used" in assert_problem(bob, 409)["title"]
    for rid in ["r-0001", "r-unused"]:
        nobody = await post(stack, "/v1/members/nobody/redemptions",
                            {"redemption_id": rid, "points": 600}, key=REDEEMER_KEY)  # fmt: skip
        assert_problem(nobody, 404)
    # The same member's own first request is still shown: the POS sees what it sent.
    own = await post(stack, "/v1/members/m-alice/redemptions", {**alice, "points": 900},
                     key=REDEEMER_KEY)  # fmt: skip
    assert assert_problem(own, 409)["first_request"]["points"] == 1000

    adj = {"adjustment_id": "adj-1", "member_id": "m-alice", "points": 100,
           "reason": "complaint 4411: refund agreed", "operator": "ops-li"}  # fmt: skip
    assert (await post(stack, "/v1/adjustments", adj)).status_code == 201
    for other in [{**adj, "member_id": "m-bob", "reason": "x", "operator": "ops-wang"},
                  {**adj, "member_id": "m-new", "reason": "x", "new_member": True}]:  # fmt: skip
        refused = await post(stack, "/v1/adjustments", other)
        assert_problem(refused, 409)
        assert not [s for s in ("m-alice", "4411", "ops-li") if s in refused.text], refused.text
    assert_problem(await post(stack, "/v1/adjustments", {**adj, "member_id": "nobody"}), 404)
    assert (await member(stack, "m-bob"))["points"]["available"] == 3000
    assert_problem(await stack.get("/v1/members/m-new"), 404)  # the refusal rolled back
    own_adj = await post(stack, "/v1/adjustments", {**adj, "points": 200})
    assert assert_problem(own_adj, 409)["first_request"]["reason"] == adj["reason"]
    await assert_verified(stack.dsn)


async def test_member_as_of_a_past_moment(stack: Stack) -> None:
    """`?as_of=` answers with what stood then: points, tier and next tier of that moment."""
    t0 = datetime.now(UTC) - timedelta(days=30)
    until_silver, until_gold = t0 + timedelta(days=366), t0 + timedelta(days=375)
    await give(stack, grant("m-asof", 1000, t0), grant("m-asof", 500, t0 + timedelta(days=10)))
    await stack.produce(
        [
            tier_report(
                "m-asof",
                t0 + timedelta(days=1),
                "member",
                "silver",
                "12000.00",
                ("gold", "30000.00"),
                until_silver,
            ),
            tier_report(
                "m-asof",
                t0 + timedelta(days=10),
                "silver",
                "gold",
                "31000.00",
                ("diamond", "100000.00"),
                until_gold,
            ),
        ],
        topic=stack.topics.grants,
    )
    await wait_until(
        lambda: stack.scalar("SELECT tier = 'gold' FROM ledger_members WHERE member_id = 'm-asof'"),
        what="tier reports projected",
    )

    async def as_of(at: datetime) -> dict:
        resp = await stack.get(f"/v1/members/m-asof?as_of={quote(at.isoformat())}")
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    assert_problem(
        await stack.get(f"/v1/members/m-asof?as_of={quote((t0 - timedelta(hours=1)).isoformat())}"),
        404,
    )
    first = await as_of(t0 + timedelta(hours=1))
    # No tier report yet: the rule set's lowest tier above member, not null ("at the top").
    assert (first["tier"], first["qualifying_spend"], first["next_tier"]) == (
        "member",
        "0.00",
        {"tier": "silver", "spend_needed": "10000.00"},
    )
    assert first["points"]["available"] == 1000
    silver = await as_of(t0 + timedelta(days=5))
    assert (silver["tier"], silver["qualifying_spend"]) == ("silver", "12000.00")
    assert silver["next_tier"] == {"tier": "gold", "spend_needed": "18000.00"}
    assert datetime.fromisoformat(silver["tier_valid_until"]) == until_silver
    now = await member(stack, "m-asof")
    assert now["next_tier"] == {"tier": "diamond", "spend_needed": "69000.00"}
    assert now["points"]["available"] == 1500
    # A history row written before the next-tier columns existed: the same tier's next
    # tier now, as `ledger rebuild` does.
    await stack.fetch(
        "INSERT INTO ledger_tier_history (event_id, member_id, occurred_at, tier,"
        " previous_tier, qualifying_spend, tier_valid_until)"
        " VALUES ('old-row', 'm-asof', $1, 'gold', 'gold', 31000, $2)",
        t0 + timedelta(days=20),
        until_gold,
    )
    old = await as_of(t0 + timedelta(days=21))
    assert old["next_tier"] == {"tier": "diamond", "spend_needed": "69000.00"}


async def test_a_member_without_a_tier_report_has_the_lowest_next_tier(stack: Stack) -> None:
    """Reviews only, no purchase: no tier report, so the view's next tier is the rule
    set's lowest tier above member with all of its spend needed, now and ?as_of=."""
    t0 = datetime.now(UTC) - timedelta(days=3)
    await give(stack, grant("m-reviews", 50, t0, rule="featured_review"))
    silver = {"tier": "silver", "spend_needed": "10000.00"}
    now = await member(stack, "m-reviews")
    assert (now["tier"], now["qualifying_spend"], now["next_tier"]) == ("member", "0.00", silver)
    at = quote((t0 + timedelta(days=1)).isoformat())
    resp = await stack.get(f"/v1/members/m-reviews?as_of={at}")
    assert resp.status_code == 200, resp.text
    assert resp.json()["next_tier"] == silver


async def test_the_ledger_follows_the_published_rule_set(stack: Stack) -> None:
    """Lot lifetime, cash rates, minimum balance and catalogue are the rule book's data: a
    clinic publishes other numbers and the ledger keeps them, without a code change."""
    now = datetime.now(UTC)
    rules = yaml.safe_load(DEFAULT_RULESET.read_text(encoding="utf-8"))
    rules.update(version="clinic-b", effective_from=now - timedelta(days=1))
    rules["expiry"]["lot_lifetime_months"] = 6
    rules["redemption"] = {
        "min_balance": 100,
        "points_per_cny": {"member": 50, "silver": 50, "gold": 40, "diamond": 30},
        "catalogue": {"spa-day": 700},
    }
    conn = await asyncpg.connect(stack.dsn)
    try:
        await publish(conn, yaml.safe_dump(rules), "test")
    finally:
        await conn.close()

    priced = grant("m-b", 1500, now - timedelta(hours=1))
    priced["data"]["ruleset_version"] = "clinic-b"
    foreign = grant("m-b", 100, now - timedelta(hours=1))  # "test-v1": not in the book
    await give(stack, priced, foreign)
    lifetimes = dict(
        await stack.fetch(
            "SELECT lot_id, expires_at FROM ledger_lots WHERE member_id = 'm-b'",
        )
    )
    assert lifetimes[priced["event_id"]] == add_months(now - timedelta(hours=1), 6)
    assert lifetimes[foreign["event_id"]] == add_months(now - timedelta(hours=1), 12)

    path = "/v1/members/m-b/redemptions"
    cash = await post(stack, path, {"redemption_id": "rb-1", "cash": "10.00"})
    assert cash.status_code == 201, cash.text
    assert cash.json()["points"] == 500  # 50 points per CNY for a member, not 100
    spa = await post(stack, path, {"redemption_id": "rb-2", "reward": "spa-day"})
    assert spa.status_code == 201, spa.text
    assert spa.json()["points"] == 700
    unknown = assert_problem(
        await post(stack, path, {"redemption_id": "rb-3", "reward": "face-mask"}), 422
    )
    assert unknown["catalogue"] == ["spa-day"]
    # 400 left: below the default minimum of 500, above this clinic's 100.
    small = await post(stack, path, {"redemption_id": "rb-4", "points": 150})
    assert small.status_code == 201, small.text
    adjusted = await post(
        stack,
        "/v1/adjustments",
        {
            "adjustment_id": "adj-b",
            "member_id": "m-b",
            "points": 300,
            "reason": "goodwill",
            "operator": "ops-1",
        },
    )
    assert adjusted.status_code == 201, adjusted.text
    expires = datetime.fromisoformat(adjusted.json()["expires_at"])
    assert abs(expires - add_months(now, 6)) < timedelta(minutes=5)


async def test_the_summary_counts_refunds_and_the_points_expiring_next_month(
    stack: Stack,
) -> None:
    now = datetime.now(UTC)
    month, month_after = next_month(now, SHANGHAI)
    # Lots live 12 months: earned a year before a moment of next month, they expire then.
    inside = grant("m-x", 400, add_months(month + timedelta(days=2), -12))
    last_moment = grant("m-x", 50, add_months(month_after - timedelta(minutes=1), -12))
    later = grant("m-x", 300, add_months(month_after + timedelta(days=1), -12))
    bought = grant("m-y", 1000, now - timedelta(days=3))
    await give(stack, inside, last_moment, later, bought)
    await give(stack, revoke("m-y", 250, now - timedelta(days=1), bought["data"]["order_id"]))

    rep = (await stack.get("/v1/reports/summary", key=OPS_KEY)).json()
    assert rep["expiring_next_month"] == {"month": month.strftime("%Y-%m"), "points": 450}
    assert rep["revoked"] == 250
    assert rep["issued"] == 400 + 50 + 300 + 1000
    assert rep["outstanding"] == (
        rep["issued"] - rep["revoked"] - rep["redeemed"] - rep["expired"] + rep["adjusted"]
    )


async def test_fifty_concurrent_redemptions_never_overspend(stack: Stack) -> None:
    now = datetime.now(UTC)
    await give(stack, *(grant("m-c", 1000, now - timedelta(days=d)) for d in range(1, 11)))
    # 10,000 points; 50 requests of 700 can pay at most 14 (9,800), leaving 200.
    responses = await asyncio.gather(
        *(
            post(stack, "/v1/members/m-c/redemptions", {"redemption_id": f"c-{i}", "points": 700})
            for i in range(50)
        )
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(201) == 14, statuses
    refused = [r for r in responses if r.status_code != 201]
    # Once the balance is 400 (< 500) the refusal is the minimum, before that the shortfall.
    assert {r.status_code for r in refused} <= {409, 422}
    doc = await member(stack, "m-c")
    assert doc["points"]["available"] == 200
    assert doc["points"]["redeemed"] == 9800
    afters = sorted(r.json()["available_after"] for r in responses if r.status_code == 201)
    assert afters == [200 + 700 * k for k in range(14)]
    assert await stack.scalar("SELECT count(*) FROM ledger_redemptions WHERE status = 201") == 14
    # Each refusal is kept as the first answer to its id (CONTRACT.md): retried once the
    # balance would pay it, it is refused again, not redeemed.
    topped = await post(stack, "/v1/adjustments", {"adjustment_id": "a-c", "member_id": "m-c",
                        "points": 5000, "reason": "test", "operator": "ops-7"})  # fmt: skip
    assert topped.status_code == 201, topped.text
    i = next(i for i, r in enumerate(responses) if r.status_code != 201)
    again = await post(stack, "/v1/members/m-c/redemptions",
                       {"redemption_id": f"c-{i}", "points": 700})  # fmt: skip
    assert again.status_code == responses[i].status_code
    assert again.json() == responses[i].json()
    assert again.headers["idempotent-replayed"] == "true"
    assert (await member(stack, "m-c"))["points"]["redeemed"] == 9800
    await assert_verified(stack.dsn)


async def test_entries_pages_are_stable_under_concurrent_writes(stack: Stack) -> None:
    now = datetime.now(UTC)
    await give(stack, *(grant("m-p", 100 + i, now - timedelta(days=30 - i)) for i in range(25)))
    first = (await stack.get("/v1/members/m-p/entries?limit=7")).json()
    seen = [e["entry_id"] for e in first["entries"]]
    cursor = first["next_cursor"]

    async def keep_writing() -> None:
        for i in range(15):
            resp = await post(
                stack,
                "/v1/adjustments",
                {
                    "adjustment_id": f"p-{i}",
                    "member_id": "m-p",
                    "points": 1 + i,
                    "reason": "paging test",
                    "operator": "ops-1",
                },
            )
            assert resp.status_code == 201

    writer = asyncio.create_task(keep_writing())
    while cursor:
        page = (await stack.get(f"/v1/members/m-p/entries?limit=7&cursor={cursor}")).json()
        seen.extend(e["entry_id"] for e in page["entries"])
        cursor = page["next_cursor"]
    await writer
    # Exactly the 25 entries that existed at the first page, each once, newest first.
    assert len(seen) == len(set(seen)) == 25
    old = [
        r["entry_id"]
        for r in await stack.fetch(
            "SELECT entry_id FROM ledger_entries WHERE member_id = 'm-p' AND adjustment_id IS NULL"
            " ORDER BY seq DESC"
        )
    ]
    assert seen == old
    assert_problem(await stack.get("/v1/members/m-p/entries?cursor=bogus!"), 422)
    await assert_verified(stack.dsn)


async def test_member_ids_holding_a_slash_or_percent_are_served(stack: Stack) -> None:
    """The server decodes %2F before routing: `wx%2FoAbC%2B9` was a 404, `m-1%2Fentries`
    was answered with m-1's entries, and such members could not redeem what they earned."""
    day = datetime.now(UTC) - timedelta(days=1)
    odd = {"wx/oAbC+9": 3000, "m-1/entries": 2000, "a%b": 1500, "会员/张三": 1200, "ü": 900}
    await give(stack, grant("m-1", 1000, day), *(grant(m, p, day) for m, p in odd.items()))
    for name, points in odd.items():
        path = f"/v1/members/{quote(name, safe='')}"
        doc = (await stack.get(path)).json()
        assert (doc["member_id"], doc["points"]["available"]) == (name, points)
        entries = (await stack.get(f"{path}/entries")).json()["entries"]
        assert [e["points"] for e in entries] == [points]
        made = await post(stack, f"{path}/redemptions", {"redemption_id": name, "points": 500})
        assert made.status_code == 201, made.text
        assert made.json()["available_after"] == points - 500
    # The same path with the '/' sent as is: m-1's entries, as before.
    mine = (await stack.get("/v1/members/m-1/entries")).json()["entries"]
    assert [e["points"] for e in mine] == [1000]
    assert (await member(stack, "m-1"))["points"]["available"] == 1000
    assert_problem(await stack.get("/v1/members/wx%2FoAbC%2B9", key="wrong"), 401)


async def test_entries_of_an_unknown_member_are_a_404_as_its_view(stack: Stack) -> None:
    """They were a 200 with an empty page; a member known from a tier report alone (no
    entries) has a record, and an empty page."""
    now = datetime.now(UTC)
    report = tier_report("m-tier-only", now, "member", "silver", "6000.00", None, None)
    await stack.produce([report], topic=stack.topics.grants)
    await wait_until(
        lambda: stack.scalar(
            "SELECT tier = 'silver' FROM ledger_members WHERE member_id = 'm-tier-only'"
        ),
        what="tier report recorded",
    )
    known = await stack.get("/v1/members/m-tier-only/entries")
    assert known.status_code == 200, known.text
    assert known.json() == {"entries": [], "next_cursor": None}
    for path in ("/v1/members/nobody", "/v1/members/nobody/entries"):
        assert assert_problem(await stack.get(path), 404)["title"] == "Member not found"


async def test_late_grants_expiry_sweeps_and_warnings(stack: Stack) -> None:
    now = datetime.now(UTC)
    late = grant("m-e", 400, add_months(now, -12) - timedelta(days=3), rule="late")
    soon = grant("m-e", 900, add_months(now, -12) + timedelta(seconds=4), rule="soon")
    week = grant("m-e", 800, add_months(now, -12) + timedelta(days=5), rule="week")
    month = grant("m-e", 700, add_months(now, -12) + timedelta(days=20), rule="month")
    fresh = grant("m-e", 600, now - timedelta(days=1), rule="fresh")
    await give(stack, late, soon, week, month, fresh)
    # The late grant is journaled as earned and, in the same batch, expired.
    late_rows = await stack.fetch(
        "SELECT kind, points FROM ledger_entries WHERE source_event_id = $1 ORDER BY seq",
        late["data"]["source_event_id"],
    )
    assert [(r["kind"], r["points"]) for r in late_rows] == [("earn", 400), ("expire", -400)]

    # The `soon` lot lapses seconds later: the sweeper journals it.
    async def swept() -> bool:
        return bool(
            await stack.scalar(
                "SELECT count(*) = 1 FROM ledger_entries WHERE kind = 'expire' AND rule_id = 'soon'"
            )
        )

    await wait_until(swept, timeout=30, what="the sweeper to expire the lapsed lot")
    doc = await member(stack, "m-e")
    assert doc["points"]["available"] == 800 + 700 + 600
    assert doc["points"]["expired"] == 400 + 900
    assert [x["points"] for x in doc["expiring"]] == [800, 700]

    # Warnings: the 5-day lot gets the 7-day warning only, the 20-day lot the 30-day one,
    # each recorded so that later sweeps never send them again. (The `soon` lot may have
    # been warned in the seconds before it lapsed; it is left out of the comparison.)
    ours = [week["event_id"], month["event_id"]]

    async def warned() -> list:
        rows = await stack.fetch(
            "SELECT lot_id, threshold_days FROM ledger_expiry_warnings"
            " WHERE lot_id = ANY($1::text[])",
            ours,
        )
        return rows if len(rows) == 3 else []

    rows = await wait_until(warned, timeout=30, what="expiry warnings recorded")
    assert sorted((r["lot_id"], r["threshold_days"]) for r in rows) == sorted(
        [(week["event_id"], 7), (week["event_id"], 30), (month["event_id"], 30)]
    )

    events = await ledger_events(stack, expect=5 + 2 + 2)
    expiring = [
        e
        for e in events
        if e["type"] == "points_expiring" and e["data"]["rule_id"] in ("week", "month")
    ]
    assert sorted((e["data"]["rule_id"], e["data"]["points"]) for e in expiring) == [
        ("month", 700),
        ("week", 800),
    ]
    assert all(e["data"]["expires_at"] for e in expiring)
    expired = [e for e in events if e["type"] == "points_expired"]
    assert sorted(e["data"]["points"] for e in expired) == [-900, -400]
    # Each says what caused it, the grant's rule and rule-set version (CONTRACT.md).
    assert {e["data"]["ruleset_version"] for e in expiring + expired} == {"test-v1"}
    # Later sweeps (one a second) send nothing again: wait for two more sweeps to pass.
    count = await stack.scalar("SELECT count(*) FROM ledger_expiry_warnings")
    marker = grant("m-e2", 100, add_months(now, -12) + timedelta(days=6), rule="marker")
    await give(stack, marker)
    await wait_until(
        lambda: stack.scalar(
            "SELECT count(*) > 0 FROM ledger_expiry_warnings WHERE lot_id = $1", marker["event_id"]
        ),
        timeout=30,
        what="a later sweep",
    )
    assert await stack.scalar("SELECT count(*) FROM ledger_expiry_warnings") == count + 2
    again = await ledger_events(stack, expect=100, timeout=3)
    warned_ids = [e["event_id"] for e in again if e["type"] == "points_expiring"]
    assert len(warned_ids) == len(set(warned_ids))
    await assert_verified(stack.dsn)
