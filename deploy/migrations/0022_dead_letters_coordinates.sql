-- A dead letter's id hashes the message's bytes with its coordinates since 2026-11-29, so
-- that a different message at an offset a recreated topic reused gets its own row. A
-- message dead-lettered before that and met again (a replay) would get a second row under
-- its new id: the insert looks for the same bytes at the same coordinates first, by this
-- index.

CREATE INDEX dead_letters_coordinates ON dead_letters (topic, partition, "offset");
