-- Documents the services only store whole and read back whole: `json` keeps the text as
-- written (a syntax check on the way in, the same bytes on the way out); `jsonb` parsed
-- each one into its binary form on every write and printed it again on every read.
-- Nothing queries inside them on the hot path; ops queries (`->`, `->>`) work on json too.
-- bench/experiments/json_columns.py, the services' own statements over the bench workload:
-- member states (~770 bytes) 16.3 -> 9.3 µs and notifications 16.3 -> 10.2 µs of Postgres
-- backend CPU per activity event.
-- Both tables are rewritten under an exclusive lock: on a large database, apply this in a
-- quiet window (the services wait for the lock; nothing is lost).
ALTER TABLE rules_member_state ALTER COLUMN state TYPE json USING state::json;
ALTER TABLE notifications ALTER COLUMN payload TYPE json USING payload::json;
