"""``python -m deploy.stack up|down|status``: the whole local stack in the background.

``up`` brings up, in order, and leaves alone whatever is already healthy:

1. Postgres: ``DATABASE_URL`` if set (external, not managed; it sticks until given again,
   empty for the local one again); else a local cluster with data in ``.run/pgdata``
   (kept across down/up) on ``PG_PORT`` (default 55432).
2. Broker: ``KAFKA_BOOTSTRAP_SERVERS`` if set (external, sticky the same way); else Tansu
   on 19092 (default, memory only) or Apache Kafka with ``BROKER=kafka`` on 29092, data in
   ``.run/kafka-data`` (kept across down/up). The choice sticks until BROKER is given again,
   and so do the ports (``PG_PORT``, ``TANSU_PORT``, ``KAFKA_PORT``: :data:`PORTS`).
3. Topics (``TOPIC_PARTITIONS`` partitions, default 6, for the ones created new; those
   that exist keep theirs, and their count is recorded) and DB migrations
   (``services.common.migrations.apply_migrations(dsn)``).
4. ``.run/stack.env``: the settings every service and tool reads. Generated API keys are
   reused from an existing file so clients keep working across restarts.
5. The services in :data:`SERVICES`, each its own process with ``stack.env`` in its
   environment, logging to ``.run/logs/<name>.log``, pid in ``.run/<name>.pid``.

``down`` stops services, then the broker, then Postgres (data kept). ``status`` prints a
table of components. Pid files carry no state beyond the pid; liveness is checked against
what only the stack's own process has (a service: its command line and this checkout as
its working directory; the broker: its port or data dir; Postgres: its data dir), so a
stale pid reused by another process reads as "dead" and is never stopped.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from deploy import local
from services.common import stack_env as env_file
from services.common.config import KAFKA_SECURITY_VARS, KafkaAccess, Topics, load_kafka_security
from services.common.migrations import apply_migrations as migrate

ROOT = local.REPO_ROOT
# STACK_RUN_DIR lets a second stack (a test of this module) live beside a developer's.
RUN = Path(os.environ.get("STACK_RUN_DIR", ROOT / ".run")).resolve()
LOGS = RUN / "logs"
STACK_ENV = RUN / "stack.env"
PG_DATA = RUN / "pgdata"
KAFKA_DATA = RUN / "kafka-data"

# The local processes' ports: sticky too (see STICKY), read by `up` alone. A broker that died
# and is started again must come back on the port the services and stack.env know.
PORTS: dict[str, int] = {
    "PG_PORT": 55432,
    "TANSU_PORT": 19092,
    "KAFKA_PORT": 29092,
    "KAFKA_CONTROLLER_PORT": 29093,
}

# Settings one `up` was given stick to the next ones (kept in stack.env) until given again
# (empty to clear): a plain `make up` that restarts one dead service must not start it, or
# the others, with a different configuration. (variable, default written when never given;
# None: left out, so the service's own default applies.)
STICKY: tuple[tuple[str, str | None], ...] = (
    ("TOPIC_PARTITIONS", "6"),
    ("LOYALTY_TOPIC_PREFIX", ""),
    ("LOYALTY_GROUP_PREFIX", None),
    ("RULES_METRICS_PORT", "9101"),
    ("NOTIFIER_METRICS_PORT", "9102"),
    ("LEDGER_HOST", None),
    ("LEDGER_MAX_BODY_BYTES", None),
    ("NOTIFIER_WEBHOOK_URL", None),
    ("NOTIFIER_WEBHOOK_SECRET", None),
    ("NOTIFIER_GIVE_UP_HOURS", None),
    ("CONSUMER_MAX_BATCH", None),
    ("CONSUMER_BATCH_WAIT_MS", None),
    ("DB_POOL_SIZE", None),
    ("KAFKA_SESSION_TIMEOUT_MS", None),
    ("KAFKA_METADATA_MAX_AGE_MS", None),
    ("RULEBOOK_POLL_SECONDS", None),
    ("EXPIRY_SWEEP_SECONDS", None),
    ("EXPIRY_GRACE_SECONDS", None),
    ("TIER_SWEEP_SECONDS", None),
    ("TIER_SWEEP_GRACE_SECONDS", None),
    ("ACTIVITY_MAX_AHEAD_SECONDS", None),
    ("PLANNER_STATS_SECONDS", None),
    ("LOG_LEVEL", None),
    ("LOYALTY_NATIVE", None),
    *((var, str(number)) for var, number in PORTS.items()),
)


def sticky(previous: dict[str, str]) -> dict[str, str]:
    """The sticky settings: given now, else as the last `up` wrote them, else defaults.
    What `make demo` wrote (its own topics and webhook receiver) does not stick; the
    ports it ran the stack on are the stack's."""
    if previous.get("STACK_WRITER") == "demo":
        previous = {k: v for k, v in previous.items() if k in PORTS}
    previous = {**_ports_in_use(previous), **previous}
    out: dict[str, str] = {}
    for var, default in STICKY:
        value = os.environ.get(var, previous.get(var, default))
        if value == "":  # given empty: cleared, back to the default (or the service's own)
            value = default
        if value is not None:
            out[var] = value
    return out


def _ports_in_use(previous: dict[str, str]) -> dict[str, str]:
    """The ports of the addresses a stack.env written before the ports stuck names (its
    local Postgres, its broker), so the first `up` after the upgrade keeps them too."""
    found: dict[str, str] = {}
    addresses = [("PG_PORT", "DATABASE_URL", previous.get("POSTGRES") == "local")]
    for kind in ("tansu", "kafka"):
        addresses.append(
            (f"{kind.upper()}_PORT", "KAFKA_BOOTSTRAP_SERVERS", previous.get("BROKER") == kind)
        )
    for var, address, ours in addresses:
        if not ours or not previous.get(address):
            continue
        where = previous[address]
        try:
            port = urlsplit(where if "://" in where else f"//{where}").port
        except ValueError:
            continue
        if port:
            found[var] = str(port)
    return found


def port(previous: dict[str, str], var: str) -> int:
    """A local process's port, sticky like the settings above."""
    value = sticky(previous)[var]
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise SystemExit(f"{var} must be a port number (1-65535), not {value!r}")
    return int(value)


def topics(previous: dict[str, str]) -> list[str]:
    """The contract's topics with the stack's LOYALTY_TOPIC_PREFIX, as the services read it."""
    return Topics(prefix=sticky(previous)["LOYALTY_TOPIC_PREFIX"]).all()


#: (name, python module) of each service process, started in this order, stopped in reverse.
SERVICES: list[tuple[str, str]] = [
    ("rules", "services.rules"),
    ("ledger", "services.ledger"),
    ("notifier", "services.notifier"),
]


def say(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------
# stack.env
# --------------------------------------------------------------------------------------


def read_env_file(path: Path = STACK_ENV) -> dict[str, str]:
    """The settings the last `up` wrote (`services.common.stack_env`); none without a file."""
    try:
        return env_file.parse(path.read_text())
    except OSError:
        return {}


def write_env_file(env: dict[str, str], path: Path = STACK_ENV) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# written by `python -m deploy.stack up`; regenerated on every up"]
    lines += [env_file.line(k, v) for k, v in env.items()]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.chmod(tmp, 0o600)  # holds API keys
    tmp.replace(path)


def _shown(path: Path) -> str:
    """Repo-relative when under the repo (short), absolute otherwise."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def _pidfile(name: str) -> Path:
    return RUN / f"{name}.pid"


# --------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------


def _external(previous: dict[str, str], var: str, recorded_kind: str | None) -> str | None:
    """The address of the external server `var` names, None for the stack's own. Given,
    unless it is only the address this stack wrote for its own server (a shell that
    exported stack.env); not given, the one the last `up` was pointed at, since it sticks
    like the other settings (a plain `make up` from cron moved the services to a fresh
    local server); given empty, cleared: the stack's own again."""
    given = os.environ.get(var)
    if given is None:
        if f"EXTERNAL_{var}" in previous:  # what the stack runs on, whoever wrote the file
            return previous[f"EXTERNAL_{var}"] or None
        if recorded_kind != "external" or previous.get("STACK_WRITER") == "demo":
            return None  # (a file from before EXTERNAL_* was written)
        return previous.get(var) or None
    ours = recorded_kind not in (None, "external") and given == previous.get(var)
    return None if ours else given or None


def external_postgres(previous: dict[str, str]) -> str | None:
    return _external(previous, "DATABASE_URL", previous.get("POSTGRES"))


def external_broker(previous: dict[str, str]) -> str | None:
    return _external(previous, "KAFKA_BOOTSTRAP_SERVERS", previous.get("BROKER"))


def kafka_security_env(previous: dict[str, str], broker_kind: str) -> dict[str, str]:
    """The `KAFKA_SECURITY_VARS` of an external broker (its TLS and SASL), sticky like the
    settings above: given, else as the last `up` wrote them; given empty, cleared. None for
    the stack's own broker, which speaks PLAINTEXT: they would keep every client off it."""
    if broker_kind != "external":
        return {}
    chosen = {var: os.environ.get(var, previous.get(var, "")) for var in KAFKA_SECURITY_VARS}
    return {var: value for var, value in chosen.items() if value}


def kafka_access(previous: dict[str, str], broker_kind: str, bootstrap: str) -> KafkaAccess:
    """How `up` and the services reach the broker; settings that cannot work stop `up`
    with the line a service would have stopped with (`ConfigError`)."""
    ignored = [var for var in KAFKA_SECURITY_VARS if os.environ.get(var)]
    if broker_kind != "external" and ignored:
        say(f"broker: {', '.join(ignored)} left out: they are for an external broker")
    return KafkaAccess(bootstrap, load_kafka_security(kafka_security_env(previous, broker_kind)))


def ensure_postgres(previous: dict[str, str]) -> str:
    """DSN of the stack's database, starting the local cluster if we manage it."""
    external = external_postgres(previous)
    if external:
        say("postgres: external (DATABASE_URL)")
        return external
    pg_port = port(previous, "PG_PORT")
    was_running = local.postgres_running(PG_DATA)
    dsn = local.start_postgres(PG_DATA, pg_port, log_path=LOGS / "postgres.log")
    pid = local.postgres_pid(PG_DATA)
    if pid:
        local.write_pid(_pidfile("postgres"), pid)
    where = dsn.rsplit("@", 1)[1].split("/")[0]
    say(f"postgres: {'already running' if was_running else 'started'} on {where} (pid {pid})")
    return dsn


def broker_pid(kind: str, recorded: dict[str, str]) -> int | None:
    """The pid in broker.pid while it is this stack's broker of `kind`: Kafka on this
    stack's data dir, Tansu on this stack's port (`recorded`: the stack.env the `up` that
    started it wrote). Any process with 'tansu' in its command line, another stack's
    broker too, was taken for it, and `make down` stopped it."""
    pid = local.read_pid(_pidfile("broker"))
    if kind == "kafka":
        mark = str(KAFKA_DATA / "server.properties")
    else:
        mark = f"tcp://{_broker_address(kind, recorded)}"
    return pid if mark in local.process_args(pid) else None


def _broker_address(kind: str, recorded: dict[str, str]) -> str:
    """Where the stack's broker of `kind` listens: the address an `up` on it wrote (a port
    given later while it ran did not move it), else the port recorded for it."""
    var = f"{kind.upper()}_PORT"
    ports = {**recorded, **_ports_in_use(recorded)}
    return f"127.0.0.1:{ports.get(var, PORTS[var])}"


def service_pid(name: str, module: str) -> int | None:
    """The pid in `<name>.pid` while it is this stack's service: `python -m <module>` run
    in this checkout. The pid of one that died may by now name any process, another
    checkout's service too, which status called alive and `make down` stopped."""
    pid = local.read_pid(_pidfile(name))
    if local.process_args(pid)[1:] != ["-m", module] or local.process_cwd(pid) != ROOT:
        return None
    return pid


def ensure_broker(previous: dict[str, str]) -> tuple[str, str]:
    """(kind, bootstrap) of the stack's broker, starting it if we manage it.

    The kind is ``BROKER`` if set, else the one the last ``up`` used, else tansu. One of
    that kind still running is kept, also after the stack ran on an external broker (it
    was taken for another process on the port). If a broker of another kind is running
    (BROKER changed), it is stopped first: only one managed broker at a time.
    """
    external = external_broker(previous)
    if external:
        say("broker: external (KAFKA_BOOTSTRAP_SERVERS)")
        return "external", external
    # Sticky: after `BROKER=kafka up`, a plain `up` keeps Kafka (switch back explicitly).
    prev = previous.get("BROKER", "")
    if prev not in ("tansu", "kafka"):  # external last time: the stack's own broker before it
        prev = previous.get("LOCAL_BROKER") or (
            "kafka" if broker_pid("kafka", previous) else "tansu"
        )
    kind = os.environ.get("BROKER", prev).lower()
    if kind not in ("tansu", "kafka"):
        raise SystemExit(f"BROKER must be tansu or kafka, not {kind!r}")
    pid = broker_pid(kind, previous)
    if pid:
        bootstrap = _broker_address(kind, previous)
        try:
            local.wait_for_broker(bootstrap, 30, pid=pid)
        except (RuntimeError, TimeoutError) as exc:  # dying or wedged: replace it
            say(f"broker: {kind} (pid {pid}) not answering, restarting ({exc})")
            local.stop_pid(pid, 30)
        else:
            say(f"broker: {kind} already running on {bootstrap} (pid {pid})")
            return kind, bootstrap
    other = "kafka" if kind == "tansu" else "tansu"
    old = broker_pid(other, previous)
    if old:
        say(f"broker: stopping {other} (pid {old}) to switch to {kind}")
        local.stop_pid(old, 30)
    port_vars = ("TANSU_PORT",) if kind == "tansu" else ("KAFKA_PORT", "KAFKA_CONTROLLER_PORT")
    ports = {var: port(previous, var) for var in port_vars}
    for var, number in ports.items():
        if local.port_open("127.0.0.1", number):  # the broker would fail, in a traceback
            raise SystemExit(
                f"broker: port {number} is taken by another process, not this stack's broker:"
                f" stop it, or give {var} another port"
            )
    t0 = time.monotonic()
    if kind == "tansu":
        pid, bootstrap = local.start_tansu(ports["TANSU_PORT"], LOGS / "tansu.log")
        note = "memory storage: topics and offsets reset on restart"
    else:
        kafka_ports = ports["KAFKA_PORT"], ports["KAFKA_CONTROLLER_PORT"]
        pid, bootstrap = local.start_kafka(*kafka_ports, KAFKA_DATA, LOGS / "kafka.log")
        note = f"Apache Kafka {local.KAFKA_VERSION}, data in {_shown(KAFKA_DATA)}"
    local.write_pid(_pidfile("broker"), pid)
    say(f"broker: {kind} started on {bootstrap} (pid {pid}, {time.monotonic() - t0:.1f}s; {note})")
    return kind, bootstrap


def apply_migrations(dsn: str) -> None:
    """The versioned SQL files of deploy/migrations, applied by yoyo like everywhere else."""
    applied = migrate(dsn)
    say(f"migrations: {applied} applied")


def build_env(
    previous: dict[str, str], dsn: str, broker_kind: str, bootstrap: str
) -> dict[str, str]:
    """The contents of stack.env. The three role keys: given, else the previous file's,
    else generated once; `LEDGER_API_KEYS` adds keys of its own, kept like the sticky
    settings (given again, they replace the ones added before)."""
    ops_key = _key("LEDGER_OPS_KEY", previous, "ops")
    reader_key = _key("LEDGER_READER_KEY", previous, "rd")
    redeemer_key = _key("LEDGER_REDEEMER_KEY", previous, "rdm")
    keys = [f"{ops_key}:ops", f"{reader_key}:reader", f"{redeemer_key}:redeemer"]
    added = os.environ.get("LEDGER_API_KEYS", previous.get("LEDGER_API_KEYS", ""))
    previous_roles = {previous.get(v) for v in ROLE_KEYS} - {None}
    keys += [
        k for k in _api_keys(added) if k not in keys and k.rpartition(":")[0] not in previous_roles
    ]
    # Given empty: cleared, the ledger's default (as sticky() does for the others).
    ledger_port = os.environ.get("LEDGER_PORT", previous.get("LEDGER_PORT", "")) or "8080"
    settings = sticky(previous)
    external_db, external_kafka = external_postgres(previous), external_broker(previous)
    local_broker = broker_kind if broker_kind in ("tansu", "kafka") else None
    return {
        "POSTGRES": "external" if external_db else "local",
        "BROKER": broker_kind,
        # The servers the stack runs on, kept apart from the addresses its services are
        # given (the demo gives them its own database): a plain `up` after `make demo`
        # went back to local ones. And the kind of the stack's own broker, for the `up`
        # that leaves an external one (it took Tansu, stopping the stack's Kafka).
        "EXTERNAL_DATABASE_URL": external_db or "",
        "EXTERNAL_KAFKA_BOOTSTRAP_SERVERS": external_kafka or "",
        "LOCAL_BROKER": local_broker or previous.get("LOCAL_BROKER", ""),
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "DATABASE_URL": dsn,
        "LEDGER_PORT": ledger_port,
        "LEDGER_API_URL": api_url(settings.get("LEDGER_HOST"), ledger_port),
        "LEDGER_OPS_KEY": ops_key,
        "LEDGER_READER_KEY": reader_key,
        "LEDGER_REDEEMER_KEY": redeemer_key,
        "LEDGER_API_KEYS": ",".join(keys),
        **local.consumer_env(broker_kind, previous),
        **kafka_security_env(previous, broker_kind),
        # (The ledger serves /metrics on its API port; the others get a port of their own.)
        **settings,
    }


def api_url(host: str | None, ledger_port: str) -> str:
    """Where clients reach the ledger: the address it listens on (a fixed 127.0.0.1
    reached nothing when it listened on 127.0.0.2); loopback when that is every interface."""
    if not host or host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"http://{host}:{ledger_port}"


ROLE_KEYS = ("LEDGER_OPS_KEY", "LEDGER_READER_KEY", "LEDGER_REDEEMER_KEY")


def _key(var: str, previous: dict[str, str], prefix: str) -> str:
    """Given empty (`LEDGER_OPS_KEY= make up`, README: "empty to clear it"), a new key: that
    is how a leaked key is revoked. An empty value used to fall through to the old key."""
    given = os.environ.get(var)
    if given is None:
        given = previous.get(var)
    return given or f"{prefix}_{secrets.token_urlsafe(24)}"


def _api_keys(value: str) -> list[str]:
    """`key:role,...` entries, checked here so that a typo fails `make up`, not the API.
    A bad entry is named by its position only, never by its text, not even the part after
    the last colon (a key may hold a colon, and what follows it is then the key's tail):
    the key is a secret, and `make up`'s output may be recorded."""
    entries = [e.strip() for e in value.split(",") if e.strip()]
    for n, e in enumerate(entries, 1):
        key, _, role = e.rpartition(":")
        if not (key and role in ("reader", "redeemer", "ops")):
            raise SystemExit(
                f"LEDGER_API_KEYS entry {n} is not key:role (role reader, redeemer or ops)"
            )
    return entries


def ensure_services(stack_env: dict[str, str], restart: bool = False) -> bool:
    """Start each service that is not running; False if one could not be, its port being
    taken (another stack's, say): it would bind and exit some 5 s later, when `up` had
    already called it started. Whether the started ones come up is `wait_ready`'s.

    ``restart`` stops running ones first: used when stack.env changed (e.g. another
    broker address), since a process only reads its environment at start.
    """
    env = {**os.environ, **stack_env, "PYTHONUNBUFFERED": "1"}
    # Cleared (left out of stack.env): not from this shell either.
    for var in [*(var for var, _ in STICKY), *KAFKA_SECURITY_VARS]:
        if var not in stack_env:
            env.pop(var, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    ok = True
    for name, module in SERVICES:
        pid = service_pid(name, module)
        if pid:
            if not restart:
                say(f"{name}: already running (pid {pid})")
                continue
            say(f"{name}: restarting (pid {pid}), its settings changed")
            local.stop_pid(pid, 15)
        log = LOGS / f"{name}.log"
        service_env = {**env, "METRICS_PORT": env.get(f"{name.upper()}_METRICS_PORT", "0")}
        where = _listens_on(name, service_env)
        if where and local.port_open(*where):
            ok = False
            say(f"{name}: port {where[1]} on {where[0]} is taken by another process, not started")
            continue
        pid = local.start_process([sys.executable, "-m", module], log, env=service_env, cwd=ROOT)
        local.write_pid(_pidfile(name), pid)
        say(f"{name}: started (pid {pid}, log {_shown(log)})")
    return ok


def _listens_on(name: str, env: dict[str, str]) -> tuple[str, int] | None:
    """(host, port) service `name` binds, as a client reaches it; None: no port."""
    if name == "ledger":
        url = urlsplit(api_url(env.get("LEDGER_HOST"), env.get("LEDGER_PORT", "8080")))
        host, given = url.hostname or "127.0.0.1", url.netloc.rpartition(":")[2]
    else:
        host, given = "127.0.0.1", env.get("METRICS_PORT", "0")
    return (host, int(given)) if given.isdigit() and int(given) else None


def up() -> int:
    RUN.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(exist_ok=True)
    previous = read_env_file()
    dsn = ensure_postgres(previous)
    kind, bootstrap = ensure_broker(previous)
    kafka = kafka_access(previous, kind, bootstrap)
    names = topics(previous)
    partitions = ensure_topics(kafka, names, int(sticky(previous)["TOPIC_PARTITIONS"]))
    apply_migrations(dsn)
    stack_env = {**build_env(previous, dsn, kind, bootstrap), "TOPIC_PARTITIONS": partitions}
    write_env_file(stack_env)
    say(f"env: {STACK_ENV}")
    changed = sorted(
        k
        for k in stack_env.keys() | previous.keys()
        # What only `up` reads: the ports (what changes for the services is the address)
        # and the partitions of topics it creates.
        if previous and previous.get(k) != stack_env.get(k) and k not in UP_ONLY
    )
    if changed:
        say(f"settings changed since the last up: {', '.join(changed)}")
    if not ensure_services(stack_env, restart=bool(changed)):
        return 1
    return 0 if wait_ready(stack_env["LEDGER_API_URL"]) else 1


UP_ONLY = {*PORTS, "TOPIC_PARTITIONS", "EXTERNAL_DATABASE_URL", "EXTERNAL_KAFKA_BOOTSTRAP_SERVERS",
           "LOCAL_BROKER"}  # fmt: skip


def ensure_topics(kafka: KafkaAccess, names: list[str], wanted: int) -> str:
    """Creates the missing topics with `wanted` partitions; the count the topics have, to
    record: an existing topic keeps its own, and the count recorded is what a memory-only
    Tansu started again creates them with (another would move members to other
    partitions, their events then applied out of order)."""
    counts = local.create_topics(kafka, names, wanted)
    have = sorted(set(counts.values()))
    if len(have) == 1:
        say(f"topics: {', '.join(names)} ({have[0]} partitions)")
    else:
        say(f"topics: {', '.join(f'{n} ({counts[n]} partitions)' for n in names)}")
    if have != [wanted]:
        say(
            f"topics: TOPIC_PARTITIONS={wanted} left them as they are: it applies to topics"
            " created new only, as partitions added to a topic move members to others"
            " (recreate them to change it)"
        )
    return str(have[0]) if len(have) == 1 else str(wanted)


def wait_ready(api_url: str, timeout: float = 90.0) -> bool:
    """`up` returns once the ledger answers /readyz (database and consumers assigned) and
    every service still runs: a 200 alone may come from whatever else answers on the
    port, and a service that exits on start takes seconds to do so."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            ready = httpx.get(f"{api_url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            ready = False
        gone = [name for name, module in SERVICES if service_pid(name, module) is None]
        for name in gone:
            say(f"{name}: EXITED before the stack was ready, see {_shown(LOGS / name)}.log")
        if gone:
            return False
        if ready:
            say(f"ledger: ready at {api_url}")
            return True
        if time.monotonic() > deadline:
            say(f"ledger: not ready after {timeout:.0f}s, see {_shown(LOGS / 'ledger.log')}")
            return False
        time.sleep(0.5)


def down() -> int:
    for name, module in reversed(SERVICES):
        pid = service_pid(name, module)
        if pid:
            local.stop_pid(pid, 15)
            say(f"{name}: stopped (pid {pid})")
        _pidfile(name).unlink(missing_ok=True)
    recorded = read_env_file()
    for kind in ("tansu", "kafka"):  # whatever we started last, even if now "external"
        pid = broker_pid(kind, recorded)
        if pid:
            local.stop_pid(pid, 30)
            say(f"broker: {kind} stopped (pid {pid})")
    _pidfile("broker").unlink(missing_ok=True)
    if local.postgres_running(PG_DATA):
        local.stop_postgres(PG_DATA)
        say(f"postgres: stopped (data kept in {_shown(PG_DATA)})")
    _pidfile("postgres").unlink(missing_ok=True)
    return 0


def status() -> int:
    """Print one line per component; exit 0 when every managed component is alive."""
    env = read_env_file()
    rows: list[tuple[str, str, str, str]] = []
    if local.postgres_running(PG_DATA):
        rows.append(("postgres", str(local.postgres_pid(PG_DATA)), "alive", str(_shown(PG_DATA))))
    elif env.get("POSTGRES") == "external":
        rows.append(("postgres", "-", "external", env["DATABASE_URL"].rsplit("@", 1)[-1]))
    else:
        rows.append(("postgres", "-", "dead", str(_shown(PG_DATA))))
    kind = env.get("BROKER", "-")
    if kind == "external":
        rows.append(("broker", "-", "external", env.get("KAFKA_BOOTSTRAP_SERVERS", "")))
    else:
        pid = local.read_pid(_pidfile("broker"))
        alive = kind in ("tansu", "kafka") and broker_pid(kind, env) is not None
        rows.append(
            (
                f"broker ({kind})",
                str(pid or "-"),
                "alive" if alive else "dead",
                env.get("KAFKA_BOOTSTRAP_SERVERS", ""),
            )
        )
    for name, module in SERVICES:
        pid = local.read_pid(_pidfile(name))
        alive = service_pid(name, module) is not None
        log = _shown(LOGS / f"{name}.log")
        rows.append((name, str(pid or "-"), "alive" if alive else "dead", log))
    header = ("component", "pid", "state", "where")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for r in [header, *rows]:
        say("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0 if all(r[2] in ("alive", "external") for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.stack", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    return {"up": up, "down": down, "status": status}[args.command]()


if __name__ == "__main__":
    sys.exit(main())
