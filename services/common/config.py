"""Settings from the environment, read once at start-up by each service's bootstrap.

Defaults match `make up` so a developer can run a service by hand with no exports.
"""

from __future__ import annotations

import math
import os
import ssl
from collections.abc import Callable, Mapping
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


# What aiokafka speaks (and Amazon MSK, Confluent Cloud, Aiven ask for): OAUTHBEARER and
# GSSAPI need a token provider or Kerberos, which nothing here sets up.
SECURITY_PROTOCOLS: Final = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS: Final = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

# Every variable `load_kafka_security` reads: `make up` and `ledgerctl` pass them on as one.
KAFKA_SECURITY_VARS: Final = (
    "KAFKA_SECURITY_PROTOCOL",
    "KAFKA_SASL_MECHANISM",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
    "KAFKA_SSL_CAFILE",
    "KAFKA_SSL_CERTFILE",
    "KAFKA_SSL_KEYFILE",
)


@dataclass(frozen=True)
class KafkaSecurity:
    """How the Kafka clients prove who they are and check whom they talk to.

    The default, PLAINTEXT, is what `make up`'s own brokers speak. The password is kept
    out of `repr`, so a settings object in a log line or a traceback does not carry it.
    """

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_cafile: str = ""  # PEM; empty: the system's trust store
    ssl_certfile: str = ""  # a client certificate (mutual TLS), PEM
    ssl_keyfile: str = ""  # its key, PEM, unencrypted; empty: in the certificate's file

    @property
    def sasl(self) -> bool:
        return self.protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")


@dataclass(frozen=True)
class KafkaAccess:
    """Where the brokers are and how to reach them: what every Kafka client is made from
    (`services.common.kafka_clients`)."""

    bootstrap_servers: str
    security: KafkaSecurity = field(default_factory=KafkaSecurity)


def _group_prefix(name: str) -> str | None:
    """None (the topic prefix) if unset or empty. Else what Kafka allows in a topic name,
    which its tools and ACLs take as it is: a group id may hold anything, but one with a
    space, a slash or a newline (a value pasted from a file) is hard to name again."""
    raw = os.environ.get(name, "")
    if not raw:
        return None
    if len(raw) > 200 or not all(c.isascii() and (c.isalnum() or c in "._-") for c in raw):
        raise ConfigError(f"{name}={raw!r}: must be up to 200 letters, digits, '.', '_', '-'")
    return raw


@dataclass(frozen=True)
class Settings:
    database_url: str
    bootstrap_servers: str
    topics: Topics = field(default_factory=Topics)
    kafka_security: KafkaSecurity = field(default_factory=KafkaSecurity)
    # LOYALTY_GROUP_PREFIX, of the Kafka consumer groups alone (`group_prefix`).
    kafka_group_prefix: str | None = None
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
        """The Kafka consumer groups' (LOYALTY_GROUP_PREFIX, else the topic prefix): on a
        shared cluster the bare "rules", "ledger" and "notifier" clash with other
        applications' groups, and the topic prefix renames the contract's topics too."""
        return self.topics.prefix if self.kafka_group_prefix is None else self.kafka_group_prefix

    @property
    def consumer_prefix(self) -> str:
        """The consumers' own names': they key the offsets stored in Postgres, the dead
        letters and the metrics, so they keep the topic prefix whatever the groups are
        called, and renaming the groups re-reads nothing (an offset not found starts at 0)."""
        return self.topics.prefix

    @property
    def kafka(self) -> KafkaAccess:
        return KafkaAccess(self.bootstrap_servers, self.kafka_security)


def load_settings() -> Settings:
    """The settings from the environment, each checked against the range it needs (README,
    Configuration); the first out of range stops the process (`ConfigError`)."""
    return Settings(
        database_url=os.environ.get(
            "DATABASE_URL", "postgresql://loyalty:loyalty@127.0.0.1:55432/loyalty"
        ),
        bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092"),
        topics=Topics(prefix=os.environ.get("LOYALTY_TOPIC_PREFIX", "")),
        kafka_security=load_kafka_security(),
        kafka_group_prefix=_group_prefix("LOYALTY_GROUP_PREFIX"),
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


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip()
    value = raw.upper() or default  # as the Java clients take them, in any case
    if value not in choices:
        raise ConfigError(f"{name}={raw!r}: must be one of {', '.join(choices)}")
    return value


def load_kafka_security(env: Mapping[str, str] = os.environ) -> KafkaSecurity:
    """The KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_* and KAFKA_SSL_* settings in `env`, refused
    when they contradict each other: a client given credentials or certificates its
    protocol does not use would connect without them, and learn nothing of why it failed
    (a PLAINTEXT client of a SASL listener sees only its connection closed)."""
    protocol = _choice(env, "KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", SECURITY_PROTOCOLS)
    security = KafkaSecurity(
        protocol=protocol,
        sasl_mechanism=_choice(env, "KAFKA_SASL_MECHANISM", "PLAIN", SASL_MECHANISMS),
        sasl_username=env.get("KAFKA_SASL_USERNAME", ""),
        sasl_password=env.get("KAFKA_SASL_PASSWORD", ""),
        ssl_cafile=env.get("KAFKA_SSL_CAFILE", "").strip(),
        ssl_certfile=env.get("KAFKA_SSL_CERTFILE", "").strip(),
        ssl_keyfile=env.get("KAFKA_SSL_KEYFILE", "").strip(),
    )
    given = {name for name in KAFKA_SECURITY_VARS if env.get(name, "").strip()}
    if security.sasl:
        lacking = [n for n in ("KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD") if n not in given]
        if lacking:
            raise ConfigError(f"KAFKA_SECURITY_PROTOCOL={protocol} needs {' and '.join(lacking)}")
    else:
        _unused(protocol, sorted(given & {n for n in KAFKA_SECURITY_VARS if "_SASL_" in n}))
    if security.tls:
        _check_tls_files(security)
    else:
        _unused(protocol, sorted(given & {n for n in KAFKA_SECURITY_VARS if "_SSL_" in n}))
    return security


def _unused(protocol: str, names: list[str]) -> None:
    if names:
        raise ConfigError(
            f"{', '.join(names)} set, but KAFKA_SECURITY_PROTOCOL={protocol} does not use"
            f" {'it' if len(names) == 1 else 'them'}"
        )


def _check_tls_files(security: KafkaSecurity) -> None:
    """Loads the CA and client certificate as the clients will (`kafka_clients`), so that a
    missing or unreadable file stops the process at start with its name, not the first
    connection some seconds later in a traceback."""
    files = {
        "KAFKA_SSL_CAFILE": security.ssl_cafile,
        "KAFKA_SSL_CERTFILE": security.ssl_certfile,
        "KAFKA_SSL_KEYFILE": security.ssl_keyfile,
    }
    for name, path in files.items():
        if path and not os.path.isfile(path):
            raise ConfigError(f"{name}={path}: no such file")
    if security.ssl_keyfile and not security.ssl_certfile:
        raise ConfigError("KAFKA_SSL_KEYFILE set without KAFKA_SSL_CERTFILE")
    context = ssl.create_default_context()
    try:
        if security.ssl_cafile:
            context.load_verify_locations(cafile=security.ssl_cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"KAFKA_SSL_CAFILE={security.ssl_cafile}: not a PEM CA ({exc})") from None
    try:
        if security.ssl_certfile:
            context.load_cert_chain(
                security.ssl_certfile, security.ssl_keyfile or None, password=refuse_key_password
            )
    except (OSError, ssl.SSLError, ValueError) as exc:
        where = f"KAFKA_SSL_CERTFILE={security.ssl_certfile}"
        if security.ssl_keyfile:
            where += f", KAFKA_SSL_KEYFILE={security.ssl_keyfile}"
        raise ConfigError(f"{where}: not a PEM certificate and its key ({exc})") from None


def refuse_key_password() -> str:
    """The password callback for the client key: without one, OpenSSL asks for the password
    of an encrypted key on the terminal, and a service with none would wait there."""
    raise ValueError("the key is encrypted; give an unencrypted one")


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
