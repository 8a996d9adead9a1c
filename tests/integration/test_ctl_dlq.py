"""`ledgerctl dlq list` on a running stack: what a service dead-lettered, newest first."""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import datetime, timedelta

import pytest

from tests.integration.default_broker import broker  # noqa: F401 (fixture: default broker only)
from tests.integration.events import CST, purchase
from tests.integration.harness import Stack, wait_until
from tests.integration.rules_helpers import LEDGERCTL, ROOT, Ran

pytestmark = pytest.mark.integration


NOW = datetime.now(CST).replace(microsecond=0)


async def dlq(stack: Stack, *args: str) -> Ran:
    def run() -> Ran:
        proc = subprocess.run(
            [LEDGERCTL, "dlq", "list", *args],
            cwd=ROOT,
            env={**stack.env("ctl"), "COLUMNS": "250"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        return Ran(proc.returncode, proc.stdout, proc.stderr)

    return await asyncio.to_thread(run)


async def test_a_message_dead_lettered_by_a_running_service_is_listed(stack: Stack) -> None:
    assert "no dead letters" in (await dlq(stack)).stdout
    not_json = b"{this is not json [bold]"
    negative = json.dumps(
        {"event_id": "x-neg", "type": "purchase", "occurred_at": NOW.isoformat(),
         "member_id": "m-dlq", "data": {"order_id": "o-neg", "amount": "-5"}}
    ).encode()  # fmt: skip
    await stack.produce([not_json])
    await wait_until(
        lambda: stack.scalar("SELECT count(*) = 1 FROM dead_letters"), what="first dead letter"
    )
    await stack.produce([negative, purchase("m-dlq", "300.00", NOW - timedelta(minutes=5))])

    async def paid() -> bool:
        return (await stack.get("/v1/members/m-dlq")).status_code == 200

    await wait_until(paid, what="the good message after the bad ones")

    table = await dlq(stack)
    assert table.code == 0, table.stderr
    assert "{this is not json [bold]" in table.stdout  # shown as is, not as markup
    assert "schema violation" in table.stdout
    assert "malformed JSON" in table.stdout
    assert stack.topics.activity in table.stdout
    for col in ("consumer", "topic", "partition", "offset", "reason", "original"):
        assert col in table.stdout

    rows = [json.loads(line) for line in (await dlq(stack, "--json")).stdout.splitlines()]
    assert [r["original"] for r in rows] == [negative.decode(), not_json.decode()]  # newest first
    assert {r["topic"] for r in rows} == {stack.topics.activity}
    assert all(r["consumer"].endswith("rules") for r in rows)
    assert datetime.fromisoformat(rows[0]["received_at"]) >= datetime.fromisoformat(
        rows[1]["received_at"]
    )

    one = await dlq(stack, "--json", "--limit", "1")
    assert [json.loads(x)["original"] for x in one.stdout.splitlines()] == [negative.decode()]
    assert "--limit 1" in one.stderr
    # The consumer's name as stored ("<prefix>rules"), or without the topic prefix.
    for consumer in (rows[0]["consumer"], "rules"):
        assert len((await dlq(stack, "--json", "--consumer", consumer)).stdout.splitlines()) == 2
    assert (await dlq(stack, "--json", "--consumer", "ledger")).stdout == ""
    assert (await dlq(stack, "--json", "--consumer", "nobody")).stdout == ""
    assert len((await dlq(stack, "--json", "--since", "1h")).stdout.splitlines()) == 2
    later = (datetime.now(CST) + timedelta(minutes=5)).isoformat()
    assert (await dlq(stack, "--json", "--since", later)).stdout == ""
