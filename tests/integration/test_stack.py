"""`make up` / `make down` as an operator runs them (deploy.stack), in a private run dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.integration.harness import ROOT, free_port

pytestmark = pytest.mark.integration


def _stack(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.stack", command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def _pid(run: Path, name: str) -> int:
    return int((run / f"{name}.pid").read_text().strip())


def test_up_writes_env_and_pids_and_a_second_up_restarts_only_the_dead(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {
        k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")
    }
    env.update(
        PYTHONPATH=str(ROOT),
        STACK_RUN_DIR=str(run),
        BROKER="tansu",
        LEDGER_PORT=str(free_port()),
        RULES_METRICS_PORT=str(free_port()),
        NOTIFIER_METRICS_PORT=str(free_port()),
    )
    # Settings given to the first `up` only: a plain `up` keeps them.
    given = {
        "LOYALTY_TOPIC_PREFIX": "stk.",
        "LEDGER_API_KEYS": "pos_app_key:redeemer",
        "NOTIFIER_WEBHOOK_URL": "http://127.0.0.1:9/hook",
        "NOTIFIER_WEBHOOK_SECRET": "s3cret",
        # Read from the environment alone, they went back to their defaults (the fetch
        # wait changed, so every service restarted; a broker started again moved port).
        "CONSUMER_FETCH_WAIT_MS": "50",
        "PG_PORT": str(free_port()),
        "TANSU_PORT": str(free_port()),
    }
    try:
        first = _stack("up", {**env, **given})
        assert first.returncode == 0, first.stdout + first.stderr
        stack_env = dict(
            line.split("=", 1)
            for line in (run / "stack.env").read_text().splitlines()
            if line and not line.startswith("#")
        )
        for key in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "LEDGER_API_URL", "LEDGER_OPS_KEY"):
            assert stack_env.get(key), f"stack.env lacks {key}"
        pids = {name: _pid(run, name) for name in ("rules", "ledger", "notifier")}

        os.kill(pids["rules"], signal.SIGKILL)
        second = _stack("up", env)
        assert second.returncode == 0, second.stdout + second.stderr
        assert _pid(run, "rules") != pids["rules"], "the dead service was not restarted"
        assert _pid(run, "ledger") == pids["ledger"], "a healthy service was restarted"
        assert _pid(run, "notifier") == pids["notifier"], "a healthy service was restarted"
        again = dict(
            line.split("=", 1)
            for line in (run / "stack.env").read_text().splitlines()
            if line and not line.startswith("#")
        )
        assert again["LEDGER_OPS_KEY"] == stack_env["LEDGER_OPS_KEY"], "keys must survive an up"
        assert again == stack_env, "a plain up changed the settings of the first"
        assert "settings changed" not in second.stdout
        for var, value in given.items():
            assert value in again[var]
        assert again["KAFKA_BOOTSTRAP_SERVERS"].endswith(f":{given['TANSU_PORT']}")
        pos = httpx.get(
            f"{stack_env['LEDGER_API_URL']}/v1/members/nobody",
            headers={"Authorization": "Bearer pos_app_key"},
            timeout=10,
        )
        assert pos.status_code == 404, pos.text  # the key still serves (401 if not)

        # `up` returns only once the ledger is ready.
        ready = httpx.get(f"{stack_env['LEDGER_API_URL']}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        status = _stack("status", env)
        assert status.returncode == 0, status.stdout
    finally:
        down = _stack("down", env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert _stack("status", env).returncode != 0  # everything is down now
