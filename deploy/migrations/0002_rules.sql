-- The rules service keeps every activity as received (with its Kafka coordinates) so a
-- rule change can be backtested on real history, and one state document per member.

CREATE TABLE rules_activity (
    event_id    text PRIMARY KEY,
    member_id   text        NOT NULL,
    type        text        NOT NULL,
    occurred_at timestamptz NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    "offset"    bigint      NOT NULL,
    payload     bytea       NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX rules_activity_occurred ON rules_activity (occurred_at);

CREATE TABLE rules_member_state (
    member_id  text PRIMARY KEY,
    referrer_id text,
    state      jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Every published rule-set version is kept; the one in force at an event's time applies.
CREATE TABLE rules_rulesets (
    version        text PRIMARY KEY,
    effective_from timestamptz NOT NULL,
    body           text        NOT NULL,
    published_at   timestamptz NOT NULL DEFAULT now(),
    published_by   text
);
