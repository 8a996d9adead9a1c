"""The event-time parts of the indirect referral bonus (`services.rules.referral_chain`).

What a batch sees and records is pure; the late payment itself runs against Postgres and
is covered by tests/integration/test_referral_chain.py.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.grants import PointsGranted
from services.rules import referral_chain as chain
from services.rules.engine import evaluate
from services.rules.ruleset import RuleBook
from services.rules.state import MemberState
from tests.unit.rules_factories import (
    DEFAULT,
    T0,
    purchase,
    referral,
    refund,
    registered,
    sign_in,
)

BOOK = RuleBook([DEFAULT])
DAY = timedelta(days=1)


def _joined(member: str, referrer: str) -> MemberState:
    state = MemberState(member_id=member)
    return evaluate(state, registered(member, referrer=referrer), DEFAULT, {}).state


def test_a_referrers_referrer_counts_only_from_when_it_was_set() -> None:
    b = _joined("B", "A")
    buy = purchase("B", 800, at=T0 + DAY)
    referrers: dict[str, str | None] = {"A": "C"}
    at_or_before = {"A": T0 + DAY}
    assert chain.as_of(referrers, at_or_before, b, buy) is referrers
    assert chain.as_of(referrers, {"A": None}, b, buy) is referrers  # set before we kept times
    after = chain.as_of(referrers, {"A": T0 + 2 * DAY}, b, buy)
    assert after == {"A": None}
    assert referrers == {"A": "C"}  # the batch's own map is not changed

    def indirect(refs: dict[str, str | None]) -> list[str]:
        grants = evaluate(b, buy, DEFAULT, refs).grants
        paid = [g for g in grants if isinstance(g, PointsGranted)]
        return [g.member_id for g in paid if g.data.rule_id == "referral_indirect"]

    assert indirect(chain.as_of(referrers, at_or_before, b, buy)) == ["C"]
    assert indirect(after) == []


def test_only_a_first_purchase_with_a_referral_due_is_looked_at() -> None:
    referrers: dict[str, str | None] = {"A": "C"}
    late = {"A": T0 + 9 * DAY}
    b = _joined("B", "A")
    assert chain.as_of(referrers, late, b, sign_in("B", at=T0 + DAY)) is referrers
    paid = evaluate(b, purchase("B", 800, at=T0 + DAY), DEFAULT, {}).state
    assert chain.as_of(referrers, late, paid, purchase("B", 300, at=T0 + 2 * DAY)) is referrers
    lone = MemberState(member_id="Z")
    assert chain.as_of(referrers, late, lone, purchase("Z", 300)) is referrers


def test_the_batch_locks_who_may_get_a_referrer_and_the_referrers_of_buyers() -> None:
    events = [
        registered("N", referrer="R"),  # N may get a referrer now: N is locked
        purchase("B"),  # B's referrer is known: A is locked
        registered("D", referrer="E"),
        refund("D", "o-1", 10),  # D refunds, its referrer named in the batch: E too
        sign_in("S"),  # nothing to do with referrals
    ]
    assert chain.members_to_lock(events, {"B": "A", "S": "T"}) == ["A", "D", "E", "N"]
    assert chain.named_referrers(events) == {"R", "E"}
    assert chain.lock_key("A") == chain.lock_key("A") != chain.lock_key("B")
    assert -(2**63) <= chain.lock_key("A") < 2**63


def test_a_buyer_whose_first_naming_is_ignored_locks_the_referrer_the_engine_takes() -> None:
    # B names itself (ignored: nobody refers themselves), then A, and buys: A is B's
    # referrer, so A's lock must be held or A's own sign-up on another partition could miss
    # this purchase while it misses A's referrer.
    events = [registered("B", referrer="B"), referral("B", "A"), purchase("B")]
    state = MemberState(member_id="B")
    for e in events[:2]:
        state = evaluate(state, e, DEFAULT, {}).state
    assert state.referrer_id == "A"
    assert "A" in chain.members_to_lock(events, {})


def test_observe_records_referral_purchases_full_refunds_and_referrers_set() -> None:
    work = chain.ChainWork()
    before = MemberState(member_id="B")
    join = registered("B", referrer="A", at=T0)
    joined = evaluate(before, join, DEFAULT, {})
    work.observe(before, joined.state, join, BOOK, joined.grants)
    assert work.referrer_set == {"B": T0}

    buy = purchase("B", 800, at=T0 + DAY, order_id="o-B")
    bought = evaluate(joined.state, buy, DEFAULT, {"A": "C"})
    work.observe(joined.state, bought.state, buy, BOOK, bought.grants)
    (row,) = work.referrals
    assert row == ("B", "A", buy.event_id, "o-B", T0 + DAY, DEFAULT.version,
                   "C", "referral_indirect", 50)  # fmt: skip

    half = refund("B", "o-B", 400, at=T0 + 2 * DAY)
    halved = evaluate(bought.state, half, DEFAULT, {})
    work.observe(bought.state, halved.state, half, BOOK, halved.grants)
    assert work.refunds == {}  # a partial refund keeps the referral
    rest = refund("B", "o-B", 400, at=T0 + 3 * DAY)
    gone = evaluate(halved.state, rest, DEFAULT, {})
    work.observe(halved.state, gone.state, rest, BOOK, gone.grants)
    assert work.refunds == {("B", "o-B"): rest}


def test_a_referral_purchase_without_a_known_chain_is_recorded_unpaid() -> None:
    work = chain.ChainWork()
    b = _joined("B", "A")
    buy = purchase("B", 800, at=datetime(2026, 3, 3, 9, 0, tzinfo=T0.tzinfo))
    bought = evaluate(b, buy, DEFAULT, {})  # A not known yet
    work.observe(b, bought.state, buy, BOOK, bought.grants)
    (row,) = work.referrals
    assert row[1] == "A"
    assert row[6:] == (None, None, None)


class _StoredPurchaseConn:
    """The two reads of `ChainWork._late`: B's unpaid referral row, and B's purchase as
    `rules_activity` stored it, taken before the 200-character bound on ids."""

    purchase = json.dumps(
        {"event_id": "p-1", "type": "purchase", "occurred_at": "2026-03-02T10:00:00+08:00",
         "member_id": "B", "store_id": "store-" + "x" * 250,
         "data": {"order_id": "o-1", "amount": "3000.00", "items": []}}
    ).encode()  # fmt: skip

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        if sql == chain.SELECT_UNPAID:
            return [{"new_member_id": "B", "referrer_id": "A", "purchase_event_id": "p-1",
                     "order_id": "o-1", "occurred_at": datetime(2026, 3, 2, 2, tzinfo=UTC),
                     "ruleset_version": None, "refund_event_id": None}]  # fmt: skip
        if sql == chain.SELECT_EVENTS:
            return [{"event_id": "p-1", "payload": self.purchase}]
        raise AssertionError(sql)

    async def execute(self, sql: str, *args: Any) -> None:
        return None


def test_a_late_bonus_reads_a_purchase_stored_before_the_bounds() -> None:
    """Refused under the bound, the purchase failed the batch that set A's referrer: A's
    own registration was dead-lettered and C's indirect bonus never paid."""
    work = chain.ChainWork()
    work.referrer_set["A"] = datetime(2026, 3, 1, tzinfo=UTC)  # A names C, late
    grants = asyncio.run(
        work.apply(_StoredPurchaseConn(), RuleBook([DEFAULT]), {"A": "C", "B": "A"})
    )
    paid = [g for g in grants if isinstance(g, PointsGranted)]
    assert [(g.member_id, g.data.rule_id) for g in paid] == [("C", "referral_indirect")]
