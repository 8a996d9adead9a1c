"""Activity dated far ahead of its arrival: the rules service dead-letters it, and
`ledgerctl` will not send it (`events publish`, `dlq replay`), by this one rule."""

from __future__ import annotations

from datetime import datetime
from typing import Final

from services.common.dlq import Refused

LABEL: Final = "dated_ahead"


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
