"""`ledgerctl events publish` on a running stack: the file's events are paid via the API."""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.integration.default_broker import broker  # noqa: F401 (fixture: default broker only)
from tests.integration.events import CST, purchase
from tests.integration.harness import Stack, wait_until
from tests.integration.rules_helpers import LEDGERCTL, ROOT

pytestmark = pytest.mark.integration


NOW = datetime.now(CST).replace(microsecond=0)


def publish(stack: Stack, path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`ledgerctl events publish` of `path` against the stack, as an operator runs it."""
    return subprocess.run(
        [LEDGERCTL, "events", "publish", str(path), *args],
        cwd=ROOT,
        env={**stack.env("ctl"), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_a_file_of_events_is_sent_keyed_by_member_and_paid(
    stack: Stack, tmp_path: Path
) -> None:
    events = [
        purchase("m-file-1", "300.00", NOW - timedelta(minutes=30)),
        purchase("m-file-2", "500.00", NOW - timedelta(minutes=20)),
        purchase("m-file-1", "200.00", NOW - timedelta(minutes=10)),
    ]
    bad = purchase("m-file-3", "-5", NOW)
    lines = [json.dumps(events[0]), json.dumps(bad), "", json.dumps(events[1]), "{oops",
             json.dumps(events[2])]  # fmt: skip
    path = tmp_path / "demo.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    ran = await asyncio.to_thread(publish, stack, path)
    assert ran.returncode == 1, ran.stdout + ran.stderr  # some lines refused, the rest sent
    assert f"sent 3 event(s) to {stack.topics.activity}; 2 line(s) refused" in ran.stdout
    assert "refused line 2: schema violation" in ran.stderr
    assert "refused line 5: malformed JSON" in ran.stderr

    async def paid(member: str) -> set[str]:
        resp = await stack.get(f"/v1/members/{member}/entries?limit=100")
        if resp.status_code != 200:
            return set()
        return {e["source_event_id"] for e in resp.json()["entries"] if e["points"] > 0}

    async def all_paid() -> bool:
        got = await paid("m-file-1") | await paid("m-file-2")
        return {e["event_id"] for e in events} <= got

    await wait_until(all_paid, what="every sent purchase paid, as seen through the API")
    doc = (await stack.get("/v1/members/m-file-1")).json()
    assert doc["qualifying_spend"] == "500.00"  # both of m-file-1's purchases
    assert (await stack.get("/v1/members/m-file-3")).status_code == 404

    records = await stack.read_topic(stack.topics.activity, expect=3)
    assert sorted((r.key, r.value) for r in records) == sorted(
        (e["member_id"].encode(), json.dumps(e).encode()) for e in events
    )
    first = {r.partition for r in records if r.key == b"m-file-1"}
    assert len(first) == 1  # one member's events on one partition, in order

    # Only the activity topic takes them (the lines are checked as activity events), and
    # only one that exists: a broker creating topics on first use would swallow a typo.
    def publish_to(topic: str) -> subprocess.CompletedProcess[str]:
        return publish(stack, path, "--topic", topic)

    wrong = await asyncio.to_thread(publish_to, stack.topics.grants)
    assert wrong.returncode == 2, wrong.stdout + wrong.stderr
    assert "this sends activity events" in wrong.stderr
    typo = await asyncio.to_thread(publish_to, "nope.loyalty.activity.v1")
    assert typo.returncode == 2, typo.stdout + typo.stderr
    assert "nope.loyalty.activity.v1; nothing sent" in " ".join(typo.stderr.split())
    assert len(await stack.read_topic(stack.topics.activity, expect=3)) == 3


async def test_a_line_too_big_for_the_producer_is_refused_and_the_lines_after_it_sent(
    stack: Stack, tmp_path: Path
) -> None:
    big = purchase("m-big-2", "100.00", NOW - timedelta(minutes=5))
    big["data"]["items"] = [{"project_code": "p", "category": "c", "amount": "0.01"}] * 25_000
    events = [purchase("m-big-1", "100.00", NOW - timedelta(minutes=5)), big,
              purchase("m-big-3", "100.00", NOW - timedelta(minutes=5))]  # fmt: skip
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")

    ran = await asyncio.to_thread(publish, stack, path)
    assert ran.returncode == 1, ran.stdout + ran.stderr
    size = len(json.dumps(big))
    assert f"refused line 2: too big to send ({size} bytes)" in ran.stderr
    assert f"sent 2 event(s) to {stack.topics.activity}; 1 line(s) refused" in ran.stdout
    records = await stack.read_topic(stack.topics.activity, expect=2)
    assert sorted(r.key for r in records) == [b"m-big-1", b"m-big-3"]
