"""Records deleted before a consumer read them: retention or DeleteRecords moved a
partition's log start past the stored offset.

The consumer is told of it by nothing of its own. Its next fetch below the log start gets
OffsetOutOfRange and aiokafka moves the position to the log start
(`auto_offset_reset="earliest"`), saying so at INFO, below the WARNING the services let
aiokafka log at (`services/common/logging.py`); the batch then simply begins past the
stored offset. So that gap is what is looked for: one comparison per partition of a batch
(`gaps`). Not every gap is records lost: a transaction's commit marker takes an offset (a
transactional producer upstream), and so does a record a compacted topic dropped. Those
leave the log start where it was, so a gap is reported (`report_skipped`) only when the
log now starts past the stored offset, which costs a ListOffsets, asked only for a batch
with a gap.

On assignment the same deletion looks like a recreated log: the record last consumed, whose
fingerprint is stored, is gone. It is not looked for below the log start
(`LogWatch.recreated_at_assignment`): whether the log is new or not, it holds nothing below
its start, so reading it from there loses nothing it holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog
from aiokafka import TopicPartition
from prometheus_client import Counter

log = structlog.get_logger()

Key = tuple[str, int]
# A partition's stored offset, and the offset of the batch's first record past it.
Gap = tuple[int, int]

SKIPPED = Counter(
    "loyalty_records_skipped_total",
    "Offsets a consumer passed over unread because the log no longer held them"
    " (retention, DeleteRecords)",
    ["consumer"],
)


def gaps(first: Mapping[Key, int], stored: Mapping[Key, int]) -> dict[Key, Gap]:
    """The partitions whose first record applied lies past the stored offset."""
    return {k: (s, o) for k, o in first.items() if o > (s := stored.get(k, 0))}


async def report_skipped(consumer: str, kafka: Any, found: Mapping[Key, Gap]) -> None:
    """Log and count the gaps the log start explains. Never raises: the batch is committed,
    and a retry would find no gap to report."""
    tps = [TopicPartition(*key) for key in found]
    try:
        starts = await kafka.beginning_offsets(tps)
    except Exception as exc:
        # Not knowing, report them: a false alarm sends someone to look, where silence left
        # lost records unseen.
        log.warning("log_start_unknown", consumer=consumer, error=repr(exc))
        starts = {tp: found[(tp.topic, tp.partition)][1] for tp in tps}
    for tp in tps:
        stored, first = found[(tp.topic, tp.partition)]
        if starts[tp] <= stored:
            continue  # markers or compaction: nothing of the log was deleted
        log.warning(
            "records_skipped_log_start_moved",
            consumer=consumer,
            topic=tp.topic,
            partition=tp.partition,
            from_offset=stored,
            to_offset=first,
            count=first - stored,
            log_start=starts[tp],
        )
        SKIPPED.labels(consumer).inc(first - stored)
