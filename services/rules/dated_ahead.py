"""Activity dated far ahead of its arrival: the rules service dead-letters it, and
`ledgerctl` will not send it (`events publish`, `dlq replay`), by this one rule."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

from services.common.dlq import Refused

LABEL: Final = "dated_ahead"
# Kafka's record timestamp types: the producer's own (CreateTime) or the broker's append.
LOG_APPEND_TIME: Final = 1
LAST_MS: Final = int(datetime(9999, 12, 31, tzinfo=UTC).timestamp() * 1000)  # what datetime holds


def reference_time(
    timestamp_ms: int | None, timestamp_type: int, now: datetime
) -> tuple[datetime, str]:
    """What a record's arrival is judged against, and its name for the reason. A broker's
    append time is trusted as is, so a replay refuses the same events. A CreateTime is
    whatever the producer set (its event time, a till's fast clock), so it counts only up
    to `now`: a replay after a future stamp may then take what was refused (README)."""
    if timestamp_ms is None or not 0 < timestamp_ms <= LAST_MS:
        # A producer may send no time at all, or one no datetime holds (microseconds
        # stamped for milliseconds): not a reason to refuse the event.
        return now, "now"
    stamped = datetime.fromtimestamp(timestamp_ms / 1000, UTC)
    if timestamp_type == LOG_APPEND_TIME:
        return stamped, "the broker received it"
    if stamped > now:
        return now, "now"
    return stamped, "its record's timestamp"


def refuse_dated_ahead(
    occurred_at: datetime, received: datetime, max_ahead_s: int, received_as: str
) -> None:
    """Refuses activity dated more than `max_ahead_s` after `received` (a year typed wrong,
    a till's clock a year ahead): the rules forget what lies a year behind a member's
    latest event, so one such event would drop their orders, day counters and business
    ids, and every event of the present would then earn as if a year old. 0 takes any.
    `received_as` names `received` in the reason ("the broker received it", "now")."""
    if max_ahead_s <= 0:
        return
    ahead = (occurred_at - received).total_seconds()
    if ahead > max_ahead_s:
        raise Refused(
            LABEL,
            f"occurred_at {occurred_at.isoformat()} is {ahead / 3600:.1f} h after"
            f" {received_as} ({received.isoformat()}); at most {max_ahead_s / 3600:g} h is"
            " taken (ACTIVITY_MAX_AHEAD_SECONDS)",
        )
