"""`ledgerctl rules` against a real Postgres: publish/list, held review, backtesting."""

from __future__ import annotations

import csv
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bench.sim_speed import synthetic_history
from schemas.activity import activity_adapter
from schemas.grants import parse_grant
from services.common.migrations import apply_migrations
from services.rules.rulebook_store import RULESETS_DIR, read_book
from services.rules.ruleset import load_ruleset
from services.rules.simulate import Simulation
from tests.integration.events import CST
from tests.integration.rules_helpers import Ran, ctl, default_with

pytestmark = pytest.mark.integration
RFC3339 = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)"
FUTURE = datetime.now(CST).replace(microsecond=0) + timedelta(days=30)


@pytest.fixture
async def db(fresh_database: str) -> str:
    apply_migrations(fresh_database)
    return fresh_database


async def _q(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def test_publish_keeps_every_version_and_list_shows_them(db: str, tmp_path: Path) -> None:
    v2 = default_with(tmp_path, "v2.yaml", version="2027.1", effective_from=FUTURE.isoformat(),
                      purchase={"points_per_cny": 2})  # fmt: skip
    ran = await ctl(db, "publish", str(v2), "--by", "ops-anna")
    assert ran.code == 0, ran.stderr
    assert "published rule set 2027.1" in ran.stdout
    listed = await ctl(db, "list", "--json")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    # The default is seeded first, so events before 2027.1's effective_from keep it.
    assert [r["version"] for r in rows] == ["2026.1", "2027.1"]
    assert rows[1]["published_by"] == "ops-anna"
    assert datetime.fromisoformat(rows[1]["effective_from"]) == FUTURE
    assert rows[1]["published_at"]
    table = await ctl(db, "list")
    assert "2027.1" in table.stdout
    assert "effective_from" in table.stdout
    # Times are RFC 3339 ("T", an offset), not str(datetime)'s "2019-12-31 16:00:00+00:00".
    for r in rows:
        for key in ("effective_from", "published_at"):
            assert re.fullmatch(RFC3339, r[key]), r
    # Re-publishing the same file is a no-op that says so; other content under the same
    # version is refused.
    same = await ctl(db, "publish", str(v2))
    assert same.code == 0, same.stderr
    assert "rule set 2027.1 is already published (unchanged" in same.stdout
    assert "published rule set" not in same.stdout
    # The seeded default again: unchanged, though its effective_from is long past.
    seed = await ctl(db, "publish", str(RULESETS_DIR / "default.yaml"))
    assert (seed.code, seed.stderr) == (0, "")
    assert "already published (unchanged" in seed.stdout
    v2b = default_with(tmp_path, "v2b.yaml", version="2027.1", effective_from=FUTURE.isoformat())
    again = await ctl(db, "publish", str(v2b))
    assert again.code != 0
    assert "already published" in again.stderr
    assert len(await _q(db, "SELECT 1 FROM rules_rulesets")) == 2


@pytest.mark.parametrize(
    ("changes", "field", "reason"),
    [
        ({"purchase": {"points_per_cny": -1}}, "purchase.points_per_cny", "greater than or equal"),
        ({"timezone": "Mars/Olympus"}, "timezone", "unknown time zone"),
        ({"share": {"likez": 3}}, "share.likez", "Extra inputs are not permitted"),
        ({"expiry": {"warn_days_before": [14]}}, "expiry.warn_days_before", "not supported yet"),
    ],
)
async def test_a_wrong_file_is_refused_naming_field_and_reason_and_nothing_is_stored(
    db: str, tmp_path: Path, changes: dict[str, object], field: str, reason: str
) -> None:
    bad = default_with(tmp_path, "bad.yaml", version="bad.1",
                       effective_from=FUTURE.isoformat(), **changes)  # fmt: skip
    ran = await ctl(db, "publish", str(bad))
    assert ran.code == 2
    assert field in ran.stderr, ran.stderr
    assert reason in ran.stderr, ran.stderr
    assert "bad.yaml" in ran.stderr
    assert await _q(db, "SELECT 1 FROM rules_rulesets WHERE version = 'bad.1'") == []


async def test_two_versions_from_one_moment_are_refused(db: str, tmp_path: Path) -> None:
    # Which of two versions starting together is in force would depend on row order.
    first = default_with(tmp_path, "a.yaml", version="a.1", effective_from=FUTURE.isoformat())
    assert (await ctl(db, "publish", str(first))).code == 0
    same_instant = FUTURE.astimezone(UTC).isoformat()  # another offset, the same moment
    second = default_with(tmp_path, "b.yaml", version="b.1", effective_from=same_instant)
    ran = await ctl(db, "publish", str(second))
    assert ran.code == 2
    assert "'a.1' already takes effect at" in ran.stderr, ran.stderr
    assert await _q(db, "SELECT 1 FROM rules_rulesets WHERE version = 'b.1'") == []


async def test_effective_from_in_the_past_needs_allow_past(db: str, tmp_path: Path) -> None:
    past = default_with(tmp_path, "past.yaml", version="past.1",
                        effective_from="2021-01-01T00:00:00+08:00")  # fmt: skip
    ran = await ctl(db, "publish", str(past))
    assert ran.code == 2
    assert "in the past" in ran.stderr
    assert (await ctl(db, "publish", str(past), "--allow-past")).code == 0


async def test_effective_from_before_activity_already_received_needs_allow_past(
    db: str, tmp_path: Path
) -> None:
    """A till whose clock runs fast sent a purchase dated after a version's start: it was
    paid under the version in force, and a replay would price it under the new one."""
    ahead = FUTURE + timedelta(days=10)
    items = [{"project_code": "hydrafacial", "amount": "100"}]
    bought = {"order_id": "o-1", "amount": "100", "items": items}
    earlier = ahead - timedelta(days=1)
    await _record(db, [_event("purchase", "m-fut", ahead, bought),
                       _event("purchase", "m-fut2", earlier, bought)])  # fmt: skip
    x5 = default_with(tmp_path, "x5.yaml", version="x5.1", effective_from=FUTURE.isoformat(),
                      purchase={"points_per_cny": 5})  # fmt: skip
    ran = await ctl(db, "publish", str(x5))
    assert ran.code == 2, ran.stdout + ran.stderr
    assert "Traceback" not in ran.stderr
    assert "before activity already received: 2 event(s) at or after it" in ran.stderr
    assert f"the latest at {ahead.isoformat()}" in ran.stderr, ran.stderr
    assert await _q(db, "SELECT 1 FROM rules_rulesets WHERE version = 'x5.1'") == []
    # After the latest received activity it is accepted; so is the earlier time, knowingly.
    later = default_with(tmp_path, "later.yaml", version="later.1",
                         effective_from=(ahead + timedelta(seconds=1)).isoformat())  # fmt: skip
    assert (await ctl(db, "publish", str(later))).code == 0
    assert (await ctl(db, "publish", str(x5), "--allow-past")).code == 0


async def test_simulate_at_the_edges_of_the_calendar_is_a_report_not_a_traceback(
    db: str, tmp_path: Path
) -> None:
    """The widest period the options accept (year 1 to year 9999, in UTC)."""
    ran = await ctl(db, "simulate", "--ruleset", str(RULESETS_DIR / "default.yaml"),
                    "--from", "0001-01-01T08:00:00+08:00", "--to", "9999-12-31T13:00:00-10:00",
                    "--output", str(tmp_path / "all.csv"))  # fmt: skip
    assert ran.code == 0, ran.stdout + ran.stderr
    assert (tmp_path / "all.csv").exists()


def _review(member: str, at: datetime, n: int) -> dict[str, object]:
    return {"event_id": f"rev-{member}-{n}", "type": "review", "occurred_at": at.isoformat(),
            "member_id": member, "store_id": "sh-jingan",
            "data": {"review_id": f"r-{member}-{n}", "rating": 5, "featured": True}}  # fmt: skip


async def _hold(dsn: str, event: dict[str, object], reason: str = "burst") -> None:
    await _q(
        dsn,
        "INSERT INTO rules_held (event_id, member_id, type, occurred_at, payload, reason)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        event["event_id"], event["member_id"], event["type"],
        datetime.fromisoformat(str(event["occurred_at"])), json.dumps(event).encode(), reason,
    )  # fmt: skip


async def test_held_release_pays_through_the_outbox_and_reject_never_pays(db: str) -> None:
    at = datetime(2026, 5, 1, 10, tzinfo=CST)
    first, second = _review("m-h", at, 1), _review("m-h", at, 2)
    await _hold(db, first)
    await _hold(db, second)
    listed = await ctl(db, "held", "list", "--json")
    assert {json.loads(x)["event_id"] for x in listed.stdout.splitlines()} == {
        first["event_id"],
        second["event_id"],
    }
    ran = await ctl(db, "held", "release", str(first["event_id"]), "--by", "ops-li",
                    env={"LOYALTY_TOPIC_PREFIX": "tx."})  # fmt: skip
    assert ran.code == 0, ran.stderr
    assert "100 points" in ran.stdout  # a featured review: 50 x 2
    rows = await _q(db, "SELECT service, topic, key, payload FROM outbox")
    assert [(r["service"], r["topic"], r["key"]) for r in rows] == [
        ("rules", "tx.loyalty.grants.v1", "m-h")
    ]
    grant = parse_grant(rows[0]["payload"])
    assert grant.type == "points_granted"
    assert (grant.data.rule_id, grant.data.points) == ("featured_review", 100)
    assert grant.data.source_event_id == first["event_id"]
    assert grant.data.ruleset_version == "2026.1"
    state = await _q(db, "SELECT state FROM rules_member_state WHERE member_id = 'm-h'")
    assert state
    assert "r-m-h-1" in json.dumps(state[0]["state"])
    again = await ctl(db, "held", "release", str(first["event_id"]))
    assert again.code != 0
    assert "already released" in again.stderr
    assert (await ctl(db, "held", "reject", str(second["event_id"]))).code == 0
    assert (await ctl(db, "held", "release", str(second["event_id"]))).code != 0
    assert len(await _q(db, "SELECT 1 FROM outbox")) == 1
    statuses = await _q(db, "SELECT event_id, status, decided_by FROM rules_held ORDER BY 1")
    assert next((r["status"], r["decided_by"]) for r in statuses) == ("released", "ops-li")
    assert statuses[1]["status"] == "rejected"
    assert (await ctl(db, "held", "release", "nope")).code != 0


async def test_held_list_says_when_there_are_more_than_its_limit(db: str) -> None:
    at = datetime(2026, 5, 1, 10, tzinfo=CST)
    for n in range(3):
        await _hold(db, _review("m-l", at, n))
    two = await ctl(db, "held", "list", "--json", "--limit", "2")
    assert two.code == 0, two.stderr
    assert len(two.stdout.splitlines()) == 2
    assert "more held events than shown: --limit 2 (oldest first)" in two.stderr
    three = await ctl(db, "held", "list", "--limit", "3")
    assert (three.code, three.stderr) == (0, "")
    assert "rev-m-l-2" in three.stdout


async def _record(dsn: str, events: list[dict[str, object]]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.copy_records_to_table(
            "rules_activity",
            records=[
                (
                    e["event_id"],
                    e["member_id"],
                    e["type"],
                    datetime.fromisoformat(str(e["occurred_at"])),
                    "t",
                    0,
                    i,
                    json.dumps(e).encode(),
                )
                for i, e in enumerate(events)
            ],
            columns=[
                "event_id",
                "member_id",
                "type",
                "occurred_at",
                "topic",
                "partition",
                "offset",
                "payload",
            ],
        )
    finally:
        await conn.close()


async def test_simulate_reports_in_force_vs_candidate_without_touching_live_state(
    db: str, tmp_path: Path
) -> None:
    start = datetime(2026, 1, 1, 9, tzinfo=CST)
    events = list(synthetic_history(3000, members=200, seed=5, start=start))
    await _record(db, events)
    t1, t2 = datetime(2026, 2, 1, tzinfo=CST), datetime(2026, 3, 1, tzinfo=CST)
    candidate = RULESETS_DIR / "reference-004.yaml"
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    ran = await ctl(db, "simulate", "--ruleset", str(candidate), "--from", t1.isoformat(),
                    "--to", t2.isoformat(), "--output", str(out_json))  # fmt: skip
    assert ran.code == 0, ran.stderr
    assert "TOTAL" in ran.stdout
    assert "base" in ran.stdout
    report = json.loads(out_json.read_text())

    # The oracle: the pure Simulation over the same events, warm-up included.
    conn = await asyncpg.connect(db)
    try:
        book = await read_book(conn)
    finally:
        await conn.close()
    sim = Simulation(book, load_ruleset(candidate))
    parsed = sorted((activity_adapter.validate_python(e) for e in events),
                    key=lambda e: e.occurred_at)  # fmt: skip
    for e in parsed:
        if e.occurred_at < t1:
            sim.warm_up(e)
        elif e.occurred_at < t2:
            sim.feed(e)
    expected = sim.report()
    assert report["events"] == expected.events > 0
    assert report["warmup_events"] == expected.warmup_events > 0
    assert report["total"]["in_force"] == expected.total.in_force
    assert report["total"]["candidate"] == expected.total.candidate
    assert report["total"]["difference"] == expected.total.candidate - expected.total.in_force
    assert report["total"]["cash_difference"] == str(expected.total.cash_difference)
    assert report["total"]["members_affected"] == expected.total.members_affected > 0
    by_rule = {r["rule_id"]: r for r in report["rules"]}
    # reference-004 pays no first-purchase bonus; it only takes back bonuses of warm-up
    # orders refunded in the period (a refund is priced by the rules of its purchase).
    assert by_rule["first_purchase"]["candidate"] <= 0 < by_rule["first_purchase"]["in_force"]
    assert sum(r["difference"] for r in report["rules"]) == report["total"]["difference"]
    assert report["versions_in_force"] == ["2026.1"]

    ran = await ctl(db, "simulate", "--ruleset", str(candidate), "--from", t1.isoformat(),
                    "--to", t2.isoformat(), "--output", str(out_csv), "--no-warmup")  # fmt: skip
    assert ran.code == 0, ran.stderr
    rows = list(csv.DictReader(out_csv.open()))
    assert rows[-1]["rule_id"] == "TOTAL"
    assert {r["rule_id"] for r in rows[:-1]} == set(by_rule)
    # Without warm-up every member starts empty: more first purchases in force.
    cold = {r["rule_id"]: r for r in rows}
    assert int(cold["first_purchase"]["in_force"]) > by_rule["first_purchase"]["in_force"]
    # Nothing live was written.
    assert await _q(db, "SELECT 1 FROM rules_member_state") == []
    assert await _q(db, "SELECT 1 FROM outbox") == []


async def _simulate_default(
    db: str, tmp_path: Path, start: datetime, end: datetime, *flags: str
) -> tuple[Ran, dict[str, Any]]:
    """`rules simulate` of the default rule set over [start, end), its JSON report."""
    out = tmp_path / "r.json"
    ran = await ctl(db, "simulate", "--ruleset", str(RULESETS_DIR / "default.yaml"),
                    "--from", start.isoformat(), "--to", end.isoformat(),
                    "--output", str(out), *flags)  # fmt: skip
    assert ran.code == 0, ran.stderr
    return ran, json.loads(out.read_text())


def _event(type_: str, member: str, at: datetime, data: dict[str, object]) -> dict[str, object]:
    """An activity event as `_record` stores it, its id from its type and member."""
    return {"event_id": f"{type_}-{member}", "type": type_, "occurred_at": at.isoformat(),
            "member_id": member, "data": data}  # fmt: skip


async def test_simulate_counts_a_referrer_set_at_the_purchases_very_moment(
    db: str, tmp_path: Path
) -> None:
    """The live service pays the indirect bonus when the referrer's own referrer was set
    at or before the purchase, whichever it saw first; the backtest read a tie in
    (partition, offset) order, and the purchase recorded first paid nothing."""
    t0 = datetime(2026, 3, 2, 10, tzinfo=CST)
    t1 = t0 + timedelta(days=1)

    await _record(db, [
        _event("member_registered", "m-b", t0, {"referrer_id": "m-a"}),
        _event("purchase", "m-b", t1, {"order_id": "ob", "amount": "100", "items": []}),
        _event("member_registered", "m-a", t1, {"referrer_id": "m-c"}),
    ])  # fmt: skip
    _, report = await _simulate_default(db, tmp_path, t0, t1 + timedelta(days=1), "--no-warmup")
    by_rule = {r["rule_id"]: r for r in report["rules"]}
    assert by_rule["referral_indirect"]["in_force"] == 50


async def test_simulate_over_a_period_with_no_payouts_prints_its_table(
    db: str, tmp_path: Path
) -> None:
    """An empty period (or one of sign-ups only) failed with an IndexError in the table."""
    t0 = datetime(2026, 3, 2, 10, tzinfo=CST)
    signed_up = {"event_id": "r-1", "type": "member_registered", "occurred_at": t0.isoformat(),
                 "member_id": "m-1", "data": {}}  # fmt: skip
    await _record(db, [signed_up])
    ran, report = await _simulate_default(db, tmp_path, t0, t0 + timedelta(days=1))
    assert "TOTAL" in ran.stdout
    assert report["total"]["difference"] == 0


async def test_simulate_refuses_a_candidate_publish_would_refuse(db: str, tmp_path: Path) -> None:
    """A candidate without a gold cash rate valued gold members' points at 0 CNY, silently."""
    candidate = default_with(tmp_path, "c.yaml", version="c-1",
                             redemption={"points_per_cny": {"member": 100}})  # fmt: skip
    t0 = datetime(2026, 3, 2, 10, tzinfo=CST)
    ran = await ctl(db, "simulate", "--ruleset", str(candidate), "--from", t0.isoformat(),
                    "--to", (t0 + timedelta(days=1)).isoformat())  # fmt: skip
    assert ran.code == 2
    assert "refused" in ran.stderr
    assert "missing tiers ['silver', 'gold', 'diamond']" in " ".join(ran.stderr.split())


async def test_a_members_own_late_sign_up_at_its_purchases_instant_pays_no_referral(
    db: str, tmp_path: Path
) -> None:
    """m-b's purchase and m-b's own sign-up (naming m-a) share an instant; the purchase came
    first on m-b's partition. Live (engine._register: too late after a purchase) pays no
    referral. The backtest sorted sign-ups first at one instant, even within one member's
    partition, and its in-force lane paid the referral that was never paid."""
    t0 = datetime(2026, 3, 2, 10, tzinfo=CST)

    await _record(db, [
        _event("purchase", "m-b", t0, {"order_id": "ob", "amount": "100", "items": []}),
        _event("member_registered", "m-b", t0, {"referrer_id": "m-a"}),
    ])  # fmt: skip
    _, report = await _simulate_default(db, tmp_path, t0, t0 + timedelta(days=1), "--no-warmup")
    by_rule = {r["rule_id"]: r for r in report["rules"]}
    assert "referral_referrer" not in by_rule or by_rule["referral_referrer"]["in_force"] == 0


async def test_simulate_pays_a_released_burst_when_it_was_released(db: str, tmp_path: Path) -> None:
    """`rules held release` prices a burst against the member's state at the release. The
    in-force lane paid every released burst at once, on the state that held it, even one
    released after the period's end."""
    t0 = datetime(2026, 3, 2, 10, tzinfo=CST)
    end = t0 + timedelta(days=1)

    def event(type_: str, member: str, n: int, at: datetime, **data: object) -> dict[str, Any]:
        return {"event_id": f"{type_}-{member}-{n}", "type": type_, "occurred_at": at.isoformat(),
                "member_id": member, "store_id": "sh-jingan", "data": data}  # fmt: skip

    events, shares = [], []
    for m in ("m-1", "m-2"):  # 20 sign-ins in a minute, then a share in it: held
        events += [event("check_in", m, i, t0 + timedelta(seconds=i), kind="sign_in")
                   for i in range(20)]  # fmt: skip
        at = t0 + timedelta(seconds=20)
        shares.append(event("share", m, 0, at, share_id=f"s-{m}", approved=True))
    reviews = [event("review", "m-1", h, t0 + timedelta(hours=h), review_id=f"r-{h}", rating=5)
               for h in range(1, 5)]  # fmt: skip
    await _record(db, [*events, *shares, *reviews])
    # m-1's share released after its second review; m-2's at the period's end, outside it.
    for share, decided in zip(shares, (t0 + timedelta(hours=2, minutes=1), end), strict=True):
        await _hold(db, share)
        await _q(db, "UPDATE rules_held SET status = 'released', decided_at = $2"
                     " WHERE event_id = $1", share["event_id"], decided)  # fmt: skip
    _, report = await _simulate_default(db, tmp_path, t0 - timedelta(days=1), end)
    in_force = {r["rule_id"]: r["in_force"] for r in report["rules"] if r["in_force"]}
    # m-1's share gets what its day's cap had left after two reviews (200 - 5 - 100), and
    # the reviews after it nothing; was share 200 (both, in full), review 95.
    assert in_force == {"sign_in": 10, "review": 100, "share": 95}
    assert report["held"] == {"in_force": 2, "candidate": 2}
