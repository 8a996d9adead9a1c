-- Engagement events held back as a burst (more than N a minute from one member) wait here
-- for ops review instead of being paid or lost. `ledgerctl rules held release|reject ID`
-- decides; a release pays under the rule set in force at the event's time.

CREATE TABLE rules_held (
    event_id    text PRIMARY KEY,
    member_id   text        NOT NULL,
    type        text        NOT NULL,
    occurred_at timestamptz NOT NULL,
    payload     bytea       NOT NULL,
    reason      text        NOT NULL,
    status      text        NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'released', 'rejected')),
    held_at     timestamptz NOT NULL DEFAULT now(),
    decided_at  timestamptz,
    decided_by  text,
    grants      integer
);
CREATE INDEX rules_held_pending ON rules_held (held_at) WHERE status = 'pending';

