"""LOYALTY_GROUP_PREFIX names the services' Kafka consumer groups apart from their topics:
the groups were "<topic prefix>rules", "...ledger", "...notifier", so on a shared cluster
the bare names clashed with other applications' groups, and the only way to rename them
renamed the contract's topics too. The consumers' own names, which key their offsets in
Postgres, their dead letters and metrics, keep the topic prefix: a new group re-reads
nothing."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from services.common.config import ConfigError, Settings, Topics, load_settings
from services.ledger.service import LedgerService
from services.notifier.app import create_app as notifier_app
from services.rules.app import create_app as rules_app


@pytest.mark.parametrize(
    ("given", "expected"), [(None, "stg."), ("", "stg."), ("t-1_x.", "t-1_x.")]
)
def test_the_group_prefix_is_the_topic_prefix_unless_given(
    monkeypatch: pytest.MonkeyPatch, given: str | None, expected: str
) -> None:
    monkeypatch.setenv("LOYALTY_TOPIC_PREFIX", "stg.")
    if given is None:
        monkeypatch.delenv("LOYALTY_GROUP_PREFIX", raising=False)
    else:
        monkeypatch.setenv("LOYALTY_GROUP_PREFIX", given)
    settings = load_settings()
    assert settings.group_prefix == expected
    assert settings.consumer_prefix == "stg."


@pytest.mark.parametrize("value", ["loyalty ", "a/b", "x\n", "组.", "a" * 201])
def test_a_group_prefix_kafka_tools_cannot_take_stops_with_one_line(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("LOYALTY_GROUP_PREFIX", value)
    with pytest.raises(ConfigError) as refused:
        load_settings()
    line = str(refused.value.code)
    assert line.startswith(f"LOYALTY_GROUP_PREFIX={value!r}: must be")
    assert "\n" not in line


def test_the_services_join_the_groups_and_keep_their_names() -> None:
    settings = Settings(
        database_url="",
        bootstrap_servers="127.0.0.1:1",
        topics=Topics(prefix="gp-topics."),
        kafka_group_prefix="gp-groups.",
    )
    groups = [
        sub.group_id
        for app in (rules_app, notifier_app)
        for sub in app(settings).broker.subscribers
    ]
    ledger = LedgerService(settings).consumer
    assert [*groups, ledger.group_id] == [
        "gp-groups.rules",
        "gp-groups.notifier",
        "gp-groups.ledger",
    ]
    assert ledger.name == "gp-topics.ledger"
    # The names their offsets, dead letters and metrics go by.
    for name in ("gp-topics.rules", "gp-topics.notifier", "gp-topics.ledger"):
        assert REGISTRY.get_sample_value("loyalty_consumed_total", {"consumer": name}) == 0
    assert (
        REGISTRY.get_sample_value("loyalty_consumed_total", {"consumer": "gp-groups.rules"}) is None
    )
