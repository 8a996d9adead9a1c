"""Two processes of the rules and of the ledger share the partitions, then one dies.

Operators scale a consumer by starting another process in the same group; the broker
moves partitions between them at each join and death. Effectively-once must hold across
those moves: a batch that a process applied just before it lost a partition must not be
applied again by the next owner (the offsets live in Postgres, locked per batch), and a
process killed mid-batch must lose nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import httpx
import pytest

from tests.integration.events import CST
from tests.integration.harness import Stack, free_port, wait_until
from tests.integration.streams import assert_paid_exactly_once, mixed_stream

pytestmark = pytest.mark.integration
NOW = datetime.now(CST).replace(microsecond=0)


async def metrics(url: str) -> list[str]:
    """The sample lines of a process's Prometheus endpoint (none while it is not up)."""
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            text = (await client.get(url)).text
    except httpx.HTTPError:
        return []
    return [line for line in text.splitlines() if not line.startswith("#")]


async def assigned(url: str) -> bool:
    """The lag gauge has a sample for every partition the process holds."""
    return any(line.startswith("loyalty_consumer_lag{") for line in await metrics(url))


async def consumed(url: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in await metrics(url)
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
    second = {
        "rules2": f"http://127.0.0.1:{rules2_metrics}/metrics",
        "ledger2": f"http://127.0.0.1:{ledger2_port}/metrics",
    }
    for name, url in second.items():
        await wait_until(
            lambda url=url: assigned(url), timeout=90, what=f"{name} to hold partitions"
        )

    await stack.produce(events[2000:4000])
    for name, url in second.items():
        await wait_until(lambda url=url: consumed(url), timeout=90, what=f"{name} to apply records")

    # The first processes die mid-stream; the second ones must take over their partitions.
    stack.kill("rules")
    stack.kill("ledger")
    await stack.produce(events[4000:])

    await assert_paid_exactly_once(stack, events, timeout=180)
