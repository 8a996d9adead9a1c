"""The labelled counters are exported at zero from start-up, each known label set: a series
born at its first increment has no earlier sample, so rate() and increase() missed that
increment (the first dead letters, the first records lost, the first given-up
notification made no spike)."""

from __future__ import annotations

from typing import Any, cast

import pytest
from prometheus_client import REGISTRY

from schemas.grants import parse_grant
from services.common.config import Settings, Topics
from services.common.consumer import BatchConsumer
from services.common.dlq import REASONS, classify
from services.common.outbox import OutboxRelay
from services.notifier.delivery import OUTCOMES
from services.notifier.render import SKIP_REASONS
from services.rules.app import create_app


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_a_consumers_series_are_exported_before_its_first_batch() -> None:
    BatchConsumer(name="zero-ledger", service="ledger", topic="t", dlq_topic="dlq")
    assert sample("loyalty_consumed_total", consumer="zero-ledger") == 0
    assert sample("loyalty_batch_seconds_count", consumer="zero-ledger") == 0
    assert sample("loyalty_records_skipped_total", consumer="zero-ledger") == 0
    for reason in REASONS:
        assert sample("loyalty_dlq_messages_total", consumer="zero-ledger", reason=reason) == 0


def test_the_rules_consumer_exports_its_own_refusals() -> None:
    create_app(Settings(database_url="", bootstrap_servers="", topics=Topics(prefix="zero-")))
    for reason in ("dated_ahead", "reused_event_id"):
        assert sample("loyalty_dlq_messages_total", consumer="zero-rules", reason=reason) == 0


def test_the_rules_consumer_exports_its_key_mismatches() -> None:
    create_app(Settings(database_url="", bootstrap_servers="", topics=Topics(prefix="keys-")))
    assert sample("loyalty_activity_key_mismatch_total", consumer="keys-rules") == 0


def test_a_relays_series_are_exported_before_its_first_round() -> None:
    OutboxRelay(cast(Any, None), cast(Any, None), "zero-svc", dlq_topic="dlq")
    assert sample("loyalty_outbox_published_total", service="zero-svc") == 0
    too_large = sample(
        "loyalty_dlq_messages_total", consumer="zero-svc-relay", reason="relay_too_large"
    )
    assert too_large == 0


def test_every_notification_outcome_is_exported() -> None:
    # Every outcome README names, the notifier's skip reasons among them: one added after
    # the list was written (tier_expired_on_arrival) was left out of it.
    named = {"delivered", "failed", "given_up", "skipped", "expired_before_warning",
             "expired_on_arrival", "tier_expired_on_arrival", "caused_by_refund",
             "unknown_type"}  # fmt: skip
    assert named | set(SKIP_REASONS) <= set(OUTCOMES)
    for outcome in OUTCOMES:
        assert sample("loyalty_notifications_total", outcome=outcome) is not None


def refusal(raw: bytes) -> Exception:
    try:
        parse_grant(raw)
    except ValueError as exc:
        return exc
    raise AssertionError(f"{raw!r} parsed")


@pytest.mark.parametrize(
    "exc",
    [
        refusal(b"{not json"),
        refusal(b'{"type": "points_teleported"}'),
        refusal(b'{"type": "points_granted"}'),
        RuntimeError("a bug in a handler"),
    ],
)
def test_the_reasons_exported_are_those_a_dead_letter_is_given(exc: Exception) -> None:
    assert classify(exc)[0] in REASONS
