"""Two processes of the rules and of the ledger share the partitions, then one dies.

Operators scale a consumer by starting another process in the same group; the broker
moves partitions between them at each join and death. Effectively-once must hold across
those moves: a batch that a process applied just before it lost a partition must not be
applied again by the next owner (the offsets live in Postgres, locked per batch), and a
process killed mid-batch must lose nothing.
"""

from __future__ import annotations

import asyncio
import re
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.integration.events import CST
from tests.integration.harness import Stack, free_port, wait_until
from tests.integration.streams import assert_paid_exactly_once, mixed_stream

pytestmark = pytest.mark.integration
NOW = datetime.now(CST).replace(microsecond=0)
ASSIGNED = re.compile(r'"partitions": \[\d')


def assigned_some(log: Path) -> bool:
    """The process logged an assignment of at least one partition."""
    return log.exists() and any(
        '"partitions_assigned"' in line and ASSIGNED.search(line)
        for line in log.read_text(errors="replace").splitlines()
    )


async def consumed(metrics_url: str) -> float:
    """`loyalty_consumed_total` of a process, from its Prometheus endpoint (0 if down)."""
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            text = (await client.get(metrics_url)).text
    except httpx.HTTPError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("loyalty_consumed_total{")
    )


async def test_a_second_process_shares_the_work_and_takes_over_when_the_first_dies(
    stack: Stack,
) -> None:
    events = mixed_stream(6000, members=300, start=NOW - timedelta(days=30), seed=11)

    await stack.produce(events[:2000])
    rules2_metrics, ledger2_port = free_port(), free_port()
    stack.start("rules", "2", METRICS_PORT=str(rules2_metrics))
    stack.start("ledger", "2", LEDGER_PORT=str(ledger2_port))
    for name in ("rules2", "ledger2"):
        await wait_until(
            lambda name=name: asyncio.to_thread(assigned_some, stack.log_path(name)),
            timeout=90,
            what=f"{name} to be assigned partitions",
        )

    await stack.produce(events[2000:4000])
    for url in (
        f"http://127.0.0.1:{rules2_metrics}/metrics",
        f"http://127.0.0.1:{ledger2_port}/metrics",
    ):
        await wait_until(lambda url=url: consumed(url), timeout=90, what=f"records applied: {url}")

    # The first processes die mid-stream; the second ones must take over their partitions.
    stack.kill("rules")
    stack.kill("ledger")
    await stack.produce(events[4000:])

    await assert_paid_exactly_once(stack, events, timeout=180)
