"""SIGTERM stops a busy service well before `make down` gives up on it (15 s, then SIGKILL),
and what it had not applied is applied once by the next process.

The rules and notifier closed their pool and producer before FastStream stopped the
broker, so the batch in flight retried against a closed pool until the broker's 15 s
grace cancelled it: a busy rules service took ~17 s to stop.
"""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import datetime, timedelta

import pytest

from tests.integration.events import CST, purchase
from tests.integration.harness import Stack, wait_until

pytestmark = pytest.mark.integration

EVENTS = 10_000
MEMBERS = 1000


async def test_a_busy_rules_service_stops_promptly_and_loses_nothing(stack: Stack) -> None:
    start = datetime.now(CST) - timedelta(hours=1)
    await stack.produce(
        purchase(f"m-{i % MEMBERS}", "100", start + timedelta(seconds=i)) for i in range(EVENTS)
    )
    await wait_until(lambda: stack.scalar("SELECT count(*) > 0 FROM rules_activity"),
                     what="the rules service to be busy")  # fmt: skip

    rules = stack.procs.pop("rules")
    asked = time.monotonic()
    rules.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(rules.wait, 30)
    took = time.monotonic() - asked
    assert await stack.scalar("SELECT count(*) FROM rules_activity") < EVENTS, "stopped mid-stream"
    assert code == 0
    assert took < 5, f"{took:.1f} s after SIGTERM"
    assert not [line for line in stack.log_lines("rules") if "batch_retry" in line]

    stack.start("rules", "2")
    # Every purchase once, and each member's first-purchase bonus once.
    await wait_until(
        lambda: stack.scalar(
            "SELECT count(*) = $1 FROM ledger_entries WHERE kind = 'earn'", EVENTS + MEMBERS
        ),
        timeout=120,
        what="every purchase earned",
    )
    assert await stack.scalar("SELECT count(*) FROM rules_activity") == EVENTS
    assert await stack.scalar("SELECT count(*) FROM dead_letters") == 0
