-- The indirect referral bonus is decided by event time across partitions
-- (services/rules/referral_chain.py): when a member's referrer was set, and every first
-- purchase that paid a referral, so a referrer's registration processed after a referee's
-- purchase still pays (or rightly does not pay) the referrer's referrer.

ALTER TABLE rules_member_state ADD COLUMN referrer_since timestamptz;

CREATE TABLE rules_referrals (
    new_member_id      text PRIMARY KEY,
    referrer_id        text        NOT NULL,
    purchase_event_id  text        NOT NULL,
    order_id           text        NOT NULL,
    occurred_at        timestamptz NOT NULL,
    ruleset_version    text        NOT NULL,
    -- Who got the indirect bonus, and whether it was paid after the purchase was
    -- evaluated (the referrer's referrer learnt later); NULL: not paid (yet).
    indirect_member_id text,
    indirect_rule_id   text,
    indirect_points    integer,
    indirect_late      boolean     NOT NULL DEFAULT false,
    -- The refund that took the whole order back, if one did.
    refund_event_id    text
);
CREATE INDEX rules_referrals_unpaid ON rules_referrals (referrer_id) WHERE indirect_member_id IS NULL;
