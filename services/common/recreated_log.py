"""Telling a recreated log from the one a consumer consumed.

A log recreated under a consumer (an in-memory broker restarted, a topic deleted and
created again) that has grown past the stored offsets looks like the old one by its
offsets alone: resumed there, every record below them would be skipped. So each offsets
row keeps a fingerprint of the last record applied (migration 0021, `log_end.fingerprint`),
looked for in the log where it was taken: on assignment, and when a batch goes back below
the stored offset (the position reset to a new log's start). A log that no longer holds
it is read again from its start; every handler dedupes by event id, so a re-read of a
log that was not new costs time, not money.

`LogWatch` is what one consumer knows of its logs; `BatchConsumer` owns one and does the
seeks, resets and transactions.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import asyncpg
import structlog
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from services.common.config import KafkaAccess
from services.common.log_end import fingerprint, fingerprint_offset, log_ends_of, records_at_of

log = structlog.get_logger()

Key = tuple[str, int]
# A partition's stored offset and the fingerprint stored with it.
Seen = tuple[int, bytes]


def mark_of(next_offset: int, last_record: bytes | None) -> bytes | None:
    """The stored fingerprint if it is of the record just before the stored offset (an
    offset lowered by hand for a replay leaves one of a later record)."""
    if last_record is None or next_offset <= 0:
        return None
    return bytes(last_record) if fingerprint_offset(last_record) == next_offset - 1 else None


class LogWatch:
    def __init__(self, consumer: str) -> None:
        self.consumer = consumer
        self.kafka = KafkaAccess("")  # set when its consumer is attached to a broker
        # Partitions a batch met below their stored offset, with the stored offset and
        # fingerprint it saw, to look for in the log once the batch is done; and the
        # last such state found there, so later batches need not ask again.
        self.went_back: dict[Key, Seen] = {}
        self.verified: dict[Key, Seen] = {}
        # Per partition, a record of the log this process consumed: found there at the
        # last seek, or else the first applied since (kept through a revocation: the group
        # revokes everything when a restarted broker forgets it).
        self.anchors: dict[Key, bytes] = {}
        # The fingerprint this process last stored per partition since its anchor was set:
        # an anchor speaks for the row only while the row still holds it (another instance
        # that wrote since has looked at the log itself, and may have reset it).
        self.written: dict[Key, bytes] = {}
        # Partitions whose log was found, during the current `process` call, to hold the
        # record last consumed: one look per partition per batch.
        self.looked: set[Key] = set()

    # --- on assignment ------------------------------------------------------------------

    async def recreated_at_assignment(
        self,
        tps: list[TopicPartition],
        stored: Mapping[Key, int],
        marks: Mapping[Key, bytes | None],
        starts: Mapping[TopicPartition, int],
        kafka: Any,
    ) -> dict[TopicPartition, str]:
        """The assigned partitions whose log is not the one consumed, each with the event
        to log.

        A fingerprint below the log's start is not looked for: its record was deleted
        (retention, DeleteRecords), which says nothing of whether the log is new, and
        whether it is or not the partition is read from its start
        (`services/common/log_start.py`). Looked for, it was missing and the partition
        taken for recreated even with nothing unread lost.
        """
        wanted = {
            tp: stored[(tp.topic, tp.partition)] - 1
            for tp in tps
            if marks.get((tp.topic, tp.partition)) is not None
        }
        marked = {tp: at for tp, at in wanted.items() if at >= starts[tp]}
        recreated = await self.not_holding(marked, marks)
        recreated.update(await self.ending_before(
            [tp for tp in tps if tp not in wanted], stored, kafka
        ))  # fmt: skip
        # And the record this process consumed earlier (`anchors`): a running consumer
        # whose log was recreated under it (Tansu restarted) may have fetched the new log
        # at its old position before the group noticed, and stored a fingerprint of the new
        # log. Not below the log's start (retention may have deleted it; a new log starts
        # at 0). Only while the row holds what this process stored last: another instance
        # that stored since looked at the log on its own assignment, and may have found it
        # recreated and read it again, the row now holding a record of the new log.
        for key in [k for k in self.anchors if k in marks]:
            if marks[key] is None or marks[key] != self.written.get(key):
                self.anchors.pop(key)
        anchored = {
            tp: fingerprint_offset(self.anchors[key])
            for tp in tps
            if (key := (tp.topic, tp.partition)) in self.anchors
            and tp not in recreated
            and self.anchors[key] != marks.get(key)
            and fingerprint_offset(self.anchors[key]) >= starts[tp]
        }
        recreated.update(await self.not_holding(anchored, self.anchors))
        return recreated

    def seeked(self, key: Key, mark: bytes | None) -> None:
        """The log holds `mark` (the stored fingerprint), found at the seek."""
        if mark is not None:
            self.anchors[key] = mark
            self.written.pop(key, None)

    def forget(self, key: Key) -> None:
        """The partition is read again from the start of a new log."""
        self.anchors.pop(key, None)
        self.written.pop(key, None)

    def revoked(self, key: Key) -> None:
        self.verified.pop(key, None)

    async def not_holding(
        self, wanted: Mapping[TopicPartition, int], marks: Mapping[Key, bytes | None]
    ) -> dict[TopicPartition, str]:
        """The partitions whose log does not hold, at the offset asked, the record whose
        fingerprint is stored, each with the event to log."""
        if not wanted:
            return {}
        try:
            held = await records_at_of(self.kafka, wanted)
        except Exception as exc:
            # Not knowing, take the logs as recreated and read them from their start: ids
            # make the re-read harmless, whereas trusting the stored offset over a really
            # recreated log would skip its records below that offset.
            log.warning("last_record_unknown", consumer=self.consumer, error=repr(exc))
            return dict.fromkeys(wanted, "log_recreated_unknown")
        out: dict[TopicPartition, str] = {}
        for tp, record in held.items():
            if record is None:
                out[tp] = "log_recreated_record_missing"
            elif fingerprint(record) != marks[(tp.topic, tp.partition)]:
                out[tp] = "log_recreated_record_differs"
        return out

    async def ending_before(
        self, tps: list[TopicPartition], stored: Mapping[Key, int], kafka: Any
    ) -> dict[TopicPartition, str]:
        """Of partitions without a fingerprint (stored before migration 0021, or lowered by
        hand), those whose log ends before the stored offset: recreated, all that offsets
        alone can tell."""
        if not tps:
            return {}
        ends = await kafka.end_offsets(tps)
        beyond = [tp for tp in tps if stored.get((tp.topic, tp.partition), 0) > ends[tp]]
        if beyond:
            # ListOffsets can answer short of the last record (Tansu: `log_end`); the high
            # watermark decides whether the log really ends before what we consumed.
            try:
                ends.update(await log_ends_of(self.kafka, beyond))
            except Exception as exc:
                # Not knowing, read from the start (as `not_holding`).
                log.warning("high_watermark_unknown", consumer=self.consumer, error=repr(exc))
        return {
            tp: "stored_offset_beyond_log_end"
            for tp in beyond
            if stored.get((tp.topic, tp.partition), 0) > ends[tp]
        }

    # --- while consuming ----------------------------------------------------------------

    def unconfirmed(
        self,
        behind: set[Key],
        owned: Iterable[TopicPartition],
        rows: Sequence[asyncpg.Record],
        records: Sequence[ConsumerRecord],
    ) -> dict[Key, Seen]:
        """Of the partitions met below their stored offset, those that may have met a new
        log, with the stored offset and fingerprint seen: the batch held no record at the
        fingerprint's offset that matches it, nor was that state found in the log before.

        Only a partition this consumer owns, and once per `process` call: a batch of a
        partition revoked meanwhile is a zombie's, and its new owner (who looks at the log
        itself) moves the stored offset on and on; once the log is found holding a record
        consumed, the batch's records below a later stored offset were consumed by another
        instance of the same log. Waiting on either spun the batch forever.

        Rows without a fingerprint are let be as before migration 0021 (dropped quietly).
        """
        behind = (behind & {(tp.topic, tp.partition) for tp in owned}) - self.looked
        out: dict[Key, Seen] = {}
        for row in rows:
            key = (row["topic"], row["partition"])
            mark = mark_of(row["next_offset"], row["last_record"]) if key in behind else None
            if mark is None or self.verified.get(key) == (row["next_offset"], mark):
                continue
            at = row["next_offset"] - 1
            same = [r for r in records if (r.topic, r.partition) == key and r.offset == at]
            if not (same and fingerprint(same[0]) == mark):
                out[key] = (row["next_offset"], mark)
        return out

    def applied(self, last: Mapping[Key, ConsumerRecord], went_back: Mapping[Key, Seen]) -> None:
        """A batch committed: `last` the records whose fingerprints it stored, `went_back`
        the partitions it held."""
        for key, r in last.items():
            self.written[key] = fingerprint(r)
            self.anchors.setdefault(key, self.written[key])
        for key, seen in went_back.items():  # the first seen until it is looked for
            self.went_back.setdefault(key, seen)

    async def check_went_back(
        self, kafka: Any, restart: Callable[[TopicPartition, int], Awaitable[None]]
    ) -> bool:
        """Look in the log for the records last consumed where a batch went back below
        them; whether any was found (the batch's records of its partition, held, are then
        applied as usual). A log that no longer holds one is new: its partition is read
        again from the log's start (`restart`), the records held with it.

        Runs after the batch committed, outside its transaction (a fetch from the broker);
        a failure is retried by `process` with the batch, which holds the same records
        again.
        """
        pending = dict(self.went_back)
        log.warning("position_went_back", consumer=self.consumer, partitions=sorted(pending))
        recreated: dict[TopicPartition, str] = {}
        if kafka is not None:  # else driven without a broker (tests): as before 0021
            wanted = {TopicPartition(t, p): offset - 1 for (t, p), (offset, _) in pending.items()}
            marks = {key: mark for key, (_, mark) in pending.items()}
            recreated = await self.not_holding(wanted, marks)
        starts = await kafka.beginning_offsets(list(recreated)) if recreated else {}
        for tp, event in recreated.items():
            key = (tp.topic, tp.partition)
            log.warning(event, consumer=self.consumer, topic=tp.topic, partition=tp.partition,
                        stored=pending[key][0], log_start=starts[tp])  # fmt: skip
            await restart(tp, starts[tp])
            self.forget(key)
        found = {k: v for k, v in pending.items() if TopicPartition(*k) not in recreated}
        self.verified.update(found)
        self.looked.update(found)
        for key in pending:
            self.went_back.pop(key, None)
        return bool(found)
