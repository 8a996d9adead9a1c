-- A consumer's stored offset alone cannot tell a recreated log (Tansu restarted, or a
-- topic deleted and created again) that has grown past it from the log it consumed: the
-- consumer resumed there and skipped everything below. Each offsets row now keeps a
-- fingerprint of the last record consumed (offset, broker timestamp, hash of key and
-- value; services/common/log_end.py), which the consumer looks for in the log on
-- assignment. Rows from before have none until their partition's next batch, and are
-- resumed as before. A nullable column without default rewrites nothing.

ALTER TABLE consumer_offsets ADD COLUMN last_record bytea;
