-- transactional: false
-- A lot is kept once it is spent or lapsed (remaining = 0; only `ledger rebuild` drops such
-- lots), yet every query that finds a member's lots asks for `remaining > 0`: a grants
-- batch, a redemption, an adjustment and an expiry page (journal.SELECT_LOTS), the member
-- view (reads.MEMBER_WITH_LOTS), the sweeper's balances (sweeper.AVAILABLE_NOW) and verify
-- (rebuild.MEMBER_LOTS). Through the full index `ledger_lots_member` each read visited
-- every lot the member ever had: a member who signs in daily adds ~365 dead lots a year.
-- A partial index holds the live ones only (bench/experiments/lots_member_index.py;
-- bench/README.md, step 40). No query reads a member's emptied lots, so it replaces the
-- full index rather than joining it, and spending a lot's last point no longer writes an
-- index entry for it.
--
-- Built CONCURRENTLY, so the upgrade stops neither reads nor writes. A plain CREATE INDEX
-- holds SHARE on ledger_lots for the whole build: every grant, redemption and sweep would
-- wait (10,000,000 lots: 4.5 s on the development VM; the concurrent build 7.0 s, two
-- passes over the table). CONCURRENTLY cannot run inside a transaction: hence
-- `transactional: false` above, which yoyo honours (each statement in autocommit, on a
-- connection of its own; the other migrations are unaffected). The build first waits for
-- the transactions open in this database (a running `ledger verify` or report included);
-- the old index serves until it is done, and dropping it CONCURRENTLY blocks no query.
--
-- Run again after a failure, it finishes the job: a build that failed leaves an INVALID
-- index under the name, which IF NOT EXISTS alone would keep, so it is dropped first (a
-- plain DROP, as a DO block cannot drop concurrently: ACCESS EXCLUSIVE for an instant,
-- waited for at most 10 s rather than queueing the API behind a long query); a valid one
-- is kept; the old index is dropped if it is still there.

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_index
               WHERE indexrelid = to_regclass('ledger_lots_member_live') AND NOT indisvalid) THEN
        SET LOCAL lock_timeout = '10s';
        DROP INDEX ledger_lots_member_live;
    END IF;
END $$;

CREATE INDEX CONCURRENTLY IF NOT EXISTS ledger_lots_member_live
    ON ledger_lots (member_id, expires_at) WHERE remaining > 0;

DROP INDEX CONCURRENTLY IF EXISTS ledger_lots_member;
