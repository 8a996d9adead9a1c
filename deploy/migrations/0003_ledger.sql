-- The ledger: an append-only journal (the truth) and read models projected from it.

CREATE TABLE ledger_entries (
    seq             bigserial   NOT NULL,
    entry_id        text        PRIMARY KEY,
    member_id       text        NOT NULL,
    kind            text        NOT NULL CHECK (kind IN ('earn','redeem','revoke','expire','adjust')),
    points          bigint      NOT NULL,
    balance_after   bigint      NOT NULL,
    debt_delta      bigint      NOT NULL DEFAULT 0,
    occurred_at     timestamptz NOT NULL,
    expires_at      timestamptz,
    rule_id         text,
    ruleset_version text,
    source_event_id text,
    order_id        text,
    store_id        text,
    redemption_id   text,
    adjustment_id   text,
    reason          text,
    operator        text,
    allocations     jsonb,
    recorded_at     timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX ledger_entries_seq ON ledger_entries (seq);
CREATE INDEX ledger_entries_member ON ledger_entries (member_id, seq);

-- Points that can still be spent, one row per earning entry (lot_id = entry_id).
CREATE TABLE ledger_lots (
    lot_id          text PRIMARY KEY,
    member_id       text        NOT NULL,
    points          bigint      NOT NULL,
    remaining       bigint      NOT NULL CHECK (remaining >= 0),
    earned_at       timestamptz NOT NULL,
    -- Pending points (rule-set `pending_days`) can be seen but not spent before this.
    available_from  timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    source_event_id text,
    order_id        text,
    rule_id         text
);
CREATE INDEX ledger_lots_member ON ledger_lots (member_id, expires_at);

CREATE TABLE ledger_members (
    member_id        text PRIMARY KEY,
    tier             text        NOT NULL DEFAULT 'member',
    qualifying_spend numeric(14,2) NOT NULL DEFAULT 0,
    tier_valid_until timestamptz,
    next_tier        text,
    next_tier_spend  numeric(14,2),
    earned           bigint      NOT NULL DEFAULT 0,
    redeemed         bigint      NOT NULL DEFAULT 0,
    revoked          bigint      NOT NULL DEFAULT 0,
    expired          bigint      NOT NULL DEFAULT 0,
    adjusted         bigint      NOT NULL DEFAULT 0,
    debt             bigint      NOT NULL DEFAULT 0 CHECK (debt >= 0),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Tier evaluations as received, so the member view can be rebuilt and read as of a time.
CREATE TABLE ledger_tier_history (
    event_id         text PRIMARY KEY,
    member_id        text        NOT NULL,
    occurred_at      timestamptz NOT NULL,
    tier             text        NOT NULL,
    previous_tier    text        NOT NULL,
    qualifying_spend numeric(14,2) NOT NULL,
    tier_valid_until timestamptz,
    seq              bigserial
);
CREATE INDEX ledger_tier_history_member ON ledger_tier_history (member_id, occurred_at);

CREATE TABLE ledger_redemptions (
    redemption_id text PRIMARY KEY,
    member_id     text        NOT NULL,
    request       jsonb       NOT NULL,
    response      jsonb       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
