"""The services' Kafka clients look at the topics again every `KAFKA_METADATA_MAX_AGE_MS`
(30 s by default), not aiokafka's 5 minutes: a consumer rebalanced to no partitions when
its topic was deleted on Apache Kafka consumed nothing of the topic created again until
then (tests/integration/test_recreated_log.py drives that on Kafka)."""

from __future__ import annotations

import pytest

from services.common.config import Settings, load_settings
from services.common.runtime import create_broker


def test_the_metadata_age_defaults_to_30_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_METADATA_MAX_AGE_MS", raising=False)
    assert load_settings().metadata_max_age_ms == 30_000
    monkeypatch.setenv("KAFKA_METADATA_MAX_AGE_MS", "5000")
    assert load_settings().metadata_max_age_ms == 5000


def test_the_brokers_consumers_are_built_with_the_metadata_age() -> None:
    settings = Settings(database_url="", bootstrap_servers="127.0.0.1:1", metadata_max_age_ms=1234)
    builder = create_broker(settings, "rules").config.broker_config.builder
    assert builder.keywords["metadata_max_age_ms"] == 1234
