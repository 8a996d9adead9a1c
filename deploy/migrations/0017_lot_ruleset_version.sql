-- A lot remembers the rule-set version of the grant that created it, so the expiry and the
-- expiry warnings it causes carry "rule id and rule set version" as every ledger event must
-- (CONTRACT.md); that version also decided the lot's lifetime. Adjustments have none.
-- Existing lots with points left take it from their creating entry (lot_id = entry_id);
-- emptied lots are never read again and keep NULL.

ALTER TABLE ledger_lots ADD COLUMN ruleset_version text;

UPDATE ledger_lots AS l SET ruleset_version = e.ruleset_version
FROM ledger_entries AS e
WHERE e.entry_id = l.lot_id AND l.remaining > 0 AND e.ruleset_version IS NOT NULL;
