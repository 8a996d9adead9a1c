-- When the rules service's tier sweep must next look at each member
-- (services/rules/tier_sweeper.py): the tier's end or, if sooner, the moment the spend last
-- reported to the ledger changes by time alone (an order leaves the 12-month window).
-- Nothing else reports that change, so a member who stopped coming kept showing the spend
-- of their last purchase, and too little still needed for the next tier, for good.
-- Written with the state from each tier report (`engine.tier_due`); the sweep reads it.
ALTER TABLE rules_member_state ADD COLUMN tier_due_at timestamptz;

-- Existing members: due at their tier's end, as before; and every member whose state
-- holds spend (orders, or forgotten orders' spend) due once now, so the sweep reports
-- their spend as it stands and from then on whenever it changes (members who hold none
-- have no spend that could change).
UPDATE rules_member_state
SET tier_due_at = CASE
        WHEN state -> 'orders' IS NOT NULL OR state -> 'spend_history' IS NOT NULL
        THEN LEAST(tier_valid_until, now())
        ELSE tier_valid_until
    END
WHERE tier_valid_until IS NOT NULL
   OR state -> 'orders' IS NOT NULL
   OR state -> 'spend_history' IS NOT NULL;

-- The sweep now reads the due moment, not the tier's end: the index follows (same name).
DROP INDEX rules_member_state_tier_due;
CREATE INDEX rules_member_state_tier_due ON rules_member_state (tier_due_at, member_id)
    WHERE tier_due_at IS NOT NULL;
