"""`make up` and LOYALTY_TOPIC_PREFIX: the topics it creates and the stack.env it writes
carry the prefix the services will read (a fresh interpreter: the module reads the
environment once, on import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = (
    "import json; from deploy import stack; "
    "print(json.dumps([stack.TOPICS, "
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
