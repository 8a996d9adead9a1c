-- Money-grade ledger: pending lots in the journal, idempotent adjustments, expiry
-- warnings sent once, tier history complete enough to rebuild the member rows.

-- A creating entry's pending-until moment, so a rebuild restores ledger_lots.available_from.
ALTER TABLE ledger_entries ADD COLUMN available_from timestamptz;

-- Reports filter the journal by period.
CREATE INDEX ledger_entries_occurred ON ledger_entries (occurred_at);

-- The sweeper looks for lots past (or near) expiry that still hold points.
CREATE INDEX ledger_lots_expiry ON ledger_lots (expires_at) WHERE remaining > 0;

-- Manual adjustments by ops: the request kept for idempotency (same id, same body) and audit.
CREATE TABLE ledger_adjustments (
    adjustment_id text PRIMARY KEY,
    member_id     text        NOT NULL,
    request       jsonb       NOT NULL,
    response      jsonb       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- `points_expiring` warnings already published: once per lot and threshold (30, 7 days).
CREATE TABLE ledger_expiry_warnings (
    lot_id         text        NOT NULL,
    threshold_days integer     NOT NULL,
    member_id      text        NOT NULL,
    points         bigint      NOT NULL,
    expires_at     timestamptz NOT NULL,
    sent_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (lot_id, threshold_days)
);

-- The next tier and its spend, so `ledger rebuild` can restore every member column.
ALTER TABLE ledger_tier_history ADD COLUMN next_tier text;
ALTER TABLE ledger_tier_history ADD COLUMN next_tier_spend numeric(14,2);
