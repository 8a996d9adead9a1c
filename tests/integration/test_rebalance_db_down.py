"""A consumer-group rebalance while Postgres is down. The rebalance listener reads the
stored offsets; it used to fail on the database error, aiokafka logged and swallowed it,
and the consumer's partitions stayed unassigned until a restart: /readyz answered 503,
the lag gauge was empty and the rules' tier sweep (it needs to be caught up) never ran
again. The listener now retries until the database is back."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

from deploy import local
from tests.integration.events import CST
from tests.integration.harness import free_port, make_stack, wait_until
from tests.integration.streams import assert_paid_exactly_once, mixed_stream
from tests.integration.test_scale_out import assigned

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


async def test_a_rebalance_while_postgres_is_down_assigns_once_it_is_back(
    broker: str, tmp_path: Path
) -> None:
    data = tmp_path / "pg"
    port = local.free_port()
    dsn = local.start_postgres(data, port, log_path=ROOT / ".run/test-logs/pg-rebalance.log")
    stack = await make_stack(broker, dsn, "tansu")
    try:
        await stack.wait_ready()
        rules2_metrics, ledger2_port = free_port(), free_port()
        stack.start("rules", "2", METRICS_PORT=str(rules2_metrics))
        stack.start("ledger", "2", LEDGER_PORT=str(ledger2_port))
        for url in (f"127.0.0.1:{rules2_metrics}", f"127.0.0.1:{ledger2_port}"):
            await wait_until(lambda u=url: assigned(f"http://{u}/metrics"), timeout=90,
                             what=f"{url} assigned")  # fmt: skip

        # Postgres goes away; meanwhile the second processes die and the group rebalances
        # onto the first ones, whose listeners cannot read the stored offsets.
        local.stop_postgres(data)
        stack.kill("rules2")
        stack.kill("ledger2")

        def retried() -> bool:  # the listeners met the outage (before: failed once each)
            lines = stack.log_lines("ledger") + stack.log_lines("rules")
            marks = ("assignment_retry", "failed on partition assignment")
            return sum(any(m in x for m in marks) for x in lines) >= 2

        await wait_until(lambda: asyncio.sleep(0, retried()), timeout=60, what="the rebalance")
        local.start_postgres(data, port)

        events = mixed_stream(300, members=40, start=datetime.now(CST) - timedelta(days=20))
        await stack.produce(events)
        await assert_paid_exactly_once(stack, events, timeout=120)

        async def ready() -> bool:
            async with httpx.AsyncClient(timeout=5) as client:
                r = await client.get(f"http://127.0.0.1:{stack.ledger_port}/readyz")
            return r.status_code == 200 and r.json()["checks"]["consumer_assigned"]

        assert await wait_until(ready, timeout=30, what="ledger /readyz")
        assert await assigned(f"http://127.0.0.1:{stack.metrics_ports['rules']}/metrics")
        failed = [x for x in stack.log_lines("ledger") + stack.log_lines("rules")
                  if "failed on partition assignment" in x]  # fmt: skip
        assert failed == []
    finally:
        stack.stop_all()
        local.stop_postgres(data)
