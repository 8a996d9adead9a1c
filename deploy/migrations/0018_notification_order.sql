-- Each member's notifications reach the webhook in the order the ledger published them
-- (services/notifier/delivery.py): `seq` is that order (the notifier COPYs a batch in
-- topic order, and one member's events share a partition), and a member's pending
-- notification is held back while an earlier one of theirs waits for a retry.
-- Since a member's notifications now wait behind a failing one, a notification the
-- webhook keeps refusing is given up on after a while (`failed`, NOTIFIER_GIVE_UP_HOURS),
-- so it cannot hold back the member's later ones forever.
-- Existing rows are numbered in their physical order, close to insertion order: a
-- one-time rewrite of the table.

ALTER TABLE notifications ADD COLUMN seq bigserial;
CREATE INDEX notifications_member_pending ON notifications (member_id, seq)
    WHERE status = 'pending';
-- A round reads the due ones in (next_attempt_at, seq) order: with a backlog (a webhook
-- that was down) a sort of every due row per round of 50 would make draining quadratic.
ALTER TABLE notifications DROP CONSTRAINT notifications_status_check,
    ADD CONSTRAINT notifications_status_check
        CHECK (status IN ('pending', 'delivered', 'skipped', 'failed'));
DROP INDEX notifications_pending;
CREATE INDEX notifications_pending ON notifications (next_attempt_at, seq)
    WHERE status = 'pending';
