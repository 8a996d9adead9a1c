"""`make up` and LOYALTY_TOPIC_PREFIX: the topics it creates and the stack.env it writes
carry the prefix the services will read (a fresh interpreter: the module reads the
environment once, on import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = (
    "import json; from deploy import stack; "
    "print(json.dumps([stack.topics({}), "
    "stack.build_env({}, 'postgresql://x@h/db', 'tansu', '127.0.0.1:1')['LOYALTY_TOPIC_PREFIX']]))"
)


def probe(prefix: str | None) -> list[object]:
    env = {k: v for k, v in os.environ.items() if k != "LOYALTY_TOPIC_PREFIX"}
    if prefix is not None:
        env["LOYALTY_TOPIC_PREFIX"] = prefix
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    return list(json.loads(out.stdout))


def test_make_up_creates_and_records_the_prefixed_topics() -> None:
    topics, prefix = probe("staging.")
    assert topics == [
        "staging.loyalty.activity.v1",
        "staging.loyalty.grants.v1",
        "staging.loyalty.ledger.v1",
        "staging.loyalty.dlq.v1",
    ]
    assert prefix == "staging."
    topics, prefix = probe(None)
    assert topics == ["loyalty.activity.v1", "loyalty.grants.v1", "loyalty.ledger.v1",
                      "loyalty.dlq.v1"]  # fmt: skip
    assert prefix == ""


def build_env_with(env: dict[str, str], previous: dict[str, str]) -> dict[str, str]:
    """stack.env as `make up` would write it, in a fresh interpreter with `env` set."""
    code = (
        "import json, sys; from deploy import stack; "
        "print(json.dumps(stack.build_env(json.loads(sys.argv[1]), 'postgresql://x@h/db',"
        " 'tansu', '127.0.0.1:1')))"
    )
    ours = ("LEDGER_API_KEYS", "DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "LEDGER_OPS_KEY",
            "LEDGER_READER_KEY", "LEDGER_REDEEMER_KEY", "LEDGER_PORT", "LEDGER_HOST")  # fmt: skip
    clean = {k: v for k, v in os.environ.items() if k not in ours}
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(previous)],
        env={**clean, **env, "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True,
        text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_make_up_serves_a_key_of_each_role_and_the_ones_ops_add() -> None:
    first = build_env_with({"LEDGER_API_KEYS": "clinic_app_key:redeemer"}, {})
    keys = first["LEDGER_API_KEYS"].split(",")
    roles = {k.rpartition(":")[2] for k in keys}
    assert roles == {"ops", "reader", "redeemer"}
    assert f"{first['LEDGER_REDEEMER_KEY']}:redeemer" in keys
    assert "clinic_app_key:redeemer" in keys
    # Generated keys are kept across restarts; an exported stack.env adds nothing twice.
    again = build_env_with({"LEDGER_API_KEYS": first["LEDGER_API_KEYS"]}, first)
    assert again["LEDGER_API_KEYS"] == first["LEDGER_API_KEYS"]


def test_a_malformed_key_stops_make_up_with_the_entry_named() -> None:
    """Named by position only, never by any of its text: the message goes to the terminal
    and whatever records it, and what follows a colon may be the tail of a key."""
    code = "from deploy import stack; stack.build_env({}, 'postgresql://x@h/db', 'tansu', 'b:1')"
    for keys, says in [
        ("nokey", "entry 1 is not key:role"),
        ("ok_key:ops,pos_s3cret:admin", "entry 2 is not key:role"),
        ("ok_key:ops,pos:s3cret", "entry 2 is not key:role"),
    ]:
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "LEDGER_API_KEYS": keys, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
            capture_output=True, text=True,
        )  # fmt: skip
        assert out.returncode != 0
        assert says in out.stderr
        assert "nokey" not in out.stderr, out.stderr
        assert "s3cret" not in out.stderr, out.stderr
        assert "admin" not in out.stderr, out.stderr


def test_an_emptied_role_key_is_replaced_and_no_longer_served() -> None:
    """README: 'empty to clear it'. `LEDGER_OPS_KEY= make up`, to revoke a leaked key, kept
    the old one (an empty value fell through to the previous file's)."""
    first = build_env_with({}, {})
    leaked = first["LEDGER_OPS_KEY"]
    # From a clean shell, and from one that exported stack.env and cleared only that key.
    kept = ("LEDGER_API_KEYS", "LEDGER_READER_KEY", "LEDGER_REDEEMER_KEY")
    exported = {k: first[k] for k in kept}
    for env in [{"LEDGER_OPS_KEY": ""}, {**exported, "LEDGER_OPS_KEY": ""}]:
        rotated = build_env_with(env, first)
        assert rotated["LEDGER_OPS_KEY"] not in ("", leaked)
        served = [k.rpartition(":")[0] for k in rotated["LEDGER_API_KEYS"].split(",")]
        assert leaked not in served
        assert rotated["LEDGER_OPS_KEY"] in served
        assert rotated["LEDGER_READER_KEY"] == first["LEDGER_READER_KEY"]
    # Not given at all: kept across restarts, as before.
    assert build_env_with({}, first)["LEDGER_OPS_KEY"] == leaked


def test_a_shell_that_exported_stack_env_still_gets_the_local_stack() -> None:
    """`set -a; . .run/stack.env` exports the stack's own addresses: `make up` must not take
    them for external servers (it would start neither and the services would fail)."""
    previous = build_env_with({}, {})
    assert previous["POSTGRES"] == "local"
    exported = {"DATABASE_URL": previous["DATABASE_URL"],
                "KAFKA_BOOTSTRAP_SERVERS": previous["KAFKA_BOOTSTRAP_SERVERS"]}  # fmt: skip
    assert build_env_with(exported, previous)["POSTGRES"] == "local"
    elsewhere = build_env_with({"DATABASE_URL": "postgresql://ops@db.clinic/loyalty"}, previous)
    assert elsewhere["POSTGRES"] == "external"


def test_an_exported_broker_address_of_our_own_broker_is_not_external(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from deploy import stack

    previous = {"BROKER": "tansu", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:19092"}
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    assert not stack.external_broker(previous)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka.clinic:9092")
    assert stack.external_broker(previous)
    # A stack that was already pointed elsewhere stays pointed there.
    assert stack.external_broker({**previous, "BROKER": "external"})


def test_clearing_ledger_host_goes_back_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """README: 'give a variable again to change it (empty to clear it)'. `LEDGER_HOST=`
    after `LEDGER_HOST=0.0.0.0` was written empty, and the ledger bound host "": every
    interface. Cleared, it is left out, and the ledger's own default (loopback) applies."""
    from deploy import stack

    monkeypatch.setenv("LEDGER_HOST", "")
    assert "LEDGER_HOST" not in stack.sticky({"LEDGER_HOST": "0.0.0.0"})
    monkeypatch.setenv("TOPIC_PARTITIONS", "")
    assert stack.sticky({"TOPIC_PARTITIONS": "12"})["TOPIC_PARTITIONS"] == "6"


def test_stack_env_values_survive_a_shell_and_a_read_back(tmp_path: Path) -> None:
    """stack.env is sourced by a shell (`set -a; . .run/stack.env`): a secret with shell
    characters is quoted, the shell reads it whole, and so do `make up` and ledgerctl."""
    from deploy import stack
    from services.ctl import stack_defaults

    tricky = {
        "NOTIFIER_WEBHOOK_SECRET": "s3$cret & ; `x` 'q'",
        "DATABASE_URL": "postgresql://u:p@h:5432/db",
        "LOYALTY_TOPIC_PREFIX": "",
    }
    path = tmp_path / "stack.env"
    stack.write_env_file(tricky, path)
    assert stack.read_env_file(path) == tricky
    shell = subprocess.run(
        ["bash", "-c", f'set -a; . "{path}"; printf %s "$NOTIFIER_WEBHOOK_SECRET"'],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert shell.stdout == tricky["NOTIFIER_WEBHOOK_SECRET"]
    found = stack_defaults({"STACK_RUN_DIR": str(tmp_path)})
    assert found == {"DATABASE_URL": tricky["DATABASE_URL"], "LOYALTY_TOPIC_PREFIX": ""}


def test_cleared_ledger_host_does_not_reach_the_ledger(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`LEDGER_HOST= make up`: sticky() leaves LEDGER_HOST out of stack.env, but the
    services are started with {**os.environ, **stack_env}, so the ledger still gets
    LEDGER_HOST="" and binds every interface (the very thing the fix was for)."""
    from deploy import stack

    monkeypatch.setenv("LEDGER_HOST", "")
    stack_env = {"LEDGER_PORT": "8080", **stack.sticky({"LEDGER_HOST": "0.0.0.0"})}
    assert "LEDGER_HOST" not in stack_env
    seen: dict[str, dict[str, str]] = {}

    def start(cmd: list[str], log: Path, env: dict[str, str], cwd: Any) -> int:
        seen[cmd[-1]] = env
        return 1

    monkeypatch.setattr(stack, "LOGS", tmp_path)
    monkeypatch.setattr(stack, "RUN", tmp_path)
    monkeypatch.setattr(stack.local, "read_pid", lambda p: None)
    monkeypatch.setattr(stack.local, "pid_alive", lambda *a, **k: a[0] is not None)
    monkeypatch.setattr(stack.local, "start_process", start)
    monkeypatch.setattr(stack.local, "write_pid", lambda *a: None)
    monkeypatch.setattr(stack.local, "port_open", lambda *a: False)
    stack.ensure_services(stack_env)
    ledger_env = seen["services.ledger"]
    # The ledger reads os.environ.get("LEDGER_HOST", "127.0.0.1"): "" means every interface.
    assert ledger_env.get("LEDGER_HOST", "127.0.0.1") == "127.0.0.1"


def test_a_stack_env_written_before_quoting_reads_as_it_was(tmp_path: Path) -> None:
    """Values written bare by an older `make up` (a secret with a backslash or quotes
    inside) read back unchanged: only a value `shlex.quote` quoted is unquoted."""
    from deploy import stack

    path = tmp_path / "stack.env"
    path.write_text('NOTIFIER_WEBHOOK_SECRET=a\\b"c\nLEDGER_PORT=8080\n')
    assert stack.read_env_file(path) == {
        "NOTIFIER_WEBHOOK_SECRET": 'a\\b"c',
        "LEDGER_PORT": "8080",
    }


PORT_VARS = ("PG_PORT", "TANSU_PORT", "KAFKA_PORT", "KAFKA_CONTROLLER_PORT")


def test_the_ports_make_up_was_given_stick(monkeypatch: pytest.MonkeyPatch) -> None:
    """`TANSU_PORT=19492 make up`, then a plain `make up` after the broker died started it
    again on 19092: a new KAFKA_BOOTSTRAP_SERVERS, and every service restarted for it."""
    from deploy import stack

    for var in PORT_VARS:
        monkeypatch.delenv(var, raising=False)
    assert {v: stack.sticky({})[v] for v in PORT_VARS} == {
        "PG_PORT": "55432", "TANSU_PORT": "19092", "KAFKA_PORT": "29092",
        "KAFKA_CONTROLLER_PORT": "29093",
    }  # fmt: skip
    monkeypatch.setenv("TANSU_PORT", "19492")
    monkeypatch.setenv("PG_PORT", "56632")
    written = stack.sticky({})
    monkeypatch.delenv("TANSU_PORT")
    monkeypatch.delenv("PG_PORT")
    assert stack.port(written, "TANSU_PORT") == 19492
    assert stack.port(written, "PG_PORT") == 56632
    monkeypatch.setenv("TANSU_PORT", "")  # cleared: the default again
    assert stack.port(written, "TANSU_PORT") == 19092
    monkeypatch.setenv("KAFKA_PORT", "nine")
    with pytest.raises(SystemExit, match="KAFKA_PORT must be a port number"):
        stack.port(written, "KAFKA_PORT")


def test_a_stack_env_from_before_the_ports_stuck_keeps_the_ports_of_its_addresses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from deploy import stack

    for var in PORT_VARS:
        monkeypatch.delenv(var, raising=False)
    older = {"POSTGRES": "local", "DATABASE_URL": "postgresql://l:l@127.0.0.1:56632/loyalty",
             "BROKER": "tansu", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:19492"}  # fmt: skip
    assert (stack.port(older, "PG_PORT"), stack.port(older, "TANSU_PORT")) == (56632, 19492)
    assert stack.port(older, "KAFKA_PORT") == 29092
    kafka = {**older, "BROKER": "kafka", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:29492"}
    assert (stack.port(kafka, "KAFKA_PORT"), stack.port(kafka, "TANSU_PORT")) == (29492, 19092)
    # Servers `make up` does not run are no ports of its own.
    external = {**older, "POSTGRES": "external", "BROKER": "external"}
    assert (stack.port(external, "PG_PORT"), stack.port(external, "TANSU_PORT")) == (55432, 19092)


def test_a_broker_that_died_comes_back_on_its_port(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from deploy import stack

    for var in (*PORT_VARS, "BROKER", "KAFKA_BOOTSTRAP_SERVERS"):
        monkeypatch.delenv(var, raising=False)
    previous = {"BROKER": "tansu", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:19492",
                "TANSU_PORT": "19492"}  # fmt: skip
    started: list[int] = []

    def start_tansu(port: int, log: Path) -> tuple[int, str]:
        started.append(port)
        return 4242, f"127.0.0.1:{port}"

    monkeypatch.setattr(stack, "RUN", tmp_path)
    monkeypatch.setattr(stack.local, "read_pid", lambda p: None)  # the broker is gone
    monkeypatch.setattr(stack.local, "start_tansu", start_tansu)
    monkeypatch.setattr(stack.local, "write_pid", lambda *a: None)
    assert stack.ensure_broker(previous) == ("tansu", "127.0.0.1:19492")
    assert started == [19492]


def test_external_servers_stick_until_given_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """README: 'What one make up was given sticks'. After `DATABASE_URL=… make up`, a plain
    `make up` (another terminal, cron) started a local Postgres and Tansu and moved the
    services to them: stack.env's POSTGRES=external / BROKER=external were never read."""
    from deploy import stack

    for var in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "BROKER"):
        monkeypatch.delenv(var, raising=False)
    dsn, bootstrap = "postgresql://ops@db.clinic/loyalty", "kafka.clinic:9092"
    previous = {"POSTGRES": "external", "DATABASE_URL": dsn,
                "BROKER": "external", "KAFKA_BOOTSTRAP_SERVERS": bootstrap}  # fmt: skip
    monkeypatch.setattr(stack.local, "start_postgres", lambda *a, **k: pytest.fail("local pg"))
    monkeypatch.setattr(stack.local, "start_tansu", lambda *a, **k: pytest.fail("local tansu"))
    assert stack.ensure_postgres(previous) == dsn
    assert stack.ensure_broker(previous) == ("external", bootstrap)
    assert stack.build_env(previous, dsn, "external", bootstrap)["POSTGRES"] == "external"
    # Given empty (README: 'empty to clear it'): back to the stack's own servers.
    monkeypatch.setenv("DATABASE_URL", "")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "")
    assert not stack.external_postgres(previous)
    assert not stack.external_broker(previous)
    # Given again, the new address.
    monkeypatch.setenv("DATABASE_URL", "postgresql://ops@db2.clinic/loyalty")
    assert stack.external_postgres(previous) == "postgresql://ops@db2.clinic/loyalty"
    # What `make demo` wrote (its own database) does not stick.
    monkeypatch.delenv("DATABASE_URL")
    assert not stack.external_postgres({**previous, "STACK_WRITER": "demo"})


def test_a_cleared_ledger_port_is_the_default_one() -> None:
    """`LEDGER_PORT= make up` (README: 'empty to clear it') wrote LEDGER_PORT= and
    LEDGER_API_URL=http://127.0.0.1: while the ledger itself listened on 8080."""
    previous = {"LEDGER_PORT": "45080", "LEDGER_API_URL": "http://127.0.0.1:45080"}
    cleared = build_env_with({"LEDGER_PORT": ""}, previous)
    assert (cleared["LEDGER_PORT"], cleared["LEDGER_API_URL"]) == ("8080", "http://127.0.0.1:8080")
    kept = build_env_with({}, previous)
    assert (kept["LEDGER_PORT"], kept["LEDGER_API_URL"]) == ("45080", "http://127.0.0.1:45080")


def test_the_api_url_is_where_the_ledger_listens() -> None:
    """`LEDGER_HOST=127.0.0.2 make up` wrote LEDGER_API_URL=http://127.0.0.1:<port>, where
    nothing answers: make up's readiness wait failed and README's curls with it."""
    for host, url in [
        ("127.0.0.2", "http://127.0.0.2:8080"),
        ("0.0.0.0", "http://127.0.0.1:8080"),
        ("::", "http://127.0.0.1:8080"),
        ("::1", "http://[::1]:8080"),
        ("", "http://127.0.0.1:8080"),
    ]:
        assert build_env_with({"LEDGER_HOST": host}, {})["LEDGER_API_URL"] == url, host
    assert build_env_with({}, {"LEDGER_HOST": "127.0.0.2"})["LEDGER_API_URL"] == (
        "http://127.0.0.2:8080"
    )


SLEEP = "import time; time.sleep(60)"


def _spawn(argv: list[str], cwd: Path, **env: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **env}, start_new_session=True)
    # Popen returns once exec began; the kernel shows the new command line a moment later.
    while not Path(f"/proc/{proc.pid}/cmdline").read_bytes():
        time.sleep(0.01)
    return proc


def test_a_stale_pid_file_never_names_another_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A pid file outlives its process (kill -9, a crash) and its pid gets reused. Any live
    pid in postmaster.pid was Postgres, any process with 'tansu' in its command line the
    broker, any with 'services.notifier' (another checkout's) the notifier: status called
    them alive, and down killed them."""
    from deploy import stack

    run = tmp_path / "run"
    (run / "pgdata").mkdir(parents=True)
    monkeypatch.setattr(stack, "RUN", run)
    monkeypatch.setattr(stack, "PG_DATA", run / "pgdata")
    monkeypatch.setattr(stack, "STACK_ENV", run / "stack.env")
    (tmp_path / "sleeper.py").write_text(SLEEP)
    monkeypatch.setattr(stack, "SERVICES", [("ledger", "sleeper"), ("notifier", "services.x")])
    recorded = {"BROKER": "tansu", "TANSU_PORT": "45092", "KAFKA_BOOTSTRAP_SERVERS": "b:45092"}
    stack.write_env_file(recorded, run / "stack.env")
    other = tmp_path / "other-checkout"
    other.mkdir()
    procs = {
        # The ledger of another checkout (same command line, run elsewhere).
        "ledger": _spawn([sys.executable, "-m", "sleeper"], other, PYTHONPATH=str(tmp_path)),
        "notifier": _spawn([sys.executable, "-c", SLEEP, "-m", "services.x"], ROOT),
        # Another stack's Tansu, on its own port.
        "broker": _spawn([sys.executable, "-c", SLEEP, "tansu", "tcp://127.0.0.1:45192"], ROOT),
        "postgres": _spawn([sys.executable, "-c", SLEEP, "-D", str(tmp_path / "pg")], ROOT),
    }
    try:
        for name, proc in procs.items():
            (run / f"{name}.pid").write_text(f"{proc.pid}\n")
        (run / "pgdata" / "postmaster.pid").write_text(f"{procs['postgres'].pid}\n")
        assert not stack.local.postgres_running(run / "pgdata")
        assert stack.status() == 1
        stack.down()
        assert all(proc.poll() is None for proc in procs.values()), "down killed a stranger"
        # The stack's own: the same command line in this checkout is stopped.
        ours = _spawn([sys.executable, "-m", "sleeper"], ROOT, PYTHONPATH=str(tmp_path))
        (run / "ledger.pid").write_text(f"{ours.pid}\n")
        assert stack.service_pid("ledger", "sleeper") == ours.pid
        stack.down()
        assert ours.wait(10) is not None
        postmaster = _spawn([sys.executable, "-c", SLEEP, "-D", str(run / "pgdata")], ROOT)
        procs["postmaster"] = postmaster
        (run / "pgdata" / "postmaster.pid").write_text(f"{postmaster.pid}\n")
        assert stack.local.postgres_running(run / "pgdata")
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_the_broker_is_known_by_the_address_it_was_started_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from deploy import stack

    monkeypatch.setattr(stack, "RUN", tmp_path)
    tansu = _spawn([sys.executable, "-c", SLEEP, "--listener-url", "tcp://127.0.0.1:45092"], ROOT)
    try:
        (tmp_path / "broker.pid").write_text(f"{tansu.pid}\n")
        on_tansu = {"BROKER": "tansu", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:45092"}
        assert stack.broker_pid("tansu", on_tansu) == tansu.pid
        # TANSU_PORT given while it ran: recorded, but the broker stayed where it was.
        assert stack.broker_pid("tansu", {**on_tansu, "TANSU_PORT": "45093"}) == tansu.pid
        moved = {"BROKER": "external", "KAFKA_BOOTSTRAP_SERVERS": "k:9092", "TANSU_PORT": "45092"}
        assert stack.broker_pid("tansu", moved) == tansu.pid
        assert stack.broker_pid("tansu", {**moved, "TANSU_PORT": "45099"}) is None
        assert stack.broker_pid("kafka", on_tansu) is None
    finally:
        tansu.kill()
        tansu.wait()


def test_a_service_whose_port_is_taken_is_not_started_and_up_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ledger port already in use (another stack's ledger): the ledger exited ~5 s after
    start, `up` looked at it once at 2 s, said 'started' and exited 0."""
    import socket

    from deploy import stack

    started: list[str] = []
    monkeypatch.setattr(stack, "RUN", tmp_path)
    monkeypatch.setattr(stack.local, "start_process", lambda cmd, *a, **k: started.append(cmd[-1]))
    monkeypatch.setattr(stack.local, "write_pid", lambda *a: None)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        stack_env = {"LEDGER_PORT": port, "RULES_METRICS_PORT": "0", "NOTIFIER_METRICS_PORT": "0"}
        assert stack.ensure_services(stack_env) is False
        assert "services.ledger" not in started
        assert f"ledger: port {port} on 127.0.0.1 is taken" in capsys.readouterr().out
        started.clear()
        assert stack.ensure_services({**stack_env, "NOTIFIER_METRICS_PORT": port}) is False
        assert started == ["services.rules"]


def test_up_is_not_ready_while_a_service_is_dead(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Something else answering 200 on the ledger's port while a started service died: the
    readiness wait took the 200 and `up` said ready."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from deploy import stack

    class Ready(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    monkeypatch.setattr(stack, "RUN", tmp_path)  # no pid files: no service of the stack runs
    server = HTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert stack.wait_ready(url, timeout=3) is False
        monkeypatch.setattr(stack, "service_pid", lambda name, module: 4242)
        assert stack.wait_ready(url, timeout=3) is True
    finally:
        server.shutdown()
        server.server_close()


def test_topic_partitions_given_to_existing_topics_is_said_and_restarts_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`TOPIC_PARTITIONS=12 make up` on topics that have 6: up printed '12 partitions' (the
    topics keep 6), restarted every service for it, and recorded 12, which the next
    memory-only Tansu then created, moving members to other partitions."""
    from deploy import stack

    monkeypatch.setattr(stack, "RUN", tmp_path)
    monkeypatch.setattr(stack, "LOGS", tmp_path / "logs")
    monkeypatch.setattr(stack, "STACK_ENV", tmp_path / "stack.env")
    for var in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "LOYALTY_TOPIC_PREFIX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(stack, "ensure_postgres", lambda previous: "postgresql://x@h/db")
    monkeypatch.setattr(stack, "ensure_broker", lambda previous: ("tansu", "127.0.0.1:45092"))
    monkeypatch.setattr(stack, "apply_migrations", lambda dsn: None)
    monkeypatch.setattr(stack, "wait_ready", lambda url: True)
    restarts: list[bool] = []

    def ensure_services(stack_env: dict[str, str], restart: bool) -> bool:
        restarts.append(restart)
        return True

    monkeypatch.setattr(stack, "ensure_services", ensure_services)
    have = {"loyalty.activity.v1": 6, "loyalty.grants.v1": 6, "loyalty.ledger.v1": 6,
            "loyalty.dlq.v1": 6}  # fmt: skip
    monkeypatch.setattr(stack.local, "create_topics", lambda bootstrap, names, n: have)
    monkeypatch.delenv("TOPIC_PARTITIONS", raising=False)
    assert stack.up() == 0
    capsys.readouterr()
    monkeypatch.setenv("TOPIC_PARTITIONS", "12")
    assert stack.up() == 0
    out = capsys.readouterr().out
    assert "loyalty.dlq.v1 (6 partitions)" in out
    assert "TOPIC_PARTITIONS=12 left them as they are" in out
    assert stack.read_env_file()["TOPIC_PARTITIONS"] == "6"
    assert restarts == [False, False]


def test_status_and_down_name_the_run_dir_they_use(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With STACK_RUN_DIR elsewhere, status and down named .run/logs/... and .run/pgdata."""
    from deploy import stack

    run = tmp_path / "run"
    (run / "pgdata").mkdir(parents=True)
    monkeypatch.setattr(stack, "RUN", run)
    monkeypatch.setattr(stack, "LOGS", run / "logs")
    monkeypatch.setattr(stack, "PG_DATA", run / "pgdata")
    monkeypatch.setattr(stack, "STACK_ENV", run / "stack.env")
    stack.status()
    out = capsys.readouterr().out
    assert f"{run}/logs/rules.log" in out
    assert ".run/" not in out
    postmaster = _spawn([sys.executable, "-c", SLEEP, "-D", str(run / "pgdata")], ROOT)
    try:
        (run / "pgdata" / "postmaster.pid").write_text(f"{postmaster.pid}\n")
        monkeypatch.setattr(stack.local, "stop_postgres", lambda data_dir: None)
        stack.down()
    finally:
        postmaster.kill()
        postmaster.wait()
    assert f"postgres: stopped (data kept in {run}/pgdata)" in capsys.readouterr().out


def test_a_broker_port_taken_by_another_process_stops_up_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Another broker on this stack's Tansu port: up died in a traceback."""
    import socket

    from deploy import stack

    for var in ("TANSU_PORT", "BROKER", "KAFKA_BOOTSTRAP_SERVERS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(stack, "RUN", tmp_path)
    monkeypatch.setattr(stack.local, "start_tansu", lambda *a: pytest.fail("started"))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"^broker: port {port} is taken by another") as exc:
            stack.ensure_broker({"BROKER": "tansu", "TANSU_PORT": str(port)})
    assert "\n" not in str(exc.value)


def test_back_from_an_external_broker_the_stack_takes_its_own_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`KAFKA_BOOTSTRAP_SERVERS= make up` after the stack ran on an external broker, its own
    Tansu still running: up took that Tansu for another process on the port and stopped."""
    from deploy import stack

    for var in ("TANSU_PORT", "BROKER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "")
    monkeypatch.setattr(stack, "RUN", tmp_path)
    monkeypatch.setattr(stack.local, "start_tansu", lambda *a: pytest.fail("started another"))
    monkeypatch.setattr(stack.local, "wait_for_broker", lambda *a, **k: None)
    tansu = _spawn([sys.executable, "-c", SLEEP, "--listener-url", "tcp://127.0.0.1:45092"], ROOT)
    try:
        (tmp_path / "broker.pid").write_text(f"{tansu.pid}\n")
        moved = {"BROKER": "external", "KAFKA_BOOTSTRAP_SERVERS": "k:9092", "TANSU_PORT": "45092"}
        assert stack.ensure_broker(moved) == ("tansu", "127.0.0.1:45092")
    finally:
        tansu.kill()
        tansu.wait()


SLEEP = "import time; time.sleep(60)"


def test_back_from_an_external_broker_a_kafka_stack_keeps_its_kafka(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """BROKER=kafka make up; KAFKA_BOOTSTRAP_SERVERS=ext make up;
    KAFKA_BOOTSTRAP_SERVERS= make up: stack.env said BROKER=external, so the last `up`
    took Tansu, stopping the stack's own Kafka (its data on disk) for an empty broker."""
    from deploy import stack

    for var in ("TANSU_PORT", "KAFKA_PORT", "BROKER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "")
    monkeypatch.setattr(stack, "RUN", tmp_path)
    monkeypatch.setattr(stack, "KAFKA_DATA", tmp_path / "kafka-data")
    stopped: list[int] = []
    monkeypatch.setattr(stack.local, "wait_for_broker", lambda *a, **k: None)
    monkeypatch.setattr(stack.local, "stop_pid", lambda pid, t=15: stopped.append(pid) or True)
    monkeypatch.setattr(stack.local, "port_open", lambda *a, **k: False)
    kafka = subprocess.Popen(
        [sys.executable, "-c", SLEEP, "kafka.Kafka",
         str(tmp_path / "kafka-data" / "server.properties")],
        cwd=ROOT,
    )  # fmt: skip
    try:
        (tmp_path / "broker.pid").write_text(f"{kafka.pid}\n")
        # As `KAFKA_BOOTSTRAP_SERVERS=ext make up` wrote it before LOCAL_BROKER was kept,
        # and as it writes it now.
        moved = {"BROKER": "external", "KAFKA_BOOTSTRAP_SERVERS": "ext:9092",
                 "KAFKA_PORT": "45093", "TANSU_PORT": "45092"}  # fmt: skip
        assert stack.broker_pid("kafka", moved) == kafka.pid
        assert stack.ensure_broker(moved)[0] == "kafka"
        assert stack.ensure_broker({**moved, "LOCAL_BROKER": "kafka"})[0] == "kafka"
        assert stopped == []
    finally:
        kafka.kill()
        kafka.wait()


def test_external_servers_stick_across_make_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    """DATABASE_URL=ext KAFKA_BOOTSTRAP_SERVERS=ext make up; make demo; make up: the demo
    ran on those servers and wrote stack.env as the demo (whose addresses do not stick),
    so the last `up` moved the services to a local Postgres and Tansu."""
    from deploy import stack

    for var in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "BROKER"):
        monkeypatch.delenv(var, raising=False)
    dsn, bootstrap = "postgresql://ops@db.clinic/loyalty", "kafka.clinic:9092"
    after_up = {"POSTGRES": "external", "DATABASE_URL": dsn,
                "BROKER": "external", "KAFKA_BOOTSTRAP_SERVERS": bootstrap}  # fmt: skip
    assert (stack.external_postgres(after_up), stack.external_broker(after_up)) == (dsn, bootstrap)
    # stack.env as deploy.demo.start_stack writes it
    env = stack.build_env(after_up, dsn.rsplit("/", 1)[0] + "/loyalty_demo", "external", bootstrap)
    env.update(LOYALTY_TOPIC_PREFIX="demo-x.", STACK_WRITER="demo")
    assert (stack.external_postgres(env), stack.external_broker(env)) == (dsn, bootstrap)
    # Cleared, the stack's own servers again; and a stack on its own stays on them.
    monkeypatch.setenv("DATABASE_URL", "")
    assert stack.external_postgres(env) is None
    monkeypatch.delenv("DATABASE_URL")
    own = stack.build_env({}, "postgresql://x@127.0.0.1:1/db", "tansu", "127.0.0.1:1")
    assert (stack.external_postgres(own), stack.external_broker(own)) == (None, None)
    assert own["LOCAL_BROKER"] == "tansu"


def test_the_demo_database_keeps_the_urls_tls_settings() -> None:
    from deploy.demo import _with_database

    dsn = "postgresql://ops@db.clinic/loyalty?sslmode=verify-full&sslrootcert=/etc/pg-ca.pem"
    assert _with_database(dsn, "loyalty_demo") == (
        "postgresql://ops@db.clinic/loyalty_demo?sslmode=verify-full&sslrootcert=/etc/pg-ca.pem"
    )
    assert _with_database("postgresql://x@h:1/db", "db_demo") == "postgresql://x@h:1/db_demo"
