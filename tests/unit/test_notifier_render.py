from datetime import UTC, datetime

from schemas.ledger import (
    MovementData,
    PointsEarned,
    PointsExpiring,
    PointsRedeemed,
    TierChanged,
    TierChangedData,
)
from services.notifier.render import render

AT = datetime(2026, 11, 20, 7, 0, tzinfo=UTC)


def test_points_earned_names_points_reason_and_balance() -> None:
    event = PointsEarned(
        event_id="e1",
        occurred_at=AT,
        member_id="m-1",
        data=MovementData(points=3850, balance_after=4000, rule_id="base"),
    )
    assert render(event) == "您获得3850积分（消费积分），当前可用积分4000。"


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

    assert render(changed("silver", "gold")) == "恭喜您由银卡会员升级为金卡会员！"
    assert render(changed("gold", "member")) == "您的会员等级已由金卡会员调整为普通会员。"


def test_expiry_warning_uses_shanghai_calendar_day() -> None:
    event = PointsExpiring(
        event_id="x",
        occurred_at=AT,
        member_id="m-1",
        data=MovementData(
            points=-120, balance_after=500, expires_at=datetime(2026, 12, 1, 17, 0, tzinfo=UTC)
        ),
    )
    assert render(event) == "您有120积分将于2026年12月2日过期，请尽快使用。"


def test_redemptions_are_not_notified() -> None:
    event = PointsRedeemed(
        event_id="r", occurred_at=AT, member_id="m", data=MovementData(points=-500, balance_after=0)
    )
    assert render(event) is None
