"""`ledgerctl` finds the running stack's addresses in the stack.env `make up` wrote."""

from __future__ import annotations

from pathlib import Path

from services.common.config import KAFKA_SECURITY_VARS
from services.ctl import BROKER_SECURITY, stack_defaults


def test_the_stack_env_gives_the_database_broker_and_prefix(tmp_path: Path) -> None:
    (tmp_path / "stack.env").write_text(
        "# written by `python -m deploy.stack up`\n"
        "BROKER=kafka\n"
        "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:29092\n"
        "DATABASE_URL=postgresql://loyalty:loyalty@127.0.0.1:55999/loyalty\n"
        "LOYALTY_TOPIC_PREFIX=stg.\n"
        "LEDGER_OPS_KEY=ops_secret\n"
    )
    assert stack_defaults({"STACK_RUN_DIR": str(tmp_path)}) == {
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:29092",
        "DATABASE_URL": "postgresql://loyalty:loyalty@127.0.0.1:55999/loyalty",
        "LOYALTY_TOPIC_PREFIX": "stg.",
    }


def test_no_stack_env_gives_nothing(tmp_path: Path) -> None:
    assert stack_defaults({"STACK_RUN_DIR": str(tmp_path / "none")}) == {}


def test_what_make_demo_wrote_is_not_the_stack(tmp_path: Path) -> None:
    (tmp_path / "stack.env").write_text(
        "DATABASE_URL=postgresql://loyalty:loyalty@127.0.0.1:55432/demo_x\n"
        "LOYALTY_TOPIC_PREFIX=demo-x.\nSTACK_WRITER=demo\n"
    )
    assert stack_defaults({"STACK_RUN_DIR": str(tmp_path)}) == {}


STACK_ON_SASL = (
    "BROKER=external\nKAFKA_BOOTSTRAP_SERVERS=b-1.msk:9096\n"
    "KAFKA_SECURITY_PROTOCOL=SASL_SSL\nKAFKA_SASL_MECHANISM=SCRAM-SHA-512\n"
    "KAFKA_SASL_USERNAME=loyalty\nKAFKA_SASL_PASSWORD='pa$$ word'\n"
    "KAFKA_SSL_CAFILE=/etc/kafka/ca.pem\n"
)


def test_the_stacks_broker_comes_with_its_security_settings(tmp_path: Path) -> None:
    """A stack on a cluster with SASL: `ledgerctl events publish` took its address from
    stack.env and spoke PLAINTEXT to it."""
    (tmp_path / "stack.env").write_text(STACK_ON_SASL)
    assert stack_defaults({"STACK_RUN_DIR": str(tmp_path)}) == {
        "KAFKA_BOOTSTRAP_SERVERS": "b-1.msk:9096",
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "loyalty",
        "KAFKA_SASL_PASSWORD": "pa$$ word",
        "KAFKA_SSL_CAFILE": "/etc/kafka/ca.pem",
    }


def test_another_broker_given_takes_none_of_the_stacks_security(tmp_path: Path) -> None:
    (tmp_path / "stack.env").write_text(STACK_ON_SASL)
    env = {"STACK_RUN_DIR": str(tmp_path), "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:19092"}
    assert stack_defaults(env) == {"KAFKA_BOOTSTRAP_SERVERS": "b-1.msk:9096"}


def test_every_security_setting_is_taken() -> None:
    assert BROKER_SECURITY == KAFKA_SECURITY_VARS
