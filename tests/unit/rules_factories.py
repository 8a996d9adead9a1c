"""Builders for activity events and rule sets used by the rules tests."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec

from schemas.activity import Activity, Purchase, Refund, activity_adapter
from schemas.grants import GrantEvent, PointsGranted, PointsRevoked, TierEvaluated
from services.rules.engine import Evaluation, HeldEvent, evaluate
from services.rules.ruleset import RuleSet, load_ruleset
from services.rules.state import MemberState

CST = timezone(timedelta(hours=8))
RULESETS = Path(__file__).resolve().parents[2] / "services" / "rules" / "rulesets"
DEFAULT = load_ruleset(RULESETS / "default.yaml")
REF004 = load_ruleset(RULESETS / "reference-004.yaml")
T0 = datetime(2026, 3, 2, 10, 0, tzinfo=CST)

_ids = itertools.count(1)


def ruleset(**overrides: Any) -> RuleSet:
    """The default rule set with nested overrides, e.g. ruleset(purchase={"stack_...": True})."""
    data = DEFAULT.model_dump()
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return RuleSet.model_validate(data, strict=False)


def _event(type_: str, member: str, at: datetime, data: Mapping[str, Any], **kw: Any) -> Activity:
    raw = {
        "event_id": kw.pop("event_id", None) or f"e-{next(_ids)}",
        "type": type_,
        "occurred_at": at.isoformat(),
        "member_id": member,
        "store_id": kw.pop("store_id", "sh-jingan"),
        "data": dict(data),
    }
    return activity_adapter.validate_python(raw)


def purchase(
    member: str = "m-1",
    amount: int | str | Decimal = 100,
    items: Sequence[str] | None = None,
    at: datetime = T0,
    order_id: str | None = None,
    **kw: Any,
) -> Activity:
    codes = list(items) if items is not None else ["facial-package"]
    amt = Decimal(str(amount))
    share = (amt / len(codes)).quantize(Decimal("0.01")) if codes else Decimal(0)
    data = {
        "order_id": order_id or f"o-{next(_ids)}",
        "amount": str(amt),
        "items": [{"project_code": c, "category": "x", "amount": str(share)} for c in codes],
    }
    return _event("purchase", member, at, data, **kw)


def refund(member: str, order_id: str, amount: int | str, at: datetime = T0, **kw: Any) -> Activity:
    return _event("refund", member, at, {"order_id": order_id, "amount": str(amount)}, **kw)


def visit(
    member: str = "m-1",
    slot: datetime = T0,
    lead: timedelta = timedelta(days=1),
    late: timedelta | None = timedelta(0),
    booking_id: str | None = None,
    **kw: Any,
) -> Activity:
    data = {
        "kind": "visit",
        "booking_id": booking_id or f"b-{next(_ids)}",
        "booked_at": (slot - lead).isoformat(),
        "slot_start": slot.isoformat(),
        "arrived_at": None if late is None else (slot + late).isoformat(),
    }
    return _event("check_in", member, kw.pop("at", slot + (late or timedelta(0))), data, **kw)


def sign_in(member: str = "m-1", at: datetime = T0, **kw: Any) -> Activity:
    return _event("check_in", member, at, {"kind": "sign_in"}, **kw)


def review(
    member: str = "m-1",
    at: datetime = T0,
    featured: bool = False,
    suggestion: bool = False,
    review_id: str | None = None,
    **kw: Any,
) -> Activity:
    data = {
        "review_id": review_id or f"r-{next(_ids)}",
        "rating": 5,
        "featured": featured,
        "suggestion_adopted": suggestion,
    }
    return _event("review", member, at, data, **kw)


def share(
    member: str = "m-1",
    at: datetime = T0,
    approved: bool = True,
    likes: int = 0,
    share_id: str | None = None,
    **kw: Any,
) -> Activity:
    data = {
        "share_id": share_id or f"s-{next(_ids)}",
        "channel": "wechat",
        "approved": approved,
        "likes": likes,
    }
    return _event("share", member, at, data, **kw)


def registered(
    member: str = "m-1",
    referrer: str | None = None,
    birthday: str | None = None,
    at: datetime = T0,
    **kw: Any,
) -> Activity:
    data: dict[str, Any] = {}
    if referrer is not None:
        data["referrer_id"] = referrer
    if birthday is not None:
        data["birthday"] = birthday
    return _event("member_registered", member, at, data, **kw)


def referral(member: str, referrer: str, at: datetime = T0, **kw: Any) -> Activity:
    return _event("referral", member, at, {"referrer_id": referrer}, **kw)


@dataclass
class Run:
    """Feeds events through the engine, one state per member, collecting all outputs."""

    rules: RuleSet = DEFAULT
    referrers: dict[str, str | None] = field(default_factory=dict)
    states: dict[str, MemberState] = field(default_factory=dict)
    grants: list[GrantEvent] = field(default_factory=list)
    held: list[HeldEvent] = field(default_factory=list)

    def state(self, member: str = "m-1") -> MemberState:
        return self.states.get(member) or MemberState(member_id=member)

    def feed(self, *events: Activity | Iterable[Activity]) -> Evaluation:
        result = Evaluation(state=self.state())
        for ev in _flatten(events):
            result = evaluate(self.state(ev.member_id), ev, self.rules, self.referrers)
            self.states[ev.member_id] = result.state
            if result.state.referrer_id is not None:
                self.referrers[ev.member_id] = result.state.referrer_id
            self.grants.extend(result.grants)
            self.held.extend(result.held)
        return result

    def balance(self, member: str = "m-1") -> int:
        return balance(self.grants, member)

    def by_rule(self, member: str = "m-1") -> dict[str, int]:
        return by_rule(self.grants, member)

    @property
    def tiers(self) -> list[TierEvaluated]:
        return [g for g in self.grants if isinstance(g, TierEvaluated)]


def _flatten(events: Iterable[Activity | Iterable[Activity]]) -> Iterable[Activity]:
    for e in events:
        if isinstance(e, list | tuple):
            yield from e
        else:
            yield e  # type: ignore[misc]


def balance(grants: Iterable[GrantEvent], member: str = "m-1") -> int:
    return sum(by_rule(grants, member).values())


def by_rule(grants: Iterable[GrantEvent], member: str = "m-1") -> dict[str, int]:
    out: dict[str, int] = {}
    for g in grants:
        if g.member_id != member:
            continue
        if isinstance(g, PointsGranted):
            out[g.data.rule_id] = out.get(g.data.rule_id, 0) + g.data.points
        elif isinstance(g, PointsRevoked):
            out[g.data.rule_id] = out.get(g.data.rule_id, 0) - g.data.points
    return {k: v for k, v in out.items() if v}


def order_of(event: Activity) -> str:
    assert isinstance(event, Purchase | Refund)
    return event.data.order_id


def state_with(member: str = "m-1", **fields: Any) -> MemberState:
    return msgspec.structs.replace(MemberState(member_id=member), **fields)
