"""`ledgerctl`: the ops command line (rules, ledger, dlq, events); a module per group.

This module imports nothing heavy and starts nothing when imported: a backtest worker
imports it again while bootstrapping (multiprocessing re-runs the `ledgerctl` console
script as its `__mp_main__`), and starting the forkserver there fails. So the work is in
`main`, which only the script's `if __name__ == "__main__"` calls.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# What `ledgerctl` takes from the stack `make up` wrote down, when the environment does not
# set it: the database, the broker and the topic prefix of whatever ports and broker that
# stack runs on (a `BROKER=kafka` stack's broker is not on the Tansu default port).
FROM_STACK_ENV = ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "LOYALTY_TOPIC_PREFIX")
# How to reach that broker (TLS, SASL: `services.common.config.KAFKA_SECURITY_VARS`, named
# here to keep this module's imports light), taken with its address and only then: settings
# meant for the stack's broker are no use against another.
BROKER_SECURITY = (
    "KAFKA_SECURITY_PROTOCOL",
    "KAFKA_SASL_MECHANISM",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
    "KAFKA_SSL_CAFILE",
    "KAFKA_SSL_CERTFILE",
    "KAFKA_SSL_KEYFILE",
)


def stack_defaults(environ: dict[str, str] | None = None) -> dict[str, str]:
    """`FROM_STACK_ENV` from `$STACK_RUN_DIR/stack.env` (default `.run/` of this checkout),
    with the broker's `BROKER_SECURITY` unless the environment names a broker of its own."""
    env = os.environ if environ is None else environ
    run = env.get("STACK_RUN_DIR") or str(Path(__file__).resolve().parents[2] / ".run")
    from services.common import stack_env

    try:
        written = stack_env.parse((Path(run).resolve() / "stack.env").read_text())
    except OSError:
        return {}
    if written.get("STACK_WRITER") == "demo":
        return {}  # `make demo`'s own database and topics: not the stack's
    wanted = set(FROM_STACK_ENV)
    if "KAFKA_BOOTSTRAP_SERVERS" not in env:
        wanted.update(BROKER_SECURITY)
    return {k: v for k, v in written.items() if k in wanted}


def main() -> None:
    for key, value in stack_defaults().items():
        os.environ.setdefault(key, value)
    if sys.argv[1:3] == ["rules", "simulate"] and "--help" not in sys.argv:
        # Its workers' forkserver does its imports while this process does its own.
        from services.rules.forkserver import start_forkserver

        start_forkserver()

    from services.ctl.cli import app

    app()
