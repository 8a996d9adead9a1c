-- The owner's summary with `store_id` counts per tier the members who ever had an entry at
-- that store. Nothing indexes the journal by store, so each such summary scanned all of it
-- (0.5-0.9 s at 4.4 to 7 million entries; a chain appends tens of millions a year). This
-- table holds each (store, member) pair once, so it grows with memberships, not with time.
--
-- A statement trigger fills it from the rows each COPY or INSERT appends (a transition
-- table), in the appending transaction: every writer of the journal is covered, one still
-- running from before this migration and a journal loaded in bulk alike. The journal is
-- append-only, so no pair ever has to be taken back. Cost and the ways not taken (an
-- index on the journal, the ledger upserting the pairs itself): bench/README.md, step 41.
CREATE TABLE ledger_member_stores (
    store_id  text NOT NULL,
    member_id text NOT NULL,
    PRIMARY KEY (store_id, member_id)
);

CREATE FUNCTION ledger_member_stores_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ledger_member_stores (store_id, member_id)
    SELECT DISTINCT store_id, member_id FROM appended WHERE store_id IS NOT NULL
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

-- Before the backfill: creating the trigger locks out the journal's writers until this
-- migration commits, so no entry falls between the backfill and the trigger.
CREATE TRIGGER ledger_entries_member_stores AFTER INSERT ON ledger_entries
REFERENCING NEW TABLE AS appended FOR EACH STATEMENT
EXECUTE FUNCTION ledger_member_stores_add();

INSERT INTO ledger_member_stores (store_id, member_id)
SELECT DISTINCT store_id, member_id FROM ledger_entries WHERE store_id IS NOT NULL;
