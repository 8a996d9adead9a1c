-- A lot made by a manual adjustment keeps the adjustment's id apart from any source event,
-- so its expiry and its expiry warnings carry it as `adjustment_id`, with a null
-- `source_event_id`: every ledger event names what caused it (CONTRACT.md). Before, the
-- lot kept the adjustment's id as its source event id, and its expiry said so.
-- Existing lots are told apart by their creating entry (lot_id = entry_id, kind 'adjust').

ALTER TABLE ledger_lots ADD COLUMN adjustment_id text;

UPDATE ledger_lots AS l SET adjustment_id = e.adjustment_id, source_event_id = NULL
FROM ledger_entries AS e
WHERE e.entry_id = l.lot_id AND e.kind = 'adjust';
