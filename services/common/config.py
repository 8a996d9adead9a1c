"""Settings from the environment, read once at start-up by each service's bootstrap.

Defaults match `make up` so a developer can run a service by hand with no exports.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

from schemas.activity import ACTIVITY_TOPIC
from schemas.grants import GRANTS_TOPIC
from schemas.ledger import DLQ_TOPIC, LEDGER_TOPIC

N = TypeVar("N", int, float)

# The ledger opens this many connections at start (services/ledger/service.py): a smaller
# DB_POOL_SIZE failed its start with asyncpg's "min_size is greater than max_size".
POOL_MIN_SIZE: Final = 4
# A grace holds back every expiry by as much; late events arrive within hours, not months.
MAX_GRACE_S: Final = 30 * 86_400


class ConfigError(SystemExit):
    """A setting the services cannot run with, named with its value on one line.

    A SystemExit, so that every process reading the settings (`ledgerctl` too) stops with
    that line rather than a traceback; the services log it as `startup_failed`
    (services/common/runtime.py). Refused at start: a value out of range did not fail,
    it ran wrong (a negative grace expired points early, a batch of 0 processed nothing
    while /readyz said ready, an interval of 0 spun a core).
    """


def _number(
    name: str, parse: Callable[[str], N], default: N, low: N, high: N | None, zero_off: bool
) -> N:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = parse(raw)
    except ValueError:
        kind = "a whole number" if parse is int else "a number"
        raise ConfigError(f"{name}={raw!r}: not {kind}") from None
    if value == 0 and zero_off:
        return value
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        span = f"at least {low}" if high is None else f"from {low} to {high}"
        raise ConfigError(f"{name}={raw}: must be {'0 (off) or ' if zero_off else ''}{span}")
    return value


def _int(
    name: str, default: int, low: int, high: int | None = None, *, zero_off: bool = False
) -> int:
    return _number(name, int, default, low, high, zero_off)


def _float(
    name: str, default: float, low: float, high: float | None = None, *, zero_off: bool = False
) -> float:
    return _number(name, float, default, low, high, zero_off)


@dataclass(frozen=True)
class Topics:
    """Contract topic names; a prefix lets tests and staging share one broker safely."""

    prefix: str = ""

    @property
    def activity(self) -> str:
        return self.prefix + ACTIVITY_TOPIC

    @property
    def grants(self) -> str:
        return self.prefix + GRANTS_TOPIC

    @property
    def ledger(self) -> str:
        return self.prefix + LEDGER_TOPIC

    @property
    def dlq(self) -> str:
        return self.prefix + DLQ_TOPIC

    def all(self) -> list[str]:
        return [self.activity, self.grants, self.ledger, self.dlq]


@dataclass(frozen=True)
class Settings:
    database_url: str
    bootstrap_servers: str
    topics: Topics = field(default_factory=Topics)
    # Largest batch taken from Kafka per transaction: big enough to amortise the commit
    # (fsync) over thousands of events, small enough to keep a transaction short.
    max_batch: int = 5000
    # How long a consumer waits for a batch to fill: low, so latency stays low at low load.
    batch_wait_ms: int = 5
    # How long the broker may hold a fetch that finds no new records: Apache Kafka's
    # default. Kafka answers a held fetch as soon as a record arrives, so the hold costs no
    # latency and spares an idle consumer's empty fetches; Tansu answers only when the
    # hold ends, so stacks on Tansu set 5 (deploy/brokers.py, FETCH_WAIT_MS).
    fetch_wait_ms: int = 500
    pool_size: int = 8
    metrics_port: int = 0
    ledger_port: int = 8080
    api_keys: str = ""
    # Largest request body the ledger API reads (services/ledger/body_limit.py): its
    # bodies are a few hundred bytes, so 64 KiB is generous and bounds what a client
    # without a key can make it buffer.
    max_body_bytes: int = 64 * 1024
    webhook_url: str = ""
    webhook_secret: str = ""
    # A notification still refused this long after it was recorded is given up on
    # (`failed`), so it stops holding back the member's later ones.
    notifier_give_up_hours: float = 24.0
    expiry_sweep_seconds: int = 60
    # How long after a lot's expiry the ledger waits before journaling it, so that a refund
    # dated before the expiry but arriving after it still takes back from that lot, whether
    # or not a sweep came first (the expire entry is dated at the expiry either way).
    expiry_grace_seconds: int = 3600
    # The rules service's sweep of lapsed tiers (services/rules/tier_sweeper.py): how often,
    # and how old an expiry must be before it is applied (late events land first).
    tier_sweep_seconds: int = 60
    tier_sweep_grace_seconds: int = 3600
    # Activity dated more than this after the broker's timestamp of its record is refused
    # (dead-lettered) by the rules service; 0: none is. See services/rules/app.py.
    activity_max_ahead_seconds: int = 86_400
    session_timeout_ms: int = 10_000
    # How old the consumers' and producers' view of the topics may grow before they ask
    # again. A consumer whose topic was deleted is rebalanced to no partitions and sees
    # the topic created again only at its next look (aiokafka's default: 5 minutes, with
    # nothing consumed meanwhile); a producer keeps the old partition count until then.
    # One small metadata request per client per look.
    metadata_max_age_ms: int = 30_000
    # How soon a published rule-set version reaches an idle rules service (it also
    # checks before every batch).
    rulebook_poll_seconds: float = 5.0
    # How often each service looks for tables that outgrew their planner statistics
    # (services/common/planner_stats.py); 0 leaves it all to autovacuum.
    planner_stats_seconds: float = 2.0

    @property
    def group_prefix(self) -> str:
        return self.topics.prefix


def load_settings() -> Settings:
    """The settings from the environment, each checked against the range it needs (README,
    Configuration); the first out of range stops the process (`ConfigError`)."""
    return Settings(
        database_url=os.environ.get(
            "DATABASE_URL", "postgresql://loyalty:loyalty@127.0.0.1:55432/loyalty"
        ),
        bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092"),
        topics=Topics(prefix=os.environ.get("LOYALTY_TOPIC_PREFIX", "")),
        # 0 (or less) waits and fetches were taken as given: the consumers spun, taking
        # nothing, while /readyz said ready.
        max_batch=_int("CONSUMER_MAX_BATCH", 5000, 1),
        batch_wait_ms=_int("CONSUMER_BATCH_WAIT_MS", 5, 1),
        fetch_wait_ms=_int("CONSUMER_FETCH_WAIT_MS", 500, 1),
        pool_size=_int("DB_POOL_SIZE", 8, POOL_MIN_SIZE),
        metrics_port=_int("METRICS_PORT", 0, 1, 65_535, zero_off=True),
        ledger_port=_int("LEDGER_PORT", 8080, 1, 65_535),
        api_keys=os.environ.get("LEDGER_API_KEYS", ""),
        # Below the API's own bodies (a few hundred bytes), every write would be a 413.
        max_body_bytes=_int("LEDGER_MAX_BODY_BYTES", 64 * 1024, 1024),
        webhook_url=os.environ.get("NOTIFIER_WEBHOOK_URL", ""),
        webhook_secret=os.environ.get("NOTIFIER_WEBHOOK_SECRET", ""),
        notifier_give_up_hours=_float("NOTIFIER_GIVE_UP_HOURS", 24.0, 0.01),
        expiry_sweep_seconds=_int("EXPIRY_SWEEP_SECONDS", 60, 1),
        # A negative grace journaled expiries before the lots expired (a year early, for a
        # year's grace), which the append-only journal cannot take back; a grace of
        # centuries overflowed the date of every batch.
        expiry_grace_seconds=_int("EXPIRY_GRACE_SECONDS", 3600, 0, MAX_GRACE_S),
        tier_sweep_seconds=_int("TIER_SWEEP_SECONDS", 60, 1),
        tier_sweep_grace_seconds=_int("TIER_SWEEP_GRACE_SECONDS", 3600, 0, MAX_GRACE_S),
        activity_max_ahead_seconds=_int("ACTIVITY_MAX_AHEAD_SECONDS", 86_400, 0),
        # What Apache Kafka accepts by default (group.min/max.session.timeout.ms); the
        # heartbeat is a third of it.
        session_timeout_ms=_int("KAFKA_SESSION_TIMEOUT_MS", 10_000, 6000, 1_800_000),
        metadata_max_age_ms=_int("KAFKA_METADATA_MAX_AGE_MS", 30_000, 1000),
        rulebook_poll_seconds=_float("RULEBOOK_POLL_SECONDS", 5.0, 0.1),
        planner_stats_seconds=_float("PLANNER_STATS_SECONDS", 2.0, 0.1, zero_off=True),
    )


def redacted(url: str) -> str:
    """`url` with any password replaced by ``***``: for messages and logs, never the secret."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparsable URL>"
    if not password:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
