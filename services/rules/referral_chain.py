"""The indirect referral bonus across partitions, decided by event time.

The bonus to a referrer's own referrer (C), paid on the new member's (B) first purchase,
depends on another member's history: whether the referrer (A) had a referrer at the
purchase's `occurred_at`. A's events are on another partition, consumed at its own pace,
so when B's purchase is evaluated A's registration may not have been processed yet (a
backfill, a replay, one partition behind the others). Paying by "what happens to be
known" made the journal differ from run to run. Three steps make it the answer of a replay
in time order, which is what `rules simulate` computes:

1. At B's first purchase, A's referrer counts only if it was set at or before the
   purchase (`rules_member_state.referrer_since`). Every first purchase that pays a
   referral is recorded in `rules_referrals`, with the indirect payee when one was paid.
2. When A's referrer is set (at `since`), each recorded first purchase of A's referees at
   or after `since` that paid no indirect bonus pays it now: the same grant, with the same
   id, that step 1 would have made had A's registration come first.
3. A full refund of such a purchase takes a late bonus back, as the evaluator does for one
   paid on time; a late bonus for a purchase already fully refunded is granted and revoked
   at once, so the grants are those of the time-ordered replay.

Steps 2 and 3 rebuild the grants from the purchase (and refund) kept in `rules_activity`.
Ops may trim old rows there (README: Trimming kept activity): a late bonus whose purchase
or full refund is gone is skipped and logged (`referral_late_event_missing`), not paid
without its take-back, and the referrer's sign-up is applied all the same.

Both sides hold a transaction-scoped advisory lock on A, taken in sorted order after the
batch's own member rows (each partition's members are locked by one consumer only), so a
purchase and the referrer's registration applied at the same moment on two partitions
cannot both miss each other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import asyncpg
import structlog

from schemas.activity import MemberRegistered, Purchase, Referral, Refund, parse_activity
from schemas.grants import GrantEvent, PointsGranted
from services.rules.emit import GRANT, REVOKE, grant_events
from services.rules.ruleset import RuleBook
from services.rules.state import MemberState

LOCK: Final = "SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS k"
SELECT_CHAIN: Final = """
SELECT member_id, referrer_id, referrer_since FROM rules_member_state
WHERE member_id = ANY($1::text[])
"""
INSERT_REFERRALS: Final = """
INSERT INTO rules_referrals (new_member_id, referrer_id, purchase_event_id, order_id,
                             occurred_at, ruleset_version, indirect_member_id,
                             indirect_rule_id, indirect_points)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
                     $6::text[], $7::text[], $8::text[], $9::int[])
ON CONFLICT (new_member_id) DO NOTHING
"""
SELECT_REFUNDED: Final = """
SELECT new_member_id, order_id, refund_event_id, indirect_member_id, indirect_rule_id,
       indirect_points, indirect_late, ruleset_version
FROM rules_referrals WHERE new_member_id = ANY($1::text[])
"""
MARK_REFUNDED: Final = """
UPDATE rules_referrals SET refund_event_id = u.e
FROM unnest($1::text[], $2::text[]) AS u(m, e)
WHERE new_member_id = u.m AND refund_event_id IS NULL
"""
SELECT_UNPAID: Final = """
SELECT new_member_id, referrer_id, purchase_event_id, order_id, occurred_at,
       ruleset_version, refund_event_id
FROM rules_referrals
WHERE referrer_id = ANY($1::text[]) AND indirect_member_id IS NULL
ORDER BY occurred_at, new_member_id
"""
MARK_PAID_LATE: Final = """
UPDATE rules_referrals SET indirect_member_id = u.c, indirect_rule_id = u.r,
                           indirect_points = u.p, indirect_late = true
FROM unnest($1::text[], $2::text[], $3::text[], $4::int[]) AS u(m, c, r, p)
WHERE new_member_id = u.m
"""
SELECT_EVENTS: Final = "SELECT event_id, payload FROM rules_activity WHERE event_id = ANY($1)"
log = structlog.get_logger()


def lock_key(member_id: str) -> int:
    """A stable signed 64-bit advisory lock key per member (Python's hash() is salted)."""
    digest = hashlib.blake2b(f"referral:{member_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def members_to_lock(events: Iterable[Any], referrers: Mapping[str, str | None]) -> list[str]:
    """Who the batch must lock: members who may get a referrer (step 2), and the referrers
    of members who purchase or refund (steps 1 and 3), named in the batch or known. Every
    referrer a member is named with counts, not just the first: the engine skips a naming
    it ignores (a self-referral) and takes the next one."""
    named: set[tuple[str, str]] = set()
    paying: set[str] = set()
    for e in events:
        if isinstance(e, MemberRegistered | Referral) and e.data.referrer_id is not None:
            named.add((e.member_id, e.data.referrer_id))
        elif isinstance(e, Purchase | Refund):
            paying.add(e.member_id)
    wanted = {m for m, _ in named} | {r for m, r in named if m in paying}
    wanted |= {r for m in paying if (r := referrers.get(m)) is not None}
    return sorted(wanted)


def named_referrers(events: Iterable[Any]) -> set[str]:
    """Referrers that the batch's sign-ups and referral events name: a member who joins
    and buys within one batch needs their referrer's own referrer as much as any other."""
    return {
        e.data.referrer_id
        for e in events
        if isinstance(e, MemberRegistered | Referral) and e.data.referrer_id is not None
    }


async def lock(conn: asyncpg.Connection, members: Iterable[str]) -> None:
    keys = sorted({lock_key(m) for m in members})
    if keys:
        await conn.execute(LOCK, keys)


def as_of(
    referrers: dict[str, str | None],
    since: Mapping[str, datetime | None],
    state: MemberState,
    event: Any,
) -> dict[str, str | None]:
    """The referrer map a purchase may see (step 1): the referrer's referrer only if it was
    set by the purchase's time. Usually `referrers` itself, unchanged."""
    if not isinstance(event, Purchase):
        return referrers
    referrer = state.referrer_id
    if referrer is None or state.referral_paid or state.first_purchase_done:
        return referrers
    at = since.get(referrer)
    if at is None or at <= event.occurred_at or referrers.get(referrer) is None:
        return referrers
    return {**referrers, referrer: None}


@dataclass
class ChainWork:
    """What a batch learned about referrals, applied after its events are evaluated."""

    referrals: list[tuple[Any, ...]] = field(default_factory=list)
    # Keyed by order too: a member may refund several orders in full in one batch, and only
    # the first purchase's refund (the order recorded in `rules_referrals`) counts.
    refunds: dict[tuple[str, str], Refund] = field(default_factory=dict)
    referrer_set: dict[str, datetime] = field(default_factory=dict)

    def observe(
        self, before: MemberState, after: MemberState, event: Any, book: RuleBook,
        grants: Iterable[GrantEvent],
    ) -> None:  # fmt: skip
        """Called with each evaluated event: notes what steps 1-3 need."""
        if isinstance(event, Purchase):
            order = after.orders.get(event.data.order_id)
            # A purchase already refunded in full (its refund came first) paid no referral,
            # and none is owed late: in time order it was granted and taken back.
            refunded = order is not None and order.net <= 0
            if (
                not before.referral_paid
                and after.referral_paid
                and after.referrer_id
                and (not refunded)
            ):
                ruleset = book.at(event.occurred_at)
                rule = ruleset.rule_ids.referral_indirect
                paid = [g for g in grants if isinstance(g, PointsGranted)
                        and g.data.rule_id == rule]  # fmt: skip
                self.referrals.append((
                    event.member_id, after.referrer_id, event.event_id, event.data.order_id,
                    event.occurred_at, ruleset.version,
                    paid[0].member_id if paid else None,
                    rule if paid else None,
                    paid[0].data.points if paid else None,
                ))  # fmt: skip
        elif isinstance(event, Refund):
            order = after.orders.get(event.data.order_id)
            was = before.orders.get(event.data.order_id)
            if order is not None and was is not None and was.net > 0 >= order.net:
                self.refunds.setdefault((event.member_id, event.data.order_id), event)
        if before.referrer_id is None and after.referrer_id is not None:
            self.referrer_set[event.member_id] = event.occurred_at

    async def apply(
        self, conn: asyncpg.Connection, book: RuleBook, referrers: Mapping[str, str | None]
    ) -> list[GrantEvent]:
        """Record the batch's referral purchases, then steps 3 and 2; the extra grants."""
        out: list[GrantEvent] = []
        if self.referrals:
            await conn.execute(INSERT_REFERRALS, *map(list, zip(*self.referrals, strict=True)))
        if self.refunds:
            out += await self._refunds(conn, book)
        if self.referrer_set:
            out += await self._late(conn, book, referrers)
        return out

    async def _refunds(self, conn: asyncpg.Connection, book: RuleBook) -> list[GrantEvent]:
        out: list[GrantEvent] = []
        marked: list[tuple[str, str]] = []
        members = sorted({m for m, _ in self.refunds})
        for r in await conn.fetch(SELECT_REFUNDED, members):
            refund = self.refunds.get((r["new_member_id"], r["order_id"]))
            if refund is None or r["refund_event_id"] is not None:
                continue
            marked.append((r["new_member_id"], refund.event_id))
            if r["indirect_late"]:
                # Paid on time, the evaluator's own refund takes it back; paid late, here.
                payout = (REVOKE, r["indirect_member_id"], r["indirect_rule_id"],
                          r["indirect_points"], r["order_id"], r["ruleset_version"])  # fmt: skip
                out += grant_events(refund, book.at(refund.occurred_at), [payout])
        if marked:
            await conn.execute(MARK_REFUNDED, [m for m, _ in marked], [e for _, e in marked])
        return out

    async def _late(
        self, conn: asyncpg.Connection, book: RuleBook, referrers: Mapping[str, str | None]
    ) -> list[GrantEvent]:
        rows = [
            r
            for r in await conn.fetch(SELECT_UNPAID, sorted(self.referrer_set))
            if r["occurred_at"] >= self.referrer_set[r["referrer_id"]]
        ]
        if not rows:
            return []
        ids = {r["purchase_event_id"] for r in rows}
        ids |= {r["refund_event_id"] for r in rows if r["refund_event_id"] is not None}
        events = {
            e["event_id"]: parse_activity(bytes(e["payload"]), stored=True)
            for e in await conn.fetch(SELECT_EVENTS, sorted(ids))
        }
        out: list[GrantEvent] = []
        paid: list[tuple[str, str, str, int]] = []
        for r in rows:
            referrer, member = r["referrer_id"], r["new_member_id"]
            indirect = referrers.get(referrer)
            ruleset = book.at(r["occurred_at"])  # the purchase's moment
            rule, points = ruleset.rule_ids.referral_indirect, ruleset.referral.indirect_points
            # Falsy, not None: a referrer's blank referrer stored before registrations
            # refused it names nobody (it paid the bonus to the buyer).
            if not indirect or indirect in {referrer, member} or points <= 0:
                continue
            # Trimmed by ops: without the purchase there is no grant id to pay under, and
            # without its full refund the bonus would be paid for a refunded order.
            needed = [i for i in (r["purchase_event_id"], r["refund_event_id"]) if i]
            if missing := [i for i in needed if i not in events]:
                log.warning("referral_late_event_missing", member_id=member,
                            referrer_id=referrer, indirect_member_id=indirect,
                            order_id=r["order_id"], event_ids=needed, missing=missing)  # fmt: skip
                continue
            purchase = events[r["purchase_event_id"]]
            # Exactly the payout `purchase_rules.on_purchase` makes, hence the same grant id.
            out += grant_events(
                purchase, ruleset, [(GRANT, indirect, rule, points, r["order_id"], None)]
            )
            if r["refund_event_id"] is not None:
                refund = events[r["refund_event_id"]]
                payout = (REVOKE, indirect, rule, points, r["order_id"], ruleset.version)
                out += grant_events(refund, book.at(refund.occurred_at), [payout])
            paid.append((member, indirect, rule, points))
        if paid:
            await conn.execute(MARK_PAID_LATE, *map(list, zip(*paid, strict=True)))
        return out
