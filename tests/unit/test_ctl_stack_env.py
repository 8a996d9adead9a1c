"""`ledgerctl` finds the running stack's addresses in the stack.env `make up` wrote."""

from __future__ import annotations

from pathlib import Path

from services.ctl import stack_defaults


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
