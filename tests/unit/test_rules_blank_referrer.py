"""A registration whose `referrer_id` is blank names no referrer. A till that sends `""`
for "nobody" paid the new member the referral bonus and, since the referrer's grant went to
`member_id or event.member_id`, the referrer's 500 to the same member: 1,000 points for a
referral that never happened."""

from __future__ import annotations

from rules_factories import DEFAULT, T0, by_rule, purchase, referral, registered, state_with

from schemas.activity import MemberRegistered
from services.rules.engine import evaluate
from services.rules.state import MemberState


def test_a_blank_referrer_is_no_referrer() -> None:
    event = registered("m-1", referrer="")
    assert isinstance(event, MemberRegistered)
    assert event.data.referrer_id is None
    state = evaluate(MemberState(member_id="m-1"), event, DEFAULT, {}).state
    assert state.referrer_id is None
    grants = evaluate(state, purchase("m-1", 100, at=T0), DEFAULT, {}).grants
    assert by_rule(grants) == {"base": 100, "first_purchase": 200}
    assert {g.member_id for g in grants} == {"m-1"}


def test_a_blank_referrer_stored_before_the_fix_pays_nothing() -> None:
    state = state_with("m-1", referrer_id="")
    grants = evaluate(state, purchase("m-1", 100, at=T0), DEFAULT, {"": "m-9"}).grants
    assert by_rule(grants) == {"base": 100, "first_purchase": 200}
    assert {g.member_id for g in grants} == {"m-1"}


def test_a_referrers_blank_referrer_stored_before_the_fix_pays_no_indirect_bonus() -> None:
    joined = evaluate(MemberState(member_id="m-B"), registered("m-B", referrer="m-A"), DEFAULT, {})
    grants = evaluate(joined.state, purchase("m-B", 100, at=T0), DEFAULT, {"m-A": ""}).grants
    assert by_rule(grants, "m-B") == {"base": 100, "first_purchase": 200,
                                      "referral_new_member": 500}  # fmt: skip
    assert by_rule(grants, "m-A") == {"referral_referrer": 500}


def test_a_blank_referrer_stored_before_the_fix_lets_a_later_referral_name_one() -> None:
    state = state_with("m-1", referrer_id="")
    named = evaluate(state, referral("m-1", "m-9"), DEFAULT, {}).state
    assert named.referrer_id == "m-9"
