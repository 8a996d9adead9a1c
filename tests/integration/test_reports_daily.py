"""The daily report through the API: the summary's flows per day of the rule set's zone,
per store and rule, adding up to the summary of the same period and store."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import pytest

from services.ledger.reports import SHANGHAI
from tests.integration.harness import OPS_KEY, READER_KEY, REDEEMER_KEY, Stack
from tests.integration.ledger_helpers import assert_problem, give, grant, post, revoke

pytestmark = pytest.mark.integration
FLOWS = ("issued", "redeemed", "expired", "revoked", "adjusted")


def midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=SHANGHAI)


async def report(stack: Stack, name: str, **query: str | None) -> dict[str, Any]:
    params = urlencode({k: v for k, v in query.items() if v is not None})
    resp = await stack.get(f"/v1/reports/{name}?{params}", key=OPS_KEY)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def added_up(days: list[dict[str, Any]]) -> dict[str, Any]:
    """The days' flows summed, as the summary gives them for the whole period."""
    total: dict[str, Any] = dict.fromkeys(FLOWS, 0)
    by_rule: dict[str, int] = {}
    for d in days:
        for name in FLOWS:
            total[name] += d[name]
        for rule, points in d["by_rule"].items():
            by_rule[rule] = by_rule.get(rule, 0) + points
    return {**total, "by_rule": dict(sorted(by_rule.items()))}


def flows(**given: Any) -> dict[str, Any]:
    return {**dict.fromkeys(FLOWS, 0), "by_rule": {}, **given}


async def local_day(stack: Stack, sql: str) -> str:
    at = await stack.scalar(sql)
    assert at is not None, sql
    return str(at.astimezone(SHANGHAI).date())


async def test_days_stores_and_rules_add_up_to_the_summary(stack: Stack) -> None:
    today = datetime.now(UTC).astimezone(SHANGHAI).date()
    d = today - timedelta(days=5)
    # 23:30 and 00:30 in Shanghai are 15:30Z and 16:30Z: one UTC day, two local ones.
    late, early = (
        midnight(d) + timedelta(hours=23, minutes=30),
        midnight(d) + timedelta(days=1, minutes=30),
    )
    bought = grant("m-b", 1000, midnight(d) + timedelta(days=1, hours=10), store="sh-xuhui")
    await give(
        stack,
        grant("m-a", 100, late, rule="base", store="sh-jingan"),
        grant("m-a", 200, early, rule="big_ticket", store="sh-jingan"),
        grant("m-b", 400, early, rule="base", store="sh-xuhui"),
        bought,
        # Earned 400 days ago at sh-xuhui, expired about 35 days ago: inside the period.
        grant("m-c", 70, datetime.now(UTC) - timedelta(days=400), store="sh-xuhui"),
    )
    refund = revoke(
        "m-b", 250, midnight(d) + timedelta(days=2, hours=10), bought["data"]["order_id"]
    )
    await give(stack, refund)
    redeemed = await post(
        stack,
        "/v1/members/m-b/redemptions",
        {"redemption_id": "r-d1", "points": 500, "store_id": "sh-jingan"},
        key=REDEEMER_KEY,
    )
    assert redeemed.status_code == 201, redeemed.text
    adjusted = await post(
        stack,
        "/v1/adjustments",
        {"adjustment_id": "a-d1", "member_id": "m-a", "points": 50, "reason": "goodwill",
         "operator": "ops-1"},
    )  # fmt: skip
    assert adjusted.status_code == 201, adjusted.text

    # To the end of tomorrow: a run across midnight still finds today's entries inside.
    start, end = midnight(today - timedelta(days=60)), midnight(today + timedelta(days=2))
    period = {"from": start.isoformat(), "to": end.isoformat()}
    rep = await report(stack, "daily", **period)
    assert (rep["timezone"], rep["store_id"], len(rep["days"])) == ("Asia/Shanghai", None, 62)
    days = {x["day"]: x for x in rep["days"]}
    assert list(days) == [str(start.date() + timedelta(days=i)) for i in range(62)]

    first, second = days[str(d)], days[str(d + timedelta(days=1))]
    assert first == {
        "day": str(d),
        **flows(issued=100, by_rule={"base": 100}),
        "stores": {"sh-jingan": flows(issued=100, by_rule={"base": 100})},
    }
    assert second["issued"] == 200 + 400 + 1000
    assert second["by_rule"] == {"base": 1400, "big_ticket": 200}
    assert second["stores"] == {
        "sh-jingan": flows(issued=200, by_rule={"big_ticket": 200}),
        "sh-xuhui": flows(issued=1400, by_rule={"base": 1400}),
    }
    # A refund sent without a store counts in its day's total only.
    refunded = days[str(d + timedelta(days=2))]
    assert (refunded["revoked"], refunded["stores"]) == (250, {})
    # The expiry counts for the store its points were earned at, on the day they lapsed.
    lapsed = days[
        await local_day(stack, "SELECT occurred_at FROM ledger_entries WHERE kind = 'expire'")
    ]
    assert lapsed["expired"] == 70
    assert lapsed["stores"] == {"sh-xuhui": flows(expired=70)}
    # The redemption at its store; the adjustment has none.
    spent = days[
        await local_day(stack, "SELECT occurred_at FROM ledger_entries WHERE kind = 'redeem'")
    ]
    assert spent["redeemed"] == 500
    assert spent["stores"]["sh-jingan"]["redeemed"] == 500
    by_hand = days[
        await local_day(stack, "SELECT occurred_at FROM ledger_entries WHERE kind = 'adjust'")
    ]
    assert by_hand["adjusted"] == 50
    assert all(s["adjusted"] == 0 for x in rep["days"] for s in x["stores"].values())

    # The days add up to the summary of the same period, for the chain and for each store;
    # a store's report is that store's column of the chain's.
    for store in (None, "sh-jingan", "sh-xuhui"):
        daily = await report(stack, "daily", **period, store_id=store)
        summary = await report(stack, "summary", **period, store_id=store)
        assert added_up(daily["days"]) == {k: summary[k] for k in (*FLOWS, "by_rule")}
        if store is not None:
            column = [
                {"day": x["day"], **x["stores"].get(store, flows()), "stores": {}}
                for x in rep["days"]
            ]
            assert [{**x, "stores": {}} for x in daily["days"]] == column
            assert all(set(x["stores"]) <= {store} for x in daily["days"])
    assert added_up(rep["days"])["issued"] == 1700


async def test_the_daily_report_is_for_ops_and_at_most_366_days(stack: Stack) -> None:
    today = datetime.now(UTC).astimezone(SHANGHAI).date()
    year = {"from": midnight(today - timedelta(days=365)).isoformat()}
    path = f"/v1/reports/daily?{urlencode(year)}"
    for key in (READER_KEY, REDEEMER_KEY):
        assert_problem(await stack.get(path, key=key), 403)
    assert len((await stack.get(path, key=OPS_KEY)).json()["days"]) == 366
    longer = {"from": midnight(today - timedelta(days=366)).isoformat()}
    body = assert_problem(
        await stack.get(f"/v1/reports/daily?{urlencode(longer)}", key=OPS_KEY), 422
    )
    assert body["errors"][0]["field"] == "query.from"
    assert "touches 367 days in Asia/Shanghai, at most 366" in body["detail"]
    whole = await stack.get("/v1/reports/daily?from=1970-01-01T00:00:00Z", key=OPS_KEY)
    assert_problem(whole, 422)
