from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from rules_factories import T0, Run, order_of, purchase, refund

from schemas.grants import PointsGranted
from schemas.ledger import (
    MovementData,
    PointsEarned,
    PointsExpiring,
    PointsRedeemed,
    TierChanged,
    TierChangedData,
    parse_ledger_event,
)
from services.ledger import accounting as acc
from services.ledger.journal import ledger_event_json
from services.ledger.projector import command_for
from services.notifier.render import render, skip_reason

AT = datetime(2026, 11, 20, 7, 0, tzinfo=UTC)
NOW = AT + timedelta(minutes=5)  # when the notifier handles the event


def test_points_earned_names_points_reason_and_balance() -> None:
    event = PointsEarned(
        event_id="e1",
        occurred_at=AT,
        member_id="m-1",
        data=MovementData(points=3850, balance_after=4000, rule_id="base"),
    )
    assert render(event, NOW) == "您获得3850积分（消费积分），当前可用积分4000。"


def test_points_earned_long_ago_dates_its_balance_rather_than_calling_it_current() -> None:
    # `balance_after` is the balance at the entry's occurred_at: for a grant delivered
    # days late, later entries may have moved the balance since.
    event = PointsEarned(
        event_id="e1",
        occurred_at=AT,
        member_id="m-1",
        data=MovementData(points=1000, balance_after=1000, rule_id="base"),
    )
    assert (
        render(event, AT + timedelta(hours=23)) == "您获得1000积分（消费积分），当前可用积分1000。"
    )
    assert (
        render(event, AT + timedelta(days=3))
        == "您获得1000积分（消费积分），截至2026年11月20日可用积分1000。"
    )


def test_points_earned_already_expired_when_handled_are_not_announced() -> None:
    # A grant delivered more than 12 months late: the ledger journals its earn and its
    # expiry in one batch, and the points are gone before the member could use them.
    def earned(expires_at: datetime) -> PointsEarned:
        return PointsEarned(
            event_id="e1",
            occurred_at=AT - timedelta(days=400),
            member_id="m-1",
            data=MovementData(
                points=1000, balance_after=1000, rule_id="base", expires_at=expires_at
            ),
        )

    assert skip_reason(earned(NOW - timedelta(days=35)), NOW) == "expired_on_arrival"
    assert skip_reason(earned(NOW), NOW) == "expired_on_arrival"
    assert skip_reason(earned(NOW + timedelta(days=1)), NOW) is None


def test_tier_upgrade_congratulates_and_downgrade_informs() -> None:
    def changed(prev: str, new: str) -> TierChanged:
        return TierChanged(
            event_id="t",
            occurred_at=AT,
            member_id="m-1",
            data=TierChangedData(
                previous_tier=prev,  # type: ignore[arg-type]
                tier=new,  # type: ignore[arg-type]
                qualifying_spend="30000",  # type: ignore[arg-type]
                tier_valid_until=None,
                ruleset_version="2026.1",
                source_event_id="s",
            ),
        )

    assert render(changed("silver", "gold"), NOW) == "恭喜您由银卡会员升级为金卡会员！"
    assert render(changed("gold", "member"), NOW) == "您的会员等级已由金卡会员调整为普通会员。"


def test_an_upgrade_whose_tier_lapsed_before_it_was_handled_is_not_announced() -> None:
    # A purchase years old earns its tier for a year from then: the tier sweep takes it
    # back once the rules have caught up, so "upgraded to gold" would be followed by a
    # downgrade a minute later.
    def changed(prev: str, new: str, until: datetime | None) -> TierChanged:
        return TierChanged(
            event_id="t",
            occurred_at=AT - timedelta(days=3 * 365),
            member_id="m-1",
            data=TierChangedData(
                previous_tier=prev,  # type: ignore[arg-type]
                tier=new,  # type: ignore[arg-type]
                qualifying_spend="50000",  # type: ignore[arg-type]
                tier_valid_until=until,
                ruleset_version="2026.1",
                source_event_id="s",
            ),
        )

    lapsed = "tier_expired_on_arrival"
    assert skip_reason(changed("member", "gold", NOW - timedelta(days=700)), NOW) == lapsed
    assert skip_reason(changed("member", "gold", NOW), NOW) == lapsed
    assert skip_reason(changed("member", "gold", NOW + timedelta(days=1)), NOW) is None
    assert skip_reason(changed("member", "gold", None), NOW) is None
    # Only an upgrade is held back: a downgrade is told as before.
    assert skip_reason(changed("gold", "silver", NOW - timedelta(days=700)), NOW) is None


def test_expiry_warning_uses_shanghai_calendar_day() -> None:
    event = PointsExpiring(
        event_id="x",
        occurred_at=AT,
        member_id="m-1",
        data=MovementData(
            points=-120, balance_after=500, expires_at=datetime(2026, 12, 1, 17, 0, tzinfo=UTC)
        ),
    )
    assert render(event, NOW) == "您有120积分将于2026年12月2日过期，请尽快使用。"


def _warning(expires_at: datetime) -> PointsExpiring:
    return PointsExpiring(
        event_id="w",
        occurred_at=expires_at - timedelta(days=7),
        member_id="m-1",
        data=MovementData(points=800, balance_after=800, expires_at=expires_at),
    )


def test_expiry_warning_handled_once_the_points_have_lapsed_is_not_sent() -> None:
    # A notifier down or lagging handles the 7-day warning after the lot lapsed: the member
    # was told "您有800积分将于…过期，请尽快使用。" about points gone hours before.
    lapse = datetime(2026, 11, 20, 7, 0, tzinfo=UTC)
    assert skip_reason(_warning(lapse), lapse + timedelta(hours=3)) == "expired_before_warning"
    assert skip_reason(_warning(lapse), lapse) == "expired_before_warning"
    assert skip_reason(_warning(lapse), lapse - timedelta(minutes=1)) is None


def test_dates_are_days_of_the_rule_sets_calendar() -> None:
    # The ledger counts a lot's months on its rule set's zone: 00:30 on 1 March in Tokyo
    # lapses at 00:30 on 1 March a year on, which is still 28 February in Shanghai.
    tokyo = ZoneInfo("Asia/Tokyo")
    earned_at = datetime(2026, 3, 1, 0, 30, tzinfo=tokyo)
    warning = _warning(acc.months_later(earned_at, 12, tokyo))
    assert render(warning, NOW, tokyo) == "您有800积分将于2027年3月1日过期，请尽快使用。"
    assert render(warning, NOW) == "您有800积分将于2027年2月28日过期，请尽快使用。"
    earned = PointsEarned(
        event_id="e1",
        occurred_at=earned_at,
        member_id="m-1",
        data=MovementData(points=100, balance_after=100, rule_id="base"),
    )
    assert (
        render(earned, earned_at + timedelta(days=3), tokyo)
        == "您获得100积分（消费积分），截至2026年3月1日可用积分100。"
    )


def test_redemptions_are_not_notified() -> None:
    event = PointsRedeemed(
        event_id="r", occurred_at=AT, member_id="m", data=MovementData(points=-500, balance_after=0)
    )
    assert render(event, NOW) is None


def test_a_bonus_a_refund_grants_is_not_presented_as_a_reward() -> None:
    # A partial refund of a 3,000 CNY order: base and big-ticket points taken back (not
    # messaged), the first-purchase bonus granted in place of the big-ticket one.
    run = Run()
    buy = purchase("m-1", 3000, at=T0)
    run.feed(buy)
    grants = run.feed(refund("m-1", order_of(buy), 2500, at=T0 + timedelta(days=1))).grants
    (bonus,) = [g for g in grants if isinstance(g, PointsGranted)]
    book = acc.Book(member_id="m-1")
    book, (entry,) = acc.apply(book, command_for(bonus))
    event = parse_ledger_event(ledger_event_json(entry, bonus.data.source_type))
    assert isinstance(event, PointsEarned)
    assert (event.data.rule_id, event.data.source_type) == ("first_purchase", "refund")
    assert skip_reason(event, T0 + timedelta(days=1)) == "caused_by_refund"
    # A purchase's grants are rewards, as before.
    later = run.feed(purchase("m-1", 500, at=T0 + timedelta(days=2))).grants
    (base,) = [g for g in later if isinstance(g, PointsGranted)]
    book, (entry,) = acc.apply(book, command_for(base))
    earned = parse_ledger_event(ledger_event_json(entry, base.data.source_type))
    assert skip_reason(earned, T0 + timedelta(days=2)) is None
    assert render(earned, T0 + timedelta(days=2)) is not None
