-- Shared plumbing of the effectively-once pipeline: consumed offsets, the outbox, and
-- dead letters. Offsets and outbox rows are written in the same transaction as the state
-- change they belong to, so a crash can never separate them.

CREATE TABLE consumer_offsets (
    consumer    text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, topic, partition)
);

-- Rows are deleted once the relay has seen the broker acknowledge them.
CREATE TABLE outbox (
    id         bigserial PRIMARY KEY,
    service    text        NOT NULL,
    topic      text        NOT NULL,
    key        text,
    payload    bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_service_id ON outbox (service, id);

CREATE TABLE dead_letters (
    dlq_id     text PRIMARY KEY,
    consumer   text        NOT NULL,
    topic      text        NOT NULL,
    partition  integer     NOT NULL,
    "offset"   bigint      NOT NULL,
    reason     text        NOT NULL,
    original   bytea       NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
