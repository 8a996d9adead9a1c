"""`make up` on an external broker that asks for TLS or SASL: it creates the topics with
the broker's security settings, hands them to the services, and keeps them for the next
`up` like its other settings. It spoke PLAINTEXT only, and could not create the topics."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

from deploy import stack
from services.common.config import KAFKA_SECURITY_VARS, KafkaAccess, KafkaSecurity

PASSWORD = "s3cr3t-Pa55"
stack_write = stack.write_env_file
TOPIC_COUNTS = {"loyalty.activity.v1": 6, "loyalty.grants.v1": 6, "loyalty.ledger.v1": 6,
                "loyalty.dlq.v1": 6}  # fmt: skip


@pytest.fixture
def up(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, list[Any]]:
    """`stack.up` with its servers and processes faked; what it created topics with and
    started the services with, call by call."""
    seen: dict[str, list[Any]] = {"topics": [], "services": []}
    monkeypatch.setattr(stack, "RUN", tmp_path)
    monkeypatch.setattr(stack, "LOGS", tmp_path / "logs")
    # (Their default path was bound when the module was imported.)
    env_file = tmp_path / "stack.env"
    monkeypatch.setattr(stack, "read_env_file", functools.partial(stack.read_env_file, env_file))
    monkeypatch.setattr(stack, "write_env_file", lambda env: stack_write(env, env_file))
    for var in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "LOYALTY_TOPIC_PREFIX",
                "TOPIC_PARTITIONS", *KAFKA_SECURITY_VARS):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(stack, "ensure_postgres", lambda previous: "postgresql://x@h/db")
    monkeypatch.setattr(stack, "ensure_broker", lambda previous: ("external", "b-1.msk:9096"))
    monkeypatch.setattr(stack, "apply_migrations", lambda dsn: None)
    monkeypatch.setattr(stack, "wait_ready", lambda url: True)

    def create_topics(kafka: KafkaAccess, names: list[str], n: int) -> dict[str, int]:
        seen["topics"].append(kafka)
        return TOPIC_COUNTS

    def ensure_services(stack_env: dict[str, str], restart: bool) -> bool:
        seen["services"].append((stack_env, restart))
        return True

    monkeypatch.setattr(stack.local, "create_topics", create_topics)
    monkeypatch.setattr(stack, "ensure_services", ensure_services)
    return seen


def test_an_external_brokers_security_creates_the_topics_reaches_the_services_and_sticks(
    monkeypatch: pytest.MonkeyPatch, up: dict[str, list[Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    given = {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
             "KAFKA_SASL_USERNAME": "loyalty", "KAFKA_SASL_PASSWORD": PASSWORD}  # fmt: skip
    for var, value in given.items():
        monkeypatch.setenv(var, value)
    assert stack.up() == 0
    wanted = KafkaSecurity("SASL_SSL", "SCRAM-SHA-512", "loyalty", PASSWORD)
    assert up["topics"][-1] == KafkaAccess("b-1.msk:9096", wanted)
    stack_env, _ = up["services"][-1]
    assert {var: stack_env[var] for var in given} == given
    # A plain `make up` later (cron, another shell) keeps them, and restarts nothing.
    for var in given:
        monkeypatch.delenv(var)
    assert stack.up() == 0
    assert up["topics"][-1] == KafkaAccess("b-1.msk:9096", wanted)
    assert up["services"][-1] == (stack_env, False)
    # Given empty, cleared: the mechanism is the default again, and the services restart.
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "")
    assert stack.up() == 0
    assert up["topics"][-1].security.sasl_mechanism == "PLAIN"
    stack_env, restart = up["services"][-1]
    assert "KAFKA_SASL_MECHANISM" not in stack_env
    assert restart
    assert PASSWORD not in capsys.readouterr().out


def test_security_settings_that_cannot_work_stop_make_up_in_one_line(
    monkeypatch: pytest.MonkeyPatch, up: dict[str, list[Any]]
) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "loyalty")
    with pytest.raises(SystemExit) as stop:
        stack.up()
    assert stop.value.code == "KAFKA_SECURITY_PROTOCOL=SASL_SSL needs KAFKA_SASL_PASSWORD"
    assert up["topics"] == []
    assert up["services"] == []


def test_the_stacks_own_broker_gets_none_of_them(
    monkeypatch: pytest.MonkeyPatch, up: dict[str, list[Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    """A shell that still holds them (it exported stack.env when the stack ran on the
    external broker): `make up` back on its own PLAINTEXT broker says it leaves them out."""
    monkeypatch.setattr(stack, "ensure_broker", lambda previous: ("tansu", "127.0.0.1:19092"))
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "loyalty")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", PASSWORD)
    assert stack.up() == 0
    assert up["topics"] == [KafkaAccess("127.0.0.1:19092")]
    stack_env, _ = up["services"][-1]
    assert not set(KAFKA_SECURITY_VARS) & set(stack_env)
    out = capsys.readouterr().out
    assert "KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD left out" in out
    assert PASSWORD not in out


def test_the_services_do_not_inherit_them_from_the_shell_either(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: dict[str, dict[str, str]] = {}

    def start(cmd: list[str], log: Path, env: dict[str, str], cwd: Any) -> int:
        seen[cmd[-1]] = env
        return 1

    monkeypatch.setattr(stack, "LOGS", tmp_path)
    monkeypatch.setattr(stack, "RUN", tmp_path)
    monkeypatch.setattr(stack.local, "read_pid", lambda p: None)
    monkeypatch.setattr(stack.local, "start_process", start)
    monkeypatch.setattr(stack.local, "write_pid", lambda *a: None)
    monkeypatch.setattr(stack.local, "port_open", lambda *a: False)
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    stack.ensure_services({"LEDGER_PORT": "8080"})
    assert "KAFKA_SECURITY_PROTOCOL" not in seen["services.rules"]
    stack.ensure_services({"LEDGER_PORT": "8080", "KAFKA_SECURITY_PROTOCOL": "SSL"}, restart=True)
    assert seen["services.rules"]["KAFKA_SECURITY_PROTOCOL"] == "SSL"
