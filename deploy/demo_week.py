"""The scripted week of ``make demo``: two stores, a dozen members, every activity type.

Pure data: :func:`build_week` takes the reference time and a run token and returns the
events as upstream systems would send them (plain contract JSON), so the demo and its
integration test (tests/integration/test_demo.py) drive exactly the same week. Each
member carries the outcome the default rule set must produce (DOMAIN.md), worked out by
hand in the comments below; the demo prints them beside what the ledger says.

The week is the seven calendar days before ``now``'s day in Asia/Shanghai, at clinic
hours, so every event lies in the past and in one recent week.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

SHANGHAI = ZoneInfo("Asia/Shanghai")
JINGAN = "sh-jingan"
XUHUI = "sh-xuhui"

# Pseudonymous member ids (never names or phone numbers), as the CRM assigns them.
A = "m-3f9a21c7"  # top of the referral chain
B = "m-8c41d0e2"  # referred by A; birthday this week
C = "m-b7e2c955"  # referred by B through the app's invite link
D = "m-51d6ae08"  # crosses the silver threshold
E = "m-e09b7f3d"  # a 30,000 CNY thermage makes her gold; then the 3,850 example
F = "m-2ac84f61"  # tries the new project after an on-time visit: the 2,350 example
G = "m-96fd3b1a"  # facial + massage combo, then a review
H = "m-47c0e9b5"  # partial refund
I = "m-d5138c6e"  # noqa: E741  # booked visits: a punctuality streak, then late
J = "m-0e6f52a9"  # signs in every day of the week
K = "m-a81f7d34"  # reviews: featured, suggestion adopted
L = "m-6b2e94f0"  # shares: approved, 10 likes, re-sent


@dataclass(frozen=True)
class DemoMember:
    member_id: str
    store_id: str
    story: str
    #: What the default rule set pays (available points) and the tier it ends in.
    expected_points: int
    expected_tier: str = "member"
    expected_spend: str = "0.00"


@dataclass
class Week:
    members: list[DemoMember]
    #: Sign-ups (member_registered, referral): sent first, as the CRM would before sales.
    signups: list[dict[str, Any]] = field(default_factory=list)
    #: The rest of the week in time order, including one exact redelivery.
    activity: list[dict[str, Any]] = field(default_factory=list)
    #: (key, raw value) of messages no schema accepts; they must end in the DLQ.
    malformed: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def event_count(self) -> int:
        return len(self.signups) + len(self.activity) + len(self.malformed)


MEMBERS: list[DemoMember] = [
    # 680 + 200 first purchase; sign-ins on 2 consecutive days 5 + 5; referrer of B +500;
    # indirect referrer of C +50.
    DemoMember(A, JINGAN, "refers B; B refers C", 680 + 200 + 10 + 500 + 50, "member", "680.00"),
    # Birthday month: 1,200 x 2 = 2,400 base + 200 first purchase (beats big-ticket 100)
    # + 500 as a referred new member; +500 as C's referrer; one sign-in +5.
    DemoMember(
        B, XUHUI, "referred by A, birthday week", 2400 + 200 + 500 + 500 + 5, "member", "1200.00"
    ),
    # 2,600 + 200 first purchase + 500 referred new member; 3 sign-ins 5 + 5 + 5.
    DemoMember(C, XUHUI, "referred by B (invite link)", 2600 + 200 + 500 + 15, "member", "2600.00"),
    # 6,000 + 600 big-ticket; 4,500 + 600 crossing 10,000 (old rate); 800 x 1.2 as silver.
    DemoMember(D, JINGAN, "crosses 10,000 CNY: silver", 6600 + 5100 + 960, "silver", "11300.00"),
    # 30,000 + 600 big-ticket (becomes gold); 2,500 x 1.5 + 100 = 3,850 (sent twice, paid
    # once); one sign-in +5.
    DemoMember(E, JINGAN, "gold: 2,500 CNY earns 3,850", 30600 + 3850 + 5, "gold", "32500.00"),
    # 600 + 200 first purchase; on-time visit 50 + 1,800 + 500 new project = 2,350.
    DemoMember(F, XUHUI, "new project after on-time visit", 800 + 2350, "member", "2400.00"),
    # 1,300 + 300 combo (largest of combo 300, first 200, big-ticket 100); review 50.
    DemoMember(G, XUHUI, "facial + massage combo", 1600 + 50, "member", "1300.00"),
    # 2,000 + 200 first purchase; refund of 800: base back to 1,200, bonus kept (200).
    DemoMember(H, JINGAN, "refunds 800 of 2,000 CNY", 1200 + 200, "member", "1200.00"),
    # 480 + 200 first; visits 50, 50, 50 + 200 streak; a late visit and a short-notice
    # booking earn nothing.
    DemoMember(I, JINGAN, "3 on-time visits, then late", 680 + 150 + 200, "member", "480.00"),
    # 7 consecutive daily sign-ins 7 x 5 + 20; a second sign-in the same day pays nothing.
    DemoMember(J, XUHUI, "signs in 7 days in a row", 35 + 20),
    # 380 + 200 first; review 50, re-sent featured +50; second review 50 + 200 adopted.
    DemoMember(K, JINGAN, "featured review, adopted idea", 580 + 100 + 250, "member", "380.00"),
    # 520 + 200 first; share approved 100; share reaching 10 likes 100; re-sent: nothing.
    DemoMember(L, XUHUI, "shares: approved, 10 likes", 720 + 200, "member", "520.00"),
]


class _Script:
    """Numbers the events of one run so ids are unique per run and stable within it."""

    def __init__(self, now: datetime, run: str) -> None:
        today = now.astimezone(SHANGHAI).date()
        self.days: list[date] = [today - timedelta(days=7 - k) for k in range(7)]
        self.run = run
        self.n = 0

    def at(self, day: int, hhmm: str) -> datetime:
        h, m = (int(x) for x in hhmm.split(":"))
        return datetime.combine(self.days[day], time(h, m), tzinfo=SHANGHAI)

    def event(
        self,
        type_: str,
        member: str,
        when: datetime,
        data: dict[str, Any],
        *,
        store: str | None,
        source: str,
    ) -> dict[str, Any]:
        self.n += 1
        return {
            "event_id": f"{source}-{self.run}-{self.n:03d}",
            "type": type_,
            "schema_version": 1,
            "occurred_at": when.isoformat(),
            "member_id": member,
            "store_id": store,
            "source": source,
            "data": data,
        }

    def order_id(self, store: str) -> str:
        return f"{store.removeprefix('sh-')}-{self.run}-{self.n + 1:03d}"


def _other_month(d: date) -> str:
    """A birthday half a year away from the week, so only B's purchase is in her month."""
    return f"{(d.month + 5) % 12 + 1:02d}-15"


def build_week(now: datetime, run: str) -> Week:
    s = _Script(now, run)
    week = Week(members=list(MEMBERS))
    home = {m.member_id: m.store_id for m in MEMBERS}
    off = _other_month(s.days[0])

    def register(member: str, day: int, hhmm: str, **data: Any) -> None:
        body = {"birthday": off, **data}
        week.signups.append(
            s.event(
                "member_registered", member, s.at(day, hhmm), body, store=home[member], source="crm"
            )
        )

    register(A, 0, "09:05")
    register(B, 0, "10:12", referrer_id=A, birthday=s.days[2].strftime("%m-%d"))
    register(D, 0, "11:20")
    register(E, 0, "13:40")
    register(F, 0, "15:02")
    register(G, 0, "16:30")
    register(H, 0, "17:45")
    register(I, 0, "18:10")
    register(J, 0, "08:00")
    register(K, 0, "19:20")
    register(L, 0, "20:05")
    register(C, 1, "16:40")
    week.signups.append(
        s.event("referral", C, s.at(1, "16:45"), {"referrer_id": B}, store=None, source="app")
    )

    events: list[dict[str, Any]] = []

    def purchase(member: str, day: int, hhmm: str, *items: tuple[str, str]) -> dict[str, Any]:
        store = home[member]
        total = sum(float(a) for _, a in items)
        data = {
            "order_id": s.order_id(store),
            "amount": f"{total:.2f}",
            "items": [
                {"project_code": code, "category": "treatment", "amount": amount}
                for code, amount in items
            ],
        }
        e = s.event("purchase", member, s.at(day, hhmm), data, store=store, source="pos")
        events.append(e)
        return e

    def refund(member: str, day: int, hhmm: str, order: dict[str, Any], amount: str) -> None:
        data = {"order_id": order["data"]["order_id"], "amount": amount}
        events.append(
            s.event("refund", member, s.at(day, hhmm), data, store=home[member], source="pos")
        )

    def sign_in(member: str, day: int, hhmm: str) -> None:
        events.append(
            s.event(
                "check_in", member, s.at(day, hhmm), {"kind": "sign_in"}, store=None, source="app"
            )
        )

    def visit(
        member: str, booked: datetime, slot: datetime, arrived: datetime | None, store: str
    ) -> None:
        data = {
            "kind": "visit",
            "booking_id": f"bk-{s.run}-{s.n + 1:03d}",
            "booked_at": booked.isoformat(),
            "slot_start": slot.isoformat(),
            "arrived_at": arrived.isoformat() if arrived else None,
        }
        events.append(
            s.event("check_in", member, arrived or slot, data, store=store, source="booking")
        )

    def review(member: str, day: int, hhmm: str, review_id: str, **data: Any) -> None:
        body = {"review_id": review_id, "rating": 5, "featured": False, **data}
        events.append(
            s.event("review", member, s.at(day, hhmm), body, store=home[member], source="app")
        )

    def share(member: str, day: int, hhmm: str, share_id: str, **data: Any) -> None:
        body = {"share_id": share_id, "channel": "wechat-moments", **data}
        events.append(s.event("share", member, s.at(day, hhmm), body, store=None, source="app"))

    # A and the referral chain.
    purchase(A, 0, "11:00", ("facial-package", "680.00"))
    sign_in(A, 2, "08:40")
    sign_in(A, 3, "08:35")
    purchase(B, 2, "14:00", ("hydrafacial", "1200.00"))  # her birthday month: base x 2
    sign_in(B, 4, "09:10")
    purchase(C, 3, "15:20", ("water-light", "2600.00"))  # pays C 500, B 500, A 50
    for day in (4, 5, 6):
        sign_in(C, day, "21:30")

    # D crosses the silver threshold with the second purchase; the third earns x 1.2.
    purchase(D, 1, "11:30", ("photo-rejuvenation", "6000.00"))
    purchase(D, 3, "13:00", ("thermage", "4500.00"))
    purchase(D, 5, "16:00", ("facial-package", "800.00"))

    # E: big-ticket, gold, then the 3,850 purchase, which the POS sends twice.
    purchase(E, 2, "10:00", ("thermage", "30000.00"))
    gold = purchase(E, 5, "11:00", ("facial-package", "2500.00"))
    events.append(dict(gold))  # an exact redelivery: the same event_id pays once
    sign_in(E, 5, "12:30")

    # F: a first purchase, then the new project right after an on-time booked visit.
    purchase(F, 1, "18:00", ("facial-basic", "600.00"))
    visit(F, s.at(3, "10:00"), s.at(4, "14:00"), s.at(4, "13:55"), XUHUI)
    purchase(F, 4, "15:30", ("gold-rf-microneedle", "1800.00"))

    # G: the facial + massage combo, reviewed that evening.
    combo = purchase(G, 2, "16:00", ("facial-basic", "880.00"), ("neck-shoulder-massage", "420.00"))
    review(G, 2, "20:00", f"rv-{s.run}-g1", order_id=combo["data"]["order_id"])

    # H: a partial refund takes back base points on the refunded part.
    order = purchase(H, 1, "14:00", ("water-light", "2000.00"))
    refund(H, 4, "10:00", order, "800.00")

    # I: three on-time visits booked a day ahead (streak bonus on the third), one at
    # 11:10 for an 11:00 slot is within the 15-minute grace; then a late one (resets the
    # streak) and one booked only two hours ahead (earns nothing, breaks nothing).
    visit(I, s.at(0, "08:00"), s.at(1, "10:00"), s.at(1, "09:50"), JINGAN)
    purchase(I, 1, "10:40", ("facial-package", "480.00"))
    visit(I, s.at(2, "09:00"), s.at(3, "11:00"), s.at(3, "11:10"), JINGAN)
    visit(I, s.at(4, "12:00"), s.at(5, "15:00"), s.at(5, "14:58"), JINGAN)
    visit(I, s.at(5, "09:00"), s.at(6, "10:00"), s.at(6, "10:40"), JINGAN)
    visit(I, s.at(6, "15:00"), s.at(6, "17:00"), s.at(6, "16:55"), JINGAN)

    # J: seven days in a row (+20 on the 7th), and a second tap on day 3.
    for day in range(7):
        sign_in(J, day, f"07:{10 + day:02d}")
    sign_in(J, 3, "22:15")

    # K: a review, re-sent once staff mark it featured (tops up to double), and a
    # suggestion the clinic adopts (+200, not capped).
    purchase(K, 1, "12:00", ("hydrafacial", "380.00"))
    review(K, 1, "20:00", f"rv-{s.run}-k1")
    review(K, 2, "09:30", f"rv-{s.run}-k1", featured=True)
    review(K, 4, "19:00", f"rv-{s.run}-k2", rating=4, suggestion_adopted=True)

    # L: one share approved by staff, one that pays when it reaches 10 likes, and the
    # approved one re-sent later (pays nothing more).
    purchase(L, 2, "11:00", ("facial-package", "520.00"))
    share(L, 2, "12:00", f"sh-{s.run}-l1", approved=True, likes=2)
    share(L, 3, "12:00", f"sh-{s.run}-l2", approved=False, likes=4)
    share(L, 3, "21:00", f"sh-{s.run}-l2", approved=False, likes=10)
    share(L, 4, "10:00", f"sh-{s.run}-l1", approved=True, likes=15)

    week.activity = sorted(events, key=lambda e: e["occurred_at"])
    # A POS that lost its connection mid-write: the JSON is cut off.
    broken = f'{{"event_id": "pos-{run}-torn", "type": "purchase", "member_id": "{H}", "da'
    week.malformed.append((H, broken.encode()))
    return week
