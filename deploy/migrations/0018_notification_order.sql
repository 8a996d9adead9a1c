-- Each member's notifications reach the webhook in the order the ledger published them
-- (services/notifier/delivery.py): `seq` is that order (the notifier COPYs a batch in
-- topic order, and one member's events share a partition), and a member's pending
-- notification is held back while an earlier one of theirs waits for a retry.
-- Existing rows are numbered in their physical order, close to insertion order: a
-- one-time rewrite of the table.

ALTER TABLE notifications ADD COLUMN seq bigserial;
CREATE INDEX notifications_member_pending ON notifications (member_id, seq)
    WHERE status = 'pending';
-- A round reads the due ones in (next_attempt_at, seq) order: with a backlog (a webhook
-- that was down) a sort of every due row per round of 50 would make draining quadratic.
DROP INDEX notifications_pending;
CREATE INDEX notifications_pending ON notifications (next_attempt_at, seq)
    WHERE status = 'pending';
