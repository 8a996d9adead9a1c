"""`ledgerctl dlq list` on a running stack: what a service dead-lettered, newest first;
`dlq replay`: a grant the ledger dead-lettered for a bug since fixed is paid, once."""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import datetime, timedelta

import asyncpg
import pytest

from tests.integration.default_broker import broker  # noqa: F401 (fixture: default broker only)
from tests.integration.events import CST, purchase
from tests.integration.harness import Stack, wait_until
from tests.integration.ledger_helpers import give, grant, member
from tests.integration.rules_helpers import LEDGERCTL, ROOT, Ran

pytestmark = pytest.mark.integration


NOW = datetime.now(CST).replace(microsecond=0)


async def dlq(stack: Stack, *args: str, command: str = "list") -> Ran:
    def run() -> Ran:
        proc = subprocess.run(
            [LEDGERCTL, "dlq", command, *args],
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


# A ledger bug for one member, which the test then fixes: any journal row of theirs fails
# (RAISE is no database outage, so the consumer dead-letters the grant as poison).
LEDGER_BUG = """
CREATE FUNCTION test_ledger_bug() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN RAISE EXCEPTION 'ledger bug for %', NEW.member_id; END $$;
CREATE TRIGGER test_ledger_bug BEFORE INSERT ON ledger_entries FOR EACH ROW
    WHEN (NEW.member_id = 'm-replay') EXECUTE FUNCTION test_ledger_bug();
"""


async def execute(stack: Stack, sql: str) -> None:
    conn = await asyncpg.connect(stack.dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def test_a_grant_dead_lettered_for_a_ledger_bug_is_replayed_and_paid_once(
    stack: Stack,
) -> None:
    await execute(stack, LEDGER_BUG)
    good = grant("m-replay", 40, NOW - timedelta(minutes=5))
    bad = grant("m-replay", 7, NOW - timedelta(minutes=4))
    bad["data"]["points"] = -7  # refused by the grant model, then and now
    await stack.produce([good, bad], topic=stack.topics.grants)
    await wait_until(
        lambda: stack.scalar("SELECT count(*) = 2 FROM dead_letters"),
        what="both grants dead-lettered",
    )
    rows = await stack.fetch('SELECT dlq_id, reason FROM dead_letters ORDER BY "offset"')
    (good_id, why_good), (bad_id, why_bad) = ((r["dlq_id"], r["reason"]) for r in rows)
    assert why_good.startswith("RaiseError: ledger bug for m-replay"), why_good
    assert why_bad.startswith("schema violation"), why_bad
    await execute(stack, "DROP TRIGGER test_ledger_bug ON ledger_entries")  # the fix

    dry = await dlq(stack, "--consumer", "ledger", "--dry-run", command="replay")
    assert dry.code == 1, dry.stderr
    assert dry.stdout.splitlines() == [
        f"would send {good_id} to {stack.topics.grants}, key m-replay",
        "would send 1, still bad 1, skipped 0",
    ]
    assert f"still bad {bad_id}: schema violation: points_granted.data.points" in dry.stderr

    first = await dlq(stack, "--consumer", "ledger", "--since", "1h", command="replay")
    assert first.code == 1, first.stderr
    assert first.stdout.splitlines()[-1] == "sent 1, still bad 1, skipped 0"
    assert f"still bad {bad_id}" in first.stderr
    journaled = "SELECT count(*) FROM ledger_entries WHERE entry_id = $1"
    await wait_until(lambda: stack.scalar(journaled, good["event_id"]), what="replayed grant paid")

    again = await dlq(stack, "--id", good_id, command="replay")
    assert again.code == 0, again.stderr
    assert again.stdout.splitlines()[-1] == "sent 1, still bad 0, skipped 0"
    # A later grant of the member's, on the same partition, is applied after the replays.
    await give(stack, grant("m-replay", 5, NOW - timedelta(minutes=1)))

    assert await stack.scalar(journaled, good["event_id"]) == 1
    assert (await member(stack, "m-replay"))["points"]["earned"] == 45
    assert await stack.scalar("SELECT count(*) FROM dead_letters") == 2  # bad one not re-sent
    # The two originals, two replays of the good one and the later grant: nothing else.
    consumed = "SELECT sum(next_offset) FROM consumer_offsets WHERE topic = $1"
    assert await stack.scalar(consumed, stack.topics.grants) == 5


async def test_activity_dated_ahead_is_still_bad_and_not_replayed(stack: Stack) -> None:
    """The rules service dead-letters activity dated more than ACTIVITY_MAX_AHEAD_SECONDS
    after the broker received it; replayed now, it would be dead-lettered again."""
    ahead = purchase("m-ahead", "700.00", datetime.now(CST) + timedelta(days=3))
    await stack.produce([ahead])
    await wait_until(
        lambda: stack.scalar("SELECT count(*) = 1 FROM dead_letters"), what="dated_ahead letter"
    )
    dlq_id = await stack.scalar("SELECT dlq_id FROM dead_letters")

    replay = await dlq(stack, "--id", dlq_id, command="replay")
    assert replay.code == 1, replay.stdout + replay.stderr
    assert f"still bad {dlq_id}: dated_ahead: occurred_at" in replay.stderr
    assert replay.stdout.splitlines()[-1] == "sent 0, still bad 1, skipped 0"
    assert len(await stack.read_topic(stack.topics.activity, expect=1)) == 1  # the original only
