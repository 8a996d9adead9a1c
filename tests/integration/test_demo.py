"""`make demo`'s scripted week through the real services, on both brokers, in CI.

The demo itself binds the fixed ports of `make up`; this drives the same week (the same
`build_week`, the same sign-ups-first publishing and the same wait) through the harness
stack instead, and checks what a clinic owner would look at.
"""

from __future__ import annotations

import uuid
from datetime import datetime

import pytest

from deploy.demo import check_members, drive_week
from deploy.demo_week import SHANGHAI, A, B, C, D, E, H, build_week
from services.common.config import KafkaAccess
from tests.integration.harness import Stack

pytestmark = pytest.mark.integration


async def test_the_demo_week_comes_out_as_scripted(stack: Stack) -> None:
    week = build_week(datetime.now(SHANGHAI), uuid.uuid4().hex[:6])
    kafka = KafkaAccess(stack.bootstrap)
    await drive_week(week, kafka, stack.dsn, stack.topics, partitions=6, timeout=120)

    docs = {
        m.member_id: (await stack.get(f"/v1/members/{m.member_id}")).json() for m in week.members
    }
    assert check_members(week, docs) == []
    assert docs[D]["tier"] == "silver"
    assert docs[E]["tier"] == "gold"

    # The referral chain: C's first purchase pays C and her referrer B 500 each, and B's
    # own referrer A 50, all traced to that one purchase.
    c_purchase = next(e for e in week.activity if e["member_id"] == C and e["type"] == "purchase")
    referral = await stack.fetch(
        "SELECT member_id, rule_id, points FROM ledger_entries"
        " WHERE source_event_id = $1 AND rule_id LIKE 'referral_%'",
        c_purchase["event_id"],
    )
    assert {(r["member_id"], r["rule_id"], r["points"]) for r in referral} == {
        (C, "referral_new_member", 500),
        (B, "referral_referrer", 500),
        (A, "referral_indirect", 50),
    }

    # The gold member's 2,500 CNY purchase, delivered twice, earns 3,850 once.
    gold = [
        e for e in week.activity if e["member_id"] == E and e["data"].get("amount") == "2500.00"
    ]
    assert len(gold) == 2
    assert gold[0]["event_id"] == gold[1]["event_id"]
    paid = await stack.fetch(
        "SELECT rule_id, points FROM ledger_entries WHERE source_event_id = $1",
        gold[0]["event_id"],
    )
    assert {r["rule_id"]: r["points"] for r in paid} == {"base": 3750, "big_ticket": 100}

    # The partial refund takes back the base points of the refunded 800 CNY only.
    revoked = await stack.fetch(
        "SELECT rule_id, points FROM ledger_entries WHERE member_id = $1 AND kind = 'revoke'", H
    )
    assert [(r["rule_id"], r["points"]) for r in revoked] == [("base", -800)]

    # The torn POS message is in the DLQ with its original bytes; nothing else is.
    dead = await stack.fetch("SELECT reason, original FROM dead_letters")
    assert len(dead) == 1
    assert dead[0]["reason"].startswith("malformed JSON")
    assert bytes(dead[0]["original"]) == week.malformed[0][1]
    on_topic = await stack.read_topic(stack.topics.dlq, expect=1)
    assert len(on_topic) == 1

    # Members are told about both upgrades, in Chinese.
    tiers = await stack.fetch(
        "SELECT member_id, message FROM notifications WHERE kind = 'tier_changed' ORDER BY 1"
    )
    assert [(r["member_id"], r["message"]) for r in tiers] == sorted(
        [(D, "恭喜您由普通会员升级为银卡会员！"), (E, "恭喜您由普通会员升级为金卡会员！")]
    )
    # One notification per earning entry plus the two upgrades.
    earned = await stack.scalar("SELECT count(*) FROM ledger_entries WHERE kind = 'earn'")
    assert await stack.scalar("SELECT count(*) FROM notifications") == earned + 2
