-- Every notification is recorded once (keyed by the ledger event that caused it) and then
-- delivered; delivery is retried until the webhook answers 2xx.

CREATE TABLE notifications (
    notification_id text PRIMARY KEY,
    member_id       text        NOT NULL,
    kind            text        NOT NULL,
    message         text        NOT NULL,
    payload         jsonb       NOT NULL,
    status          text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending','delivered','skipped')),
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz
);
CREATE INDEX notifications_pending ON notifications (next_attempt_at) WHERE status = 'pending';
