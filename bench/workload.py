"""A seeded, realistic clinic workload: skewed members, the event mix of a clinic.

Members' activity follows a Zipf-like law (weight ~ 1/(rank+10)^0.9 over 100,000 members:
a few regulars sign in daily and buy monthly, most members come once or twice). Events
are spread over the last 60 days in time order, so per-member order holds and the
anti-burst rule does not hold anything back. The mix, by count:

    sign-in 30%, purchase 28%, visit 15%, review 8%, share 8%, refund 4% (of a real earlier
    order of that member, partial or full), referral 4%, member registration 3%.

Events are returned as (key, JSON bytes) ready to produce; generation is deterministic
for a seed, so every run and the naive baseline see the same stream.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final

import orjson

CST: Final = timezone(timedelta(hours=8))
MEMBERS: Final = 100_000
ZIPF_S: Final = 0.9
ZIPF_OFFSET: Final = 10
SPAN: Final = timedelta(days=60)

MIX: Final = (
    ("sign_in", 30),
    ("purchase", 28),
    ("visit", 15),
    ("review", 8),
    ("share", 8),
    ("refund", 4),
    ("referral", 4),
    ("register", 3),
)
# (project code, price CNY): the default rule set's projects, at clinic prices.
PROJECTS: Final = (
    ("facial-basic", 198),
    ("neck-shoulder-massage", 168),
    ("facial-package", 680),
    ("hydrafacial", 388),
    ("water-light", 1280),
    ("photo-rejuvenation", 2500),
    ("thermage", 12800),
    ("gold-rf-microneedle", 3600),
)
PROJECT_WEIGHTS: Final = (25, 15, 20, 20, 8, 6, 2, 4)
STORES: Final = ("sh-jingan", "sh-xuhui", "bj-chaoyang", "hz-xihu")


@dataclass(frozen=True, slots=True)
class Event:
    key: bytes
    value: bytes
    event_id: str
    type: str


def member_id(rank: int) -> str:
    return f"m{rank:06d}"


def generate(
    n: int, seed: int = 42, members: int = MEMBERS, end: datetime | None = None
) -> list[Event]:
    """`n` events in time order ending at `end` (default: now, to the second)."""
    rng = random.Random(seed)
    end = end or datetime.now(UTC).replace(microsecond=0)
    start = end - SPAN
    step = SPAN / max(n, 1)
    cum_members = list(
        itertools.accumulate(1.0 / (i + ZIPF_OFFSET) ** ZIPF_S for i in range(members))
    )
    kinds = [k for k, _ in MIX]
    cum_kinds = list(itertools.accumulate(w for _, w in MIX))
    cum_projects = list(itertools.accumulate(PROJECT_WEIGHTS))
    orders: dict[str, list[tuple[str, int]]] = {}
    out: list[Event] = []
    total_m, total_k, total_p = cum_members[-1], cum_kinds[-1], cum_projects[-1]
    for i in range(n):
        rank = bisect.bisect_left(cum_members, rng.random() * total_m)
        mid = member_id(rank)
        at = (start + step * i).astimezone(CST)
        kind = kinds[bisect.bisect_left(cum_kinds, rng.random() * total_k)]
        if kind == "refund" and not orders.get(mid):
            kind = "purchase"
        eid = f"e{seed}-{i:08d}"
        body: dict[str, Any] = {
            "event_id": eid,
            "occurred_at": at.isoformat(),
            "member_id": mid,
            "store_id": STORES[rank % len(STORES)],
        }
        if kind == "purchase":
            k = 2 if rng.random() < 0.15 else 1
            picks = [
                PROJECTS[bisect.bisect_left(cum_projects, rng.random() * total_p)] for _ in range(k)
            ]
            if rng.random() < 0.05:  # the configured combo
                picks = [PROJECTS[0], PROJECTS[1]]
            amount = sum(p for _, p in picks)
            order_id = f"o{seed}-{i:08d}"
            orders.setdefault(mid, []).append((order_id, amount))
            body.update(
                type="purchase",
                source="pos",
                data={
                    "order_id": order_id,
                    "amount": f"{amount}.00",
                    "items": [
                        {"project_code": c, "category": "treatment", "amount": f"{p}.00"}
                        for c, p in picks
                    ],
                },
            )
        elif kind == "refund":
            order_id, amount = orders[mid].pop(rng.randrange(len(orders[mid])))
            part = amount if rng.random() < 0.6 else amount // 2
            body.update(
                type="refund", source="pos", data={"order_id": order_id, "amount": f"{part}.00"}
            )
        elif kind == "sign_in":
            body.update(type="check_in", source="app", store_id=None, data={"kind": "sign_in"})
        elif kind == "visit":
            slot = at - timedelta(minutes=rng.choice((5, 10, 20, 30)))
            booked = slot - timedelta(hours=rng.choice((2, 26, 50, 75)))
            arrived = slot + timedelta(minutes=rng.choice((-10, -5, 0, 5, 12, 25)))
            body.update(
                type="check_in",
                source="booking",
                data={
                    "kind": "visit",
                    "booking_id": f"b{seed}-{i:08d}",
                    "booked_at": booked.isoformat(),
                    "slot_start": slot.isoformat(),
                    "arrived_at": arrived.isoformat(),
                },
            )
        elif kind == "review":
            body.update(
                type="review",
                source="app",
                data={
                    "review_id": f"r{seed}-{i:08d}",
                    "rating": rng.choice((3, 4, 5, 5, 5)),
                    "featured": rng.random() < 0.1,
                    "suggestion_adopted": rng.random() < 0.02,
                },
            )
        elif kind == "share":
            body.update(
                type="share",
                source="app",
                data={
                    "share_id": f"s{seed}-{i:08d}",
                    "channel": "wechat",
                    "approved": rng.random() < 0.7,
                    "likes": rng.randrange(0, 30),
                },
            )
        elif kind == "referral":
            referrer = member_id(rng.randrange(members))
            body.update(type="referral", source="app", data={"referrer_id": referrer})
        else:
            body.update(
                type="member_registered",
                source="app",
                data={"birthday": f"{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"},
            )
        out.append(Event(mid.encode(), orjson.dumps(body), eid, body["type"]))
    return out


def describe(events: list[Event]) -> dict[str, Any]:
    by_type: dict[str, int] = {}
    by_member: dict[bytes, int] = {}
    for e in events:
        by_type[e.type] = by_type.get(e.type, 0) + 1
        by_member[e.key] = by_member.get(e.key, 0) + 1
    counts = sorted(by_member.values(), reverse=True)
    top1 = max(1, len(counts) // 100)
    return {
        "events": len(events),
        "members_active": len(counts),
        "busiest_member_events": counts[0] if counts else 0,
        "top_1pct_share": round(sum(counts[:top1]) / max(1, len(events)), 3),
        "by_type": dict(sorted(by_type.items())),
    }
