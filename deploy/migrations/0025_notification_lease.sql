-- The notifier posts to the webhook outside any transaction (services/notifier/delivery.py):
-- a process takes a member's due notifications by leasing them to itself until
-- `leased_until`, in a short transaction, and records each outcome in another. A round
-- used to hold one transaction (its row locks, and the vacuum horizon) across every post
-- of the round, however long the slowest receiver took. While a lease is live no other
-- round takes the member's notifications, those leased or later ones; a crashed process's
-- lease simply runs out. NULL: not leased. Adding a column without a default rewrites
-- nothing.

ALTER TABLE notifications ADD COLUMN leased_until timestamptz;
