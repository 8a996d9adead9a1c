"""zh-CN message texts for members: pure, so every wording is unit-tested."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Final
from zoneinfo import ZoneInfo

from schemas.ledger import LedgerEvent, PointsEarned, PointsExpiring, TierChanged

# The calendar for a caller that knows no rule-set version (the default rule set's zone).
_SHANGHAI = ZoneInfo("Asia/Shanghai")
TIER_NAMES_ZH = {
    "member": "普通会员",
    "silver": "银卡会员",
    "gold": "金卡会员",
    "diamond": "钻石会员",
}
_TIER_ORDER = ("member", "silver", "gold", "diamond")
# A points_earned's `balance_after` is the balance at its `occurred_at`: for one dated
# longer ago than this (a grant delivered late) it is no longer the member's current
# balance, and the message dates it instead of calling it current.
CURRENT_FOR: Final = timedelta(days=1)
RULE_NAMES_ZH = {
    "base": "消费积分",
    "big_ticket": "大额消费奖励",
    "first_purchase": "首次消费奖励",
    "new_project": "新项目体验奖励",
    "combo": "组合项目奖励",
    "on_time_visit": "准时到店奖励",
    "punctuality_streak": "连续准时到店奖励",
    "sign_in": "每日签到",
    "sign_in_streak": "连续签到奖励",
    "review": "评价奖励",
    "featured_review": "优质评价奖励",
    "suggestion_adopted": "建议采纳奖励",
    "share": "分享奖励",
    "referral_referrer": "推荐好友奖励",
    "referral_new_member": "新会员推荐奖励",
    "referral_indirect": "间接推荐奖励",
}


def _day(dt: datetime, zone: ZoneInfo) -> str:
    local = dt.astimezone(zone)
    return f"{local.year}年{local.month}月{local.day}日"


# Each reason `skip_reason` gives: the notifier counts by it (each series exported at zero
# from the start, `delivery.OUTCOMES`), so one added here is not left out there.
CAUSED_BY_REFUND: Final = "caused_by_refund"
EXPIRED_ON_ARRIVAL: Final = "expired_on_arrival"
EXPIRED_BEFORE_WARNING: Final = "expired_before_warning"
TIER_EXPIRED_ON_ARRIVAL: Final = "tier_expired_on_arrival"
SKIP_REASONS: Final = (
    CAUSED_BY_REFUND, EXPIRED_ON_ARRIVAL, EXPIRED_BEFORE_WARNING, TIER_EXPIRED_ON_ARRIVAL,
)  # fmt: skip


def skip_reason(event: LedgerEvent, now: datetime) -> str | None:
    """Why members are not told about an event of a kind they are told about, or None.

    `now` is when the notifier handles the event. A grant delivered more than a lot's
    lifetime late is journaled with its expiry in the same batch: its points are gone
    before the member could be told they have them. A refund re-prices the order's
    bonuses (they do not stack, so a partial refund can swap a big-ticket bonus for the
    first-purchase one): the bonus it grants comes with take-backs members are not told
    about, and on its own would read as a reward for the refund. A warning is for before
    the points lapse (30 and 7 days ahead): one handled after, by a notifier that was down
    or lagging, would urge the member to use points already gone. The deliverer asks
    again before each attempt at a warning, as a retry can come up to a day later. An
    upgrade whose tier lapsed before it was handled (a purchase years old) would be
    followed by the downgrade once the rules' tier sweep runs after their catch-up.
    """
    if isinstance(event, PointsEarned):
        if event.data.source_type == "refund":
            return CAUSED_BY_REFUND
        expires_at = event.data.expires_at
        if expires_at is not None and expires_at <= now:
            return EXPIRED_ON_ARRIVAL
    if isinstance(event, PointsExpiring):
        expires_at = event.data.expires_at
        if expires_at is not None and expires_at <= now:
            return EXPIRED_BEFORE_WARNING
    if isinstance(event, TierChanged) and _is_upgrade(event):
        valid_until = event.data.tier_valid_until
        if valid_until is not None and valid_until <= now:
            return TIER_EXPIRED_ON_ARRIVAL
    return None


def _is_upgrade(event: TierChanged) -> bool:
    return _TIER_ORDER.index(event.data.tier) > _TIER_ORDER.index(event.data.previous_tier)


def render(event: LedgerEvent, now: datetime, zone: ZoneInfo = _SHANGHAI) -> str | None:
    """The message for a ledger event, or None when members are not told about it.

    Days are those of `zone`, the calendar of the event's rule-set version: the ledger
    counts a lot's months on it, so another zone's day can be one off (00:30 on 1 March
    in Tokyo is 28 February in Shanghai). Asia/Shanghai, the default rule set's zone, is
    only for a caller that knows no version.
    """
    if isinstance(event, PointsEarned):
        earned = event.data
        why = RULE_NAMES_ZH.get(earned.rule_id or "", "积分奖励")
        if now - event.occurred_at > CURRENT_FOR:
            balance = f"截至{_day(event.occurred_at, zone)}可用积分{earned.balance_after}"
        else:
            balance = f"当前可用积分{earned.balance_after}"
        return f"您获得{earned.points}积分（{why}），{balance}。"
    if isinstance(event, TierChanged):
        tier = event.data
        new, old = TIER_NAMES_ZH[tier.tier], TIER_NAMES_ZH[tier.previous_tier]
        if _is_upgrade(event):
            return f"恭喜您由{old}升级为{new}！"
        return f"您的会员等级已由{old}调整为{new}。"
    if isinstance(event, PointsExpiring):
        warn = event.data
        when = _day(warn.expires_at, zone) if warn.expires_at else "近期"
        return f"您有{abs(warn.points)}积分将于{when}过期，请尽快使用。"
    return None
