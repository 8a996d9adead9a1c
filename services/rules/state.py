"""Per-member memory the rules need between events, stored by the adapter as JSON (a `json` column).

Everything here is what a later event must know about earlier ones (streaks, first
purchase, paid share ids, what an order earned so a refund can be recomputed). It is
kept compact: day counters and old orders are pruned as events move time forward.

The types are frozen msgspec structs, not pydantic models: the evaluator copies the state
several times per event (`replace`) and the backtest runs it for every recorded event in
two lanes, where pydantic's copies cost most of the time. The JSON (`dump_state` /
`load_state`) omits default values, so a row holds only what a member has actually done.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, tzinfo
from decimal import Decimal
from itertools import pairwise
from typing import Any, Final

import msgspec
from msgspec.structs import replace

from schemas.activity import Activity
from schemas.grants import Tier

__all__ = ["replace"]


# Every state type is frozen (lanes and callers may share states), keyword-only, omits
# defaults in JSON, refuses unknown keys, and is skipped by the cyclic GC (no cycles).
# (Spelled out per class: mypy reads struct options only from the class statement.)
class OtherPaid(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    omit_defaults=True,
    forbid_unknown_fields=True,
    gc=False,
):
    """Points an order paid to another member (referral), so a full refund can undo them."""

    member_id: str
    rule_id: str
    points: int


class BigTicketSnapshot(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    omit_defaults=True,
    forbid_unknown_fields=True,
    gc=False,
):
    min_amount: Decimal
    points: int


class Order(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    omit_defaults=True,
    forbid_unknown_fields=True,
    gc=False,
):
    """An order as it was priced, so refunds recompute under the rules of the purchase."""

    order_id: str
    at: datetime
    amount: Decimal
    refunded: Decimal = Decimal(0)
    ruleset_version: str
    store_id: str | None = None
    # Points per CNY after every factor (divided by `base_rate_divisor`, 1 but for a
    # project campaign, whose share of the order is a fraction); the factors themselves
    # are kept for audit.
    base_rate: Decimal
    base_rate_divisor: Decimal = Decimal(1)
    factors: dict[str, Decimal] = msgspec.field(default_factory=dict)
    # Amount-independent bonus candidates (first purchase, new project, combo).
    fixed_bonuses: dict[str, int] = msgspec.field(default_factory=dict)
    big_ticket: tuple[BigTicketSnapshot, ...] = ()
    base_rule: str = "base"
    big_ticket_rule: str = "big_ticket"
    stack: bool = False
    paid: dict[str, int] = msgspec.field(default_factory=dict)
    others: tuple[OtherPaid, ...] = ()
    tier_before: Tier = "member"
    tier_after: Tier = "member"
    valid_until_before: datetime | None = None

    @property
    def net(self) -> Decimal:
        return self.amount - self.refunded


class ReviewMark(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    omit_defaults=True,
    forbid_unknown_fields=True,
    gc=False,
):
    """What a review id has already been credited with, so a re-sent review pays once."""

    day: date
    points_due: int = 0
    suggestion: bool = False


class SpendMark(
    msgspec.Struct,
    frozen=True,
    array_like=True,
    forbid_unknown_fields=True,
    gc=False,
):
    """A forgotten order's moment and amount net of refunds, as `[at, net]` in JSON."""

    at: datetime
    net: Decimal


class SignInRun(
    msgspec.Struct,
    frozen=True,
    array_like=True,
    forbid_unknown_fields=True,
    gc=False,
):
    """Consecutive days signed in, `[first, last]` in JSON."""

    first: date
    last: date

    @property
    def days(self) -> int:
        return (self.last - self.first).days + 1


class EarlyRefund(
    msgspec.Struct,
    frozen=True,
    array_like=True,
    forbid_unknown_fields=True,
    gc=False,
):
    """A refund of an order not seen yet, as `[order_id, at, amount]` in JSON: applied
    when the purchase arrives (systems that sync late can deliver the refund first)."""

    order_id: str
    at: datetime
    amount: Decimal


class MemberState(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    omit_defaults=True,
    forbid_unknown_fields=True,
    gc=False,
):
    member_id: str
    tier: Tier = "member"
    tier_valid_until: datetime | None = None
    # The latest moment tier expiries were applied up to (by an event or the tier sweep);
    # a refund's replay of the tier never goes back before it.
    tier_checked_at: datetime | None = None
    orders: dict[str, Order] = msgspec.field(default_factory=dict)
    # Forgotten orders' spend (moment, net amount), oldest first, kept a tier window longer
    # than the orders: a refund replays the member's tier from the refunded order on, and
    # the rolling spend at that order's moment reaches back that far.
    spend_history: tuple[SpendMark, ...] = ()
    # Spend at or before this moment is no longer known at all (None: all of it is); a
    # refund whose replay would need it is decided without the replay.
    spend_since: datetime | None = None
    first_purchase_done: bool = False
    new_projects_bought: tuple[str, ...] = ()
    visit_streak: int = 0
    visits_seen: dict[str, date] = msgspec.field(default_factory=dict)
    # Days signed in, as runs of consecutive days, oldest first, kept while their last day
    # is inside the day counters' horizon: a sign-in delivered late fills its day in and
    # joins the runs around it, as it would have in time order.
    sign_in_runs: tuple[SignInRun, ...] = ()
    # For a state whose runs were read from an older one (below): the first day its days
    # are known from. Before it, the old state kept no days, and any was taken as signed.
    sign_in_known_from: date | None = None
    # A state written before the runs: the last day and the streak ending on it (read as
    # one run by `engagement_rules.sign_in_runs`, and cleared when the runs are written).
    sign_in_last_day: date | None = None
    sign_in_streak: int = 0
    shares_paid: dict[str, date] = msgspec.field(default_factory=dict)
    shares_by_day: dict[date, int] = msgspec.field(default_factory=dict)
    reviews: dict[str, ReviewMark] = msgspec.field(default_factory=dict)
    engagement_by_day: dict[date, int] = msgspec.field(default_factory=dict)
    # The oldest day whose counters (engagement_by_day, shares_by_day) are still complete;
    # None: none dropped yet. A capped payout for an earlier day cannot check its cap.
    counters_since: date | None = None
    # The newest day whose business ids (visits_seen, shares_paid, reviews) were forgotten
    # (`pruning.prune`, `keep_months` back); None: none yet. An engagement event of that
    # day or earlier cannot be told from one already paid, so it earns nothing: a booking
    # re-sent under a new event id a year on was paid again.
    ids_since: date | None = None
    recent_engagement: tuple[datetime, ...] = ()
    referrer_id: str | None = None
    referral_paid: bool = False
    # Refunds of orders not seen yet, in arrival order; kept as long as orders are.
    early_refunds: tuple[EarlyRefund, ...] = ()
    birthday: str | None = None


# Decimals as strings: "1.20" stays "1.20" (a JSON number would go through float).
_ENCODER: Final = msgspec.json.Encoder(decimal_format="string")
_DECODER: Final = msgspec.json.Decoder(MemberState)


def dump_state(state: MemberState) -> bytes:
    """The JSON stored in rules_member_state.state; `load_state` reads it back equal."""
    return _ENCODER.encode(state)


def load_state(raw: bytes | str) -> MemberState:
    """Raises msgspec.ValidationError / DecodeError on a row that is not a member state."""
    return in_day_order(_DECODER.decode(raw))


_OFFSET_TZ: dict[timedelta, tzinfo] = {}
_MINUTE: Final = timedelta(minutes=1)
_DAY: Final = timedelta(days=1)


def shared_tz(moment: datetime) -> datetime:
    """`moment` with the one tzinfo object `load_state` gives every time of its offset.

    Comparing two aware datetimes whose tzinfo objects differ calls `utcoffset()` on both
    (~10x the cost of a comparison under one object). A parsed event brings its own
    tzinfo (pydantic makes one per parse), while the times of a stored state share
    msgspec's, one per offset; the rules compare the event's moment with every order and
    stamp of the member, so the event takes msgspec's object. Only the object changes:
    the moment, its offset and its ISO form (so every id and payload) stay the same.
    """
    tz = moment.tzinfo
    if tz is None:
        return moment
    offset = tz.utcoffset(None)
    if offset is None:  # a zone, whose offset depends on the date: left as it is
        return moment
    shared = _OFFSET_TZ.get(offset)
    if shared is None:
        if len(_OFFSET_TZ) > 64:  # a handful of offsets occur; a bound all the same
            _OFFSET_TZ.clear()
        shared = _OFFSET_TZ[offset] = _decoded_tz(offset, tz)
    return moment if shared is tz else moment.replace(tzinfo=shared)


def with_shared_tz(event: Activity) -> Activity:
    """The event with its `occurred_at` under `shared_tz`'s object, updated in place (the
    field's value stays equal; the model is not validated again)."""
    at = event.occurred_at
    shared = shared_tz(at)
    if shared is not at:
        event.__dict__["occurred_at"] = shared
    return event


def _decoded_tz(offset: timedelta, fallback: tzinfo) -> tzinfo:
    if offset % _MINUTE or abs(offset) >= _DAY:  # not an RFC 3339 offset: nothing to share
        return fallback
    minutes = offset // _MINUTE
    sign, minutes = ("-" if minutes < 0 else "+"), abs(minutes)
    text = f'"2000-01-01T00:00:00{sign}{minutes // 60:02d}:{minutes % 60:02d}"'
    decoded = msgspec.json.decode(text.encode(), type=datetime).tzinfo
    return fallback if decoded is None else decoded


def in_day_order(state: MemberState) -> MemberState:
    """The state with every dated map oldest first, as `pruning.prune` expects.

    States built by the rules already are; this is for rows read back from storage
    (written by any earlier version of the code), and costs a scan per map.
    """
    changes: dict[str, Any] = {}
    if not _ascending(list(state.engagement_by_day)):
        changes["engagement_by_day"] = dict(
            sorted(state.engagement_by_day.items(), key=counter_day)
        )
    if not _ascending(list(state.shares_by_day)):
        changes["shares_by_day"] = dict(sorted(state.shares_by_day.items(), key=counter_day))
    if not _ascending(list(state.shares_paid.values())):
        changes["shares_paid"] = dict(sorted(state.shares_paid.items(), key=seen_day))
    if not _ascending(list(state.visits_seen.values())):
        changes["visits_seen"] = dict(sorted(state.visits_seen.items(), key=seen_day))
    if not _ascending([r.day for r in state.reviews.values()]):
        changes["reviews"] = dict(sorted(state.reviews.items(), key=review_day))
    if not _ascending([o.at for o in state.orders.values()]):
        changes["orders"] = dict(sorted(state.orders.items(), key=order_at))
    if not _ascending([m.at for m in state.spend_history]):
        changes["spend_history"] = tuple(sorted(state.spend_history, key=lambda m: m.at))
    return replace(state, **changes) if changes else state


def _ascending(values: list[Any]) -> bool:
    return all(a <= b for a, b in pairwise(values))


# Sort keys of the dated maps' items (oldest first is what pruning reads).
def counter_day(item: tuple[date, int]) -> date:
    return item[0]


def seen_day(item: tuple[str, date]) -> date:
    return item[1]


def review_day(item: tuple[str, ReviewMark]) -> date:
    return item[1].day


def order_at(item: tuple[str, Order]) -> datetime:
    return item[1].at
