"""The indirect referral bonus follows event time, whichever partition is consumed first.

Each scenario publishes the referee's events, waits until the rules service has applied
them, and only then the referrer's own registration: the order a lagging partition (a
backfill, a replay) produces. The journal must end as a time-ordered replay would have it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from services.rules.emit import fast_grant_id
from tests.integration.events import CST, purchase, referral, refund, registered
from tests.integration.harness import Stack, wait_until

pytestmark = pytest.mark.integration


async def _entries(stack: Stack, source_event_id: str) -> set[tuple[str, str, str, int]]:
    rows = await stack.fetch(
        "SELECT entry_id, member_id, rule_id, points FROM ledger_entries"
        " WHERE source_event_id = $1",
        source_event_id,
    )
    return {(r["entry_id"], r["member_id"], r["rule_id"], r["points"]) for r in rows}


async def _applied(stack: Stack, event_ids: list[str]) -> bool:
    n = await stack.scalar(
        "SELECT count(*) FROM rules_activity WHERE event_id = ANY($1::text[])", event_ids
    )
    return bool(n == len(event_ids))


async def test_referrers_registration_after_the_referees_purchase(stack: Stack) -> None:
    day = datetime.now(CST).replace(microsecond=0) - timedelta(days=3)
    # Chain 1: C refers A (on day 0), A refers B; B buys on day 1. A's registration is
    # applied only after B's purchase: C is still paid, late, with the on-time grant id.
    b_joined = registered("rc-B", day + timedelta(hours=1), referrer="rc-A")
    b_bought = purchase("rc-B", "800.00", day + timedelta(days=1), order_id="rc-order-B")
    # Chain 2: E refers D, D buys on day 1, and only on day 2 does F refer E: too late for
    # D's purchase, so F gets nothing, even though E's referral is applied first.
    e_referred = referral("rc-E", "rc-F", day + timedelta(days=2))
    d_joined = registered("rc-D", day + timedelta(hours=1), referrer="rc-E")
    d_bought = purchase("rc-D", "800.00", day + timedelta(days=1), order_id="rc-order-D")

    await stack.produce([b_joined, b_bought, e_referred])
    ids = [b_joined["event_id"], b_bought["event_id"], e_referred["event_id"]]
    await wait_until(lambda: _applied(stack, ids), what="B's purchase and E's referral")
    await stack.produce([d_joined, d_bought])
    await wait_until(
        lambda: _applied(stack, [d_joined["event_id"], d_bought["event_id"]]),
        what="D's purchase",
    )
    # The referrer's own registration arrives last, dated before B's purchase.
    a_joined = registered("rc-A", day, referrer="rc-C")
    await stack.produce([a_joined])

    late_id = fast_grant_id(b_bought["event_id"], "referral_indirect", "rc-C", "grant")

    async def late_paid() -> bool:
        entries = await _entries(stack, b_bought["event_id"])
        return any(e[1] == "rc-C" for e in entries)

    await wait_until(late_paid, what="C's late indirect bonus")
    b_entries = await _entries(stack, b_bought["event_id"])
    assert {(m, r, p) for _, m, r, p in b_entries} >= {
        ("rc-B", "referral_new_member", 500),
        ("rc-A", "referral_referrer", 500),
        ("rc-C", "referral_indirect", 50),
    }
    assert (late_id, "rc-C", "referral_indirect", 50) in b_entries
    d_entries = await _entries(stack, d_bought["event_id"])
    assert {(m, r) for _, m, r, _ in d_entries if r.startswith("referral_")} == {
        ("rc-D", "referral_new_member"),
        ("rc-E", "referral_referrer"),
    }

    # A full refund of B's order takes the late bonus back, as it would one paid on time.
    b_refund = refund("rc-B", "rc-order-B", "800.00", day + timedelta(days=2))
    await stack.produce([b_refund])

    async def revoked() -> list[tuple[str, str, int]]:
        return [
            (m, r, p) for _, m, r, p in await _entries(stack, b_refund["event_id"]) if m == "rc-C"
        ]

    assert await wait_until(revoked, what="the late bonus revoked") == [
        ("rc-C", "referral_indirect", -50)
    ]
    c_total = "SELECT coalesce(sum(points), 0) FROM ledger_entries WHERE member_id = 'rc-C'"
    assert await stack.scalar(c_total) == 0
    # Nothing was paid twice: one grant per (source, member, rule).
    dupes = await stack.scalar(
        "SELECT count(*) FROM (SELECT source_event_id, member_id, rule_id FROM ledger_entries"
        " WHERE kind = 'earn' GROUP BY 1, 2, 3 HAVING count(*) > 1) d"
    )
    assert dupes == 0


async def test_a_referee_who_joins_and_buys_in_one_batch_pays_the_known_chain(
    stack: Stack,
) -> None:
    day = datetime.now(CST).replace(microsecond=0) - timedelta(days=3)
    a_joined = registered("rc2-A", day, referrer="rc2-C")
    await stack.produce([a_joined])
    await wait_until(lambda: _applied(stack, [a_joined["event_id"]]), what="A's sign-up")
    # B's sign-up names A, and B buys at once: one batch, in which A was never loaded as
    # anyone's referrer before; A's own referrer must still be looked up.
    b_joined = registered("rc2-B", day + timedelta(hours=1), referrer="rc2-A")
    b_bought = purchase("rc2-B", "800.00", day + timedelta(hours=2))
    await stack.produce([b_joined, b_bought])

    async def paid() -> set[tuple[str, str, int]]:
        return {(m, r, p) for _, m, r, p in await _entries(stack, b_bought["event_id"])}

    expected = {
        ("rc2-B", "referral_new_member", 500),
        ("rc2-A", "referral_referrer", 500),
        ("rc2-C", "referral_indirect", 50),
    }
    await wait_until(lambda: _contains(paid, expected), what="the three referral grants")


async def _contains(probe, expected: set) -> bool:  # type: ignore[no-untyped-def]
    return expected <= await probe()
