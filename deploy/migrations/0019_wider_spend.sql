-- Qualifying spend is a sum of orders over a tier window: numeric(14,2) held less than a
-- trillion CNY, so one order at the activity contract's largest amount (a trillion, less a
-- fen) and any other made a tier report the ledger could not store; it was dead-lettered
-- and the ledger's tier drifted from the rules'. numeric(20,2): below 10^18 CNY. Raising
-- a numeric's precision at the same scale rewrites nothing (PostgreSQL skips the rewrite).

ALTER TABLE ledger_members ALTER COLUMN qualifying_spend TYPE numeric(20,2),
                           ALTER COLUMN next_tier_spend TYPE numeric(20,2);
ALTER TABLE ledger_tier_history ALTER COLUMN qualifying_spend TYPE numeric(20,2),
                                ALTER COLUMN next_tier_spend TYPE numeric(20,2);
