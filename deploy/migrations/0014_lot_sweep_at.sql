-- When the expiry sweeper next has business with a lot: its next expiry warning (30, then
-- 7 days ahead), else its expiry. A sweep reads the lots whose moment has come through one
-- index, instead of every lot inside the 30-day window on every sweep (each lot was looked
-- at ~43,000 times over its window at one sweep a minute; bench/README.md, "Expiry sweeps").
-- It replaces ledger_lots_expiry: a lapsed lot's sweep_at has come too.
--
-- Existing lots (and any lot a writer inserts without naming the column) start at
-- '-infinity': due, so the next sweep looks at each once, in pages, sends what is owed
-- (never twice: ledger_expiry_warnings still decides) and sets the real moment. No table
-- rewrite here: a constant default and a CHECK that every row passes.
ALTER TABLE ledger_lots ADD COLUMN sweep_at timestamptz NOT NULL DEFAULT '-infinity';
-- The expiry scan relies on it: a lapsed lot is always due.
ALTER TABLE ledger_lots ADD CONSTRAINT ledger_lots_sweep_by_expiry CHECK (sweep_at <= expires_at);
-- lot_id in the key: the scans page by (sweep_at, lot_id), and lots due at the same moment
-- (all of them at '-infinity' after this migration) must still come in index order.
CREATE INDEX ledger_lots_sweep ON ledger_lots (sweep_at, lot_id) WHERE remaining > 0;
DROP INDEX ledger_lots_expiry;
