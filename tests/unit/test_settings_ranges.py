"""Every numeric setting is checked once, at start, against the range it needs: a value out
of it stops the process with one line naming the variable and the value. Taken as given,
a negative EXPIRY_GRACE_SECONDS journaled expiries a year early, CONSUMER_MAX_BATCH=0 left
the services ready while they processed nothing, an interval of 0 spun a core, and
DB_POOL_SIZE=2 crashed the ledger's start on an asyncpg message naming no variable."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError, load_settings


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("EXPIRY_GRACE_SECONDS", "-31536000", "EXPIRY_GRACE_SECONDS=-31536000: must be from 0"),
        ("EXPIRY_GRACE_SECONDS", "100000000000", "from 0 to 2592000"),
        ("TIER_SWEEP_GRACE_SECONDS", "-1", "TIER_SWEEP_GRACE_SECONDS=-1: must be from 0"),
        ("CONSUMER_MAX_BATCH", "0", "CONSUMER_MAX_BATCH=0: must be at least 1"),
        ("CONSUMER_MAX_BATCH", "-1", "CONSUMER_MAX_BATCH=-1: must be at least 1"),
        ("CONSUMER_MAX_BATCH", "abc", "CONSUMER_MAX_BATCH='abc': not a whole number"),
        ("CONSUMER_MAX_BATCH", "2.5", "CONSUMER_MAX_BATCH='2.5': not a whole number"),
        ("CONSUMER_BATCH_WAIT_MS", "-1", "CONSUMER_BATCH_WAIT_MS=-1: must be at least 1"),
        ("CONSUMER_BATCH_WAIT_MS", "0", "CONSUMER_BATCH_WAIT_MS=0: must be at least 1"),
        ("CONSUMER_FETCH_WAIT_MS", "-1", "CONSUMER_FETCH_WAIT_MS=-1: must be at least 1"),
        ("EXPIRY_SWEEP_SECONDS", "0", "EXPIRY_SWEEP_SECONDS=0: must be at least 1"),
        ("TIER_SWEEP_SECONDS", "0", "TIER_SWEEP_SECONDS=0: must be at least 1"),
        ("RULEBOOK_POLL_SECONDS", "0", "RULEBOOK_POLL_SECONDS=0: must be at least 0.1"),
        ("DB_POOL_SIZE", "3", "DB_POOL_SIZE=3: must be at least 4"),
        ("METRICS_PORT", "70000", "METRICS_PORT=70000: must be 0 (off) or from 1 to 65535"),
        ("LEDGER_PORT", "0", "LEDGER_PORT=0: must be from 1 to 65535"),
        ("LEDGER_MAX_BODY_BYTES", "0", "LEDGER_MAX_BODY_BYTES=0: must be at least 1024"),
        ("NOTIFIER_GIVE_UP_HOURS", "0", "NOTIFIER_GIVE_UP_HOURS=0: must be at least 0.01"),
        ("NOTIFIER_GIVE_UP_HOURS", "nan", "NOTIFIER_GIVE_UP_HOURS=nan: must be at least"),
        ("NOTIFIER_GIVE_UP_HOURS", "soon", "NOTIFIER_GIVE_UP_HOURS='soon': not a number"),
        ("ACTIVITY_MAX_AHEAD_SECONDS", "-1", "ACTIVITY_MAX_AHEAD_SECONDS=-1: must be at least 0"),
        ("KAFKA_SESSION_TIMEOUT_MS", "1000", "KAFKA_SESSION_TIMEOUT_MS=1000: must be from 6000"),
        ("KAFKA_METADATA_MAX_AGE_MS", "0", "KAFKA_METADATA_MAX_AGE_MS=0: must be at least 1000"),
        ("PLANNER_STATS_SECONDS", "0.001", "must be 0 (off) or at least 0.1"),
        ("PLANNER_STATS_SECONDS", "-2", "PLANNER_STATS_SECONDS=-2: must be 0 (off) or"),
    ],
)
def test_a_setting_out_of_range_stops_with_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert message in str(refused.value.code)
    assert "\n" not in str(refused.value.code)


def test_a_refused_setting_ends_the_process_like_sys_exit_with_its_line() -> None:
    """ledgerctl reads the same settings: its commands stop with the line, no traceback."""
    assert issubclass(ConfigError, SystemExit)


@pytest.mark.parametrize(
    ("name", "value", "field", "expected"),
    [
        ("EXPIRY_GRACE_SECONDS", "0", "expiry_grace_seconds", 0),
        ("TIER_SWEEP_GRACE_SECONDS", "0", "tier_sweep_grace_seconds", 0),
        ("ACTIVITY_MAX_AHEAD_SECONDS", "0", "activity_max_ahead_seconds", 0),
        ("PLANNER_STATS_SECONDS", "0", "planner_stats_seconds", 0.0),
        ("METRICS_PORT", "0", "metrics_port", 0),
        ("DB_POOL_SIZE", "4", "pool_size", 4),
        ("RULEBOOK_POLL_SECONDS", "0.2", "rulebook_poll_seconds", 0.2),
        ("CONSUMER_MAX_BATCH", " 500 ", "max_batch", 500),
        ("CONSUMER_MAX_BATCH", "", "max_batch", 5000),  # empty: the default (`make up`)
    ],
)
def test_the_edges_of_each_range_are_taken(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, field: str, expected: float
) -> None:
    monkeypatch.setenv(name, value)
    assert getattr(load_settings(), field) == expected
