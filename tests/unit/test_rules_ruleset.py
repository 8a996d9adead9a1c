"""Rule-set files: loading, refusal messages, version lookup; burst hold and release."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from rules_factories import (
    CST,
    DEFAULT,
    REF004,
    RULESETS,
    T0,
    Run,
    by_rule,
    review,
    ruleset,
    sign_in,
)

from services.rules.engine import release
from services.rules.pruning import COUNTER_DAYS
from services.rules.ruleset import RuleBook, RuleSetError, load_ruleset, publish_problems

MINIMAL = "version: v\neffective_from: 2026-01-01T00:00:00+08:00\n"


def test_default_file_matches_domain_numbers() -> None:
    r = DEFAULT
    assert r.version == "2026.1"
    assert r.timezone == "Asia/Shanghai"
    assert r.tiers.multipliers == {
        "member": Decimal(1),
        "silver": Decimal("1.2"),
        "gold": Decimal("1.5"),
        "diamond": Decimal(2),
    }
    assert r.tiers.thresholds == {"silver": 10000, "gold": 30000, "diamond": 100000}
    assert [(s.min_amount, s.points) for s in r.purchase.big_ticket] == [(1000, 100), (3000, 600)]
    assert r.purchase.new_projects == ["gold-rf-microneedle"]
    assert r.purchase.stack_purchase_bonuses is False
    assert (r.visit.points, r.visit.streak_every, r.visit.streak_points) == (50, 3, 200)
    assert (r.share.points, r.share.likes_threshold, r.share.max_per_day) == (100, 10, 3)
    assert r.engagement.daily_cap == 200
    assert r.campaigns == []
    assert r.redemption.points_per_cny["diamond"] == 60
    assert r.expiry.lot_lifetime_months == 12


def test_defaults_in_code_equal_the_default_file() -> None:
    from_code = load_ruleset(MINIMAL.replace("version: v", 'version: "2026.1"'))
    assert from_code.model_dump(exclude={"effective_from"}) == DEFAULT.model_dump(
        exclude={"effective_from"}
    )


def test_reference_file_loads_from_str_path() -> None:
    assert load_ruleset(str(RULESETS / "reference-004.yaml")) == REF004
    assert REF004.referral.referrer_points == 100


@pytest.mark.parametrize(
    ("extra", "field", "reason"),
    [
        ("share:\n  points: -5\n", "share.points", "greater than or equal to 0"),
        ("share:\n  points: '100'\n", "share.points", "valid integer"),
        ("share:\n  pointz: 100\n", "share.pointz", "Extra inputs"),
        ("timezone: Mars/Olympus\n", "timezone", "unknown time zone"),
        ("timezone: Asia\n", "timezone", "unknown time zone"),  # a directory of tzdata
        ("tiers:\n  multipliers: {member: 1}\n", "tiers", "multipliers missing"),
        (
            "campaigns:\n  - {name: c, starts_at: 2026-02-01T00:00:00+08:00,"
            " ends_at: 2026-01-01T00:00:00+08:00, multiplier: 2}\n",
            "campaigns.0",
            "ends_at must be after",
        ),
        ("purchase:\n  stack_purchase_bonuses: 'yes'\n", "purchase.stack_purchase_bonuses", "bool"),
        # Payouts are keyed by rule id: a shared id let a bonus overwrite the base points.
        ("rule_ids:\n  big_ticket: base\n", "rule_ids", "'base' names base, big_ticket"),
        ("rule_ids:\n  tier: ''\n", "rule_ids", "must not be empty: tier"),
        # Spans past which the calendar arithmetic overflows on every event.
        ("tiers:\n  window_months: 100000\n", "tiers.window_months", "less than or equal to 120"),
        ("expiry:\n  lot_lifetime_months: 1000\n", "expiry.lot_lifetime_months", "to 120"),
        ("visit:\n  min_booking_lead_hours: 1e12\n", "visit.min_booking_lead_hours", "to 8760"),
        (
            "engagement:\n  burst_window_seconds: 1000000000000000\n",
            "engagement.burst_window_seconds",
            "less than or equal to 604800",
        ),
        ("pending_days: 1000000000\n", "pending_days", "less than or equal to 3650"),
    ],
)
def test_bad_file_names_field_and_reason(extra: str, field: str, reason: str) -> None:
    with pytest.raises(RuleSetError) as err:
        load_ruleset(MINIMAL + extra)
    assert field in str(err.value)
    assert reason in str(err.value)


def test_a_one_line_body_ending_in_yaml_is_read_as_yaml_not_as_a_path() -> None:
    body = "{version: one.1, effective_from: 2026-01-01T00:00:00+08:00}  # from default.yaml"
    assert load_ruleset(body).version == "one.1"
    with pytest.raises(RuleSetError, match=r"x\.yaml: cannot be read"):  # always a file
        load_ruleset(Path("/nonexistent/x.yaml"))


def test_naive_effective_from_and_garbage_refused(tmp_path: Path) -> None:
    with pytest.raises(RuleSetError, match="effective_from"):
        load_ruleset("version: v\neffective_from: 2026-01-01T00:00:00\n")
    with pytest.raises(RuleSetError, match="mapping"):
        load_ruleset("- just\n- a list\n")
    with pytest.raises(RuleSetError, match="not valid YAML"):
        load_ruleset("version: [\n")
    f = tmp_path / "x.yaml"
    f.write_text(MINIMAL + "version2: 1\n")
    with pytest.raises(RuleSetError, match=r"x\.yaml"):
        load_ruleset(f)


def test_a_file_that_is_not_utf8_or_not_readable_is_a_rule_set_error(tmp_path: Path) -> None:
    """A file an editor saved as GBK (a Chinese comment) was a UnicodeDecodeError
    traceback; a directory, an OSError one."""
    gbk = tmp_path / "clinic2.yaml"
    gbk.write_bytes(MINIMAL.encode() + "# 规则\n".encode("gbk"))
    with pytest.raises(RuleSetError, match=r"clinic2\.yaml refused: not UTF-8 \(byte 0xb9"):
        load_ruleset(gbk)
    with pytest.raises(RuleSetError, match="not UTF-8"):
        load_ruleset(str(gbk))
    with pytest.raises(RuleSetError, match="cannot be read"):
        load_ruleset(tmp_path)


def test_a_key_given_twice_is_refused_naming_its_path() -> None:
    """PyYAML keeps the last of two equal keys: a second `tiers:` pasted lower down to
    change one threshold dropped silver and diamond and reset the multipliers."""
    text = MINIMAL + "tiers:\n  thresholds: {silver: 10000, gold: 30000}\n"
    with pytest.raises(RuleSetError, match=r"refused: tiers: key given twice \(lines 3 and 5\)"):
        load_ruleset(text + "tiers:\n  thresholds: {gold: 25000}\n")
    with pytest.raises(RuleSetError, match=r"tiers\.thresholds\.gold: key given twice"):
        load_ruleset(MINIMAL + "tiers:\n  thresholds: {gold: 30000, silver: 1, gold: 25000}\n")
    with pytest.raises(RuleSetError, match=r"campaigns\.0\.multiplier: key given twice"):
        load_ruleset(MINIMAL + "campaigns:\n  - {multiplier: 2, multiplier: 3}\n")
    # Keys given beside a merge override it, as YAML means them to; that is no duplicate.
    assert load_ruleset(MINIMAL + "visit: {<<: {points: 10}, points: 20}\n").visit.points == 20


def test_a_stored_version_with_a_key_given_twice_still_loads() -> None:
    """Published before the check: the services must start, with what was paid under it."""
    text = MINIMAL + "pending_days: 3\npending_days: 5\n"
    assert load_ruleset(text, allow_duplicate_keys=True).pending_days == 5


def test_rule_book_picks_version_in_force() -> None:
    later = ruleset(version="2026.2", effective_from=datetime(2026, 6, 1, tzinfo=CST))
    book = RuleBook([later, DEFAULT])
    assert book.at(datetime(2019, 1, 1, tzinfo=CST)).version == "2026.1"  # before the first
    assert book.at(datetime(2026, 5, 31, 23, 59, tzinfo=CST)).version == "2026.1"
    assert book.at(datetime(2026, 6, 1, tzinfo=CST)).version == "2026.2"
    with pytest.raises(RuleSetError):
        RuleBook([DEFAULT, DEFAULT])
    with pytest.raises(RuleSetError):
        RuleBook([])


def test_a_burst_released_days_later_still_meets_its_days_cap() -> None:
    # 25 featured reviews in a minute: 200 paid (the cap), 5 held. The member signs in on
    # the next three days; ops then release the held reviews: day one's cap is used up.
    run = Run()
    run.feed([review(at=T0 + timedelta(seconds=i), featured=True) for i in range(25)])
    assert by_rule(run.grants) == {"featured_review": 200}
    assert len(run.held) == 5
    run.feed([sign_in(at=T0 + timedelta(days=d)) for d in (1, 2, 3)])
    for held in run.held:
        assert release(run.state(), held, run.rules).grants == ()


def test_an_engagement_event_older_than_the_kept_counters_earns_no_capped_points() -> None:
    run = Run()
    run.feed(review(at=T0))
    run.feed(sign_in(at=T0 + timedelta(days=50)))  # drops day one's counter
    assert run.state().counters_since == (T0 + timedelta(days=50)).date() - COUNTER_DAYS
    # A review from day one comes now: its day's budget is no longer known.
    late = run.feed(review(at=T0 + timedelta(hours=2)))
    assert late.grants == ()
    # Within the kept counters a late review pays as it would have on time.
    within = run.feed(review(at=T0 + timedelta(days=30)))
    assert by_rule(within.grants) == {"review": 50}


def test_burst_holds_excess_and_release_pays_it() -> None:
    run = Run(rules=ruleset(engagement={"daily_cap": None}))
    run.feed([review(at=T0 + timedelta(seconds=i)) for i in range(22)])
    assert len(run.held) == 2
    assert by_rule(run.grants) == {"review": 20 * 50}
    assert "20 engagement events" in run.held[0].reason
    released = release(run.state(), run.held[0], run.rules)
    assert by_rule(released.grants) == {"review": 50}
    # A minute later the member is no longer in a burst.
    later = run.feed(review(at=T0 + timedelta(seconds=90)))
    assert later.held == ()
    assert by_rule(later.grants) == {"review": 50}


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ("expiry:\n  warn_days_before: [14]\n", "expiry.warn_days_before: the ledger warns"),
        ("redemption:\n  points_per_cny: {gold: 70}\n",
         "missing tiers ['member', 'silver', 'diamond']"),
        ("redemption:\n  points_per_cny: {member: 0, silver: 100, gold: 80, diamond: 60}\n",
         "rates must be above 0 (not for ['member'])"),
        ("redemption:\n  catalogue: {gift: 0}\n", "catalogue: points must be above 0"),
    ],
)  # fmt: skip
def test_what_the_ledger_cannot_honour_is_refused_at_publish_not_at_load(
    extra: str, says: str
) -> None:
    """A version stored before a check existed still loads (the services must start)."""
    loaded = load_ruleset(MINIMAL + extra)
    assert any(says in p for p in publish_problems(loaded)), publish_problems(loaded)
    assert publish_problems(DEFAULT) == []


@pytest.mark.parametrize("when", ["9999-12-31T23:00:00-10:00", "0001-01-01T00:00:00+08:00"])
def test_an_effective_from_outside_the_years_utc_holds_is_refused_at_publish(when: str) -> None:
    """Stored as UTC, these are moments in year 10000 and year 0: the insert failed, and
    ledgerctl reported the operator's date as `error: database: ...`."""
    loaded = load_ruleset(MINIMAL.replace("2026-01-01T00:00:00+08:00", when))
    assert publish_problems(loaded) == [
        f"effective_from: {when} is out of range (years 1 to 9999 in UTC)"
    ]
