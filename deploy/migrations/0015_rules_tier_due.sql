-- When each member's tier lapses, as a column the rules service's tier sweep can find
-- (services/rules/tier_sweeper.py): a member who stops coming would otherwise keep a
-- lapsed tier until their next event. Written with the state by every writer of
-- rules_member_state; copied from the state documents once here.

ALTER TABLE rules_member_state ADD COLUMN tier_valid_until timestamptz;
-- The activity partition the member's events arrive on (their key is the member): each
-- rules instance sweeps the members of the partitions it consumes, once it has caught up
-- with them. NULL (rows from before, members only a held release wrote): any instance.
ALTER TABLE rules_member_state ADD COLUMN activity_partition integer;

UPDATE rules_member_state
SET tier_valid_until = (state ->> 'tier_valid_until')::timestamptz
WHERE state ->> 'tier_valid_until' IS NOT NULL;

-- Only members who hold a tier: most hold none, and the sweep reads them in order.
CREATE INDEX rules_member_state_tier_due ON rules_member_state (tier_valid_until, member_id)
    WHERE tier_valid_until IS NOT NULL;
