"""The whole pipeline on a real broker (Tansu and Apache Kafka) and a real Postgres."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from tests.integration.events import CST, purchase
from tests.integration.harness import OPS_KEY, Stack, wait_until
from tests.integration.streams import assert_paid_exactly_once, mixed_stream

pytestmark = pytest.mark.integration
NOW = datetime.now(CST).replace(microsecond=0)


async def _metrics(stack: Stack, service: str) -> str:
    async with httpx.AsyncClient() as client:
        url = f"http://127.0.0.1:{stack.metrics_ports[service]}/metrics"
        return (await client.get(url)).text


async def _member(stack: Stack, member_id: str) -> dict | None:
    resp = await stack.get(f"/v1/members/{member_id}")
    return resp.json() if resp.status_code == 200 else None


async def test_gold_members_purchase_becomes_3850_points_through_the_api(stack: Stack) -> None:
    # 30,000 CNY makes the member gold (earned at the old multiplier), then 2,500 CNY of
    # facial package at gold earns 2,500 x 1.5 + 100 big-ticket = 3,850 (DOMAIN.md).
    first = purchase("m-gold", "30000.00", NOW - timedelta(days=2))
    second = purchase("m-gold", "2500.00", NOW - timedelta(days=1))
    await stack.produce([first, second])

    async def both_journaled() -> dict | None:
        doc = await _member(stack, "m-gold")
        return doc if doc and doc["points"]["earned"] >= 30600 + 3850 else None

    doc = await wait_until(both_journaled, what="both purchases journaled")
    assert doc["tier"] == "gold"
    assert doc["qualifying_spend"] == "32500.00"
    assert doc["points"]["available"] == doc["points"]["earned"] == 30600 + 3850
    entries = (await stack.get("/v1/members/m-gold/entries")).json()["entries"]
    of_second = {
        e["rule_id"]: e["points"] for e in entries if e["source_event_id"] == second["event_id"]
    }
    assert of_second == {"base": 3750, "big_ticket": 100}
    assert sum(of_second.values()) == 3850
    # Every line each service wrote is a JSON object naming it, FastStream's own included.
    for service in ("rules", "ledger", "notifier"):
        lines = stack.log_lines(service)
        assert any("FastStream" in x or "uvicorn" in x or "Uvicorn" in x for x in lines)
        assert [x for x in lines if not _json_of(x, service)] == []


async def test_the_same_event_delivered_three_times_pays_once(stack: Stack) -> None:
    # ... and the same id used again for another order is not paid, but not dropped
    # silently either: dead-lettered (`reused_event_id`), where ops see it.
    event = purchase("m-dup", "800.00", NOW - timedelta(hours=3))
    reused = purchase("m-dup", "5000.00", NOW - timedelta(hours=2, minutes=30))
    reused["event_id"] = event["event_id"]
    # The same event written another way (keys in another order, 800.0 for 800.00): a
    # redelivery by another producer, not a reuse.
    rewritten = dict(reversed(list(event.items())))
    rewritten["data"] = {**event["data"], "amount": "800.0"}
    marker = purchase("m-dup", "100.00", NOW - timedelta(hours=2))
    await stack.produce([event, event, event, reused])
    await stack.produce([event, rewritten, reused, marker])  # later, in other batches

    async def marker_paid() -> dict | None:
        # Entries first: once the marker's entry is visible its batch has committed, so the
        # member read after it includes it (read the other way round, a commit landing
        # between the two reads gave a stale total).
        resp = await stack.get("/v1/members/m-dup/entries")  # a 404 until the first grant
        entries = resp.json()["entries"] if resp.status_code == 200 else []
        if not any(e["source_event_id"] == marker["event_id"] for e in entries):
            return None
        return await _member(stack, "m-dup")

    doc = await wait_until(marker_paid, what="the marker purchase")
    # 800 base + 200 first purchase, then 100 base for the marker: once each.
    assert doc["points"]["earned"] == 800 + 200 + 100
    assert await stack.scalar("SELECT count(*) FROM rules_activity WHERE member_id = 'm-dup'") == 2
    letters = await stack.fetch('SELECT reason, original FROM dead_letters ORDER BY "offset"')
    assert [json.loads(r["original"]) for r in letters] == [reused, reused]
    assert all("was used before by another event" in r["reason"] for r in letters)
    metrics = await _metrics(stack, "rules")
    counted = [
        line.rsplit(" ", 1)[1]
        for line in metrics.splitlines()
        if line.startswith("loyalty_dlq_messages_total{") and 'reason="reused_event_id"' in line
    ]
    assert counted == ["2.0"]


async def test_purchases_compressed_by_their_producer_with_any_codec_are_paid(stack: Stack) -> None:
    # Java producers often compress (lz4, snappy, zstd); without the codec aiokafka could
    # not read such a batch, and the consumer fetched it again and again, the partition's
    # events after it never paid.
    codecs = ("gzip", "snappy", "lz4", "zstd")
    events = [purchase(f"m-{c}", "300.00", NOW - timedelta(hours=1)) for c in codecs]
    for codec, event in zip(codecs, events, strict=True):
        producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, compression_type=codec)
        await producer.start()
        try:
            await producer.send_and_wait(
                stack.topics.activity, json.dumps(event).encode(), key=event["member_id"].encode()
            )
        finally:
            await producer.stop()
    for codec in codecs:
        doc = await wait_until(lambda c=codec: _member(stack, f"m-{c}"), what=f"the {codec} one")
        assert doc["points"]["earned"] == 300 + 200


@pytest.fixture
def transactions(broker_name: str) -> None:
    """Before the stack starts: Tansu has no transactions to abort."""
    if broker_name != "kafka":
        pytest.skip("Tansu has no transactions")


async def test_a_purchase_in_an_aborted_upstream_transaction_is_not_paid(
    transactions: None, stack: Stack
) -> None:
    # An upstream that writes with a transactional producer (Kafka Connect, a Java POS)
    # aborts a purchase: its record stays in the log, marked aborted. The consumers read
    # uncommitted records and paid it.
    aborted = purchase("m-tx", "5000.00", NOW - timedelta(hours=2))
    committed = purchase("m-tx", "300.00", NOW - timedelta(hours=1))
    producer = AIOKafkaProducer(
        bootstrap_servers=stack.bootstrap, transactional_id=f"pos-{NOW.timestamp()}"
    )
    await producer.start()
    try:
        for event, end in ((aborted, producer.abort_transaction),
                           (committed, producer.commit_transaction)):  # fmt: skip
            await producer.begin_transaction()
            await producer.send_and_wait(
                stack.topics.activity, json.dumps(event).encode(), key=b"m-tx"
            )
            await end()
    finally:
        await producer.stop()

    doc = await wait_until(lambda: _member(stack, "m-tx"), what="the committed purchase")
    assert doc["points"]["earned"] == 300 + 200  # base and first purchase: its own
    assert await stack.scalar("SELECT count(*) FROM rules_activity") == 1


@pytest.mark.parametrize("victim", ["rules", "ledger"])
async def test_sigkill_mid_stream_loses_nothing_and_pays_nothing_twice(
    stack: Stack, victim: str
) -> None:
    events = mixed_stream(5000, members=200, start=NOW - timedelta(days=30))
    await stack.produce(events[:2500])
    consumer = "rules" if victim == "rules" else "ledger"
    await wait_until(
        lambda: stack.scalar(
            "SELECT coalesce(sum(next_offset), 0) > 0 FROM consumer_offsets WHERE consumer LIKE $1",
            f"%{consumer}",
        ),
        what=f"{victim} to make progress",
    )
    stack.kill(victim)  # SIGKILL: no chance to flush or commit anything
    await stack.produce(events[2500:])
    stack.start(victim)

    await assert_paid_exactly_once(stack, events)


async def test_bad_messages_go_to_the_dlq_and_the_next_good_one_is_paid(stack: Stack) -> None:
    bad = [
        b"{this is not json",
        json.dumps(
            {
                "event_id": "x1",
                "type": "teleport",
                "occurred_at": NOW.isoformat(),
                "member_id": "m-bad",
                "data": {},
            }
        ).encode(),
        json.dumps(
            {
                "event_id": "x2",
                "type": "purchase",
                "occurred_at": NOW.isoformat(),
                "member_id": "m-bad",
                "data": {"order_id": "o", "amount": "-5"},
            }
        ).encode(),
        # Valid, but dated a year after its record's timestamp (ACTIVITY_MAX_AHEAD_SECONDS):
        # taken, it would have made the member's present a year old.
        json.dumps(purchase("m-bad", "900.00", NOW + timedelta(days=400))).encode(),
    ]
    good = purchase("m-bad", "300.00", NOW - timedelta(minutes=5))
    await stack.produce([*bad, good])

    async def paid() -> dict | None:
        return await _member(stack, "m-bad")

    doc = await wait_until(paid, what="the good message after the bad ones")
    assert doc["points"]["earned"] == 300 + 200
    letters = await stack.read_topic(stack.topics.dlq, expect=4)
    bodies = [json.loads(r.value) for r in letters]
    assert sorted(b["original"] for b in bodies) == sorted(b.decode() for b in bad)
    assert {b["source_topic"] for b in bodies} == {stack.topics.activity}
    reasons = " | ".join(b["reason"] for b in bodies)
    assert "malformed JSON" in reasons
    assert "unknown event type" in reasons
    assert "schema violation" in reasons
    assert "after its record's timestamp" in reasons
    assert all(isinstance(b["source_offset"], int) for b in bodies)
    metrics = await _metrics(stack, "rules")
    counted = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("loyalty_dlq_messages_total{")
    )
    assert counted == 4


async def test_api_requires_keys_and_answers_problem_json(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.api) as client:
        anonymous = await client.get("/v1/members/m-x")
        assert anonymous.status_code == 401
        assert anonymous.headers["content-type"].startswith("application/problem+json")
        unknown = await client.get(
            "/v1/members/m-nobody", headers={"Authorization": f"Bearer {OPS_KEY}"}
        )
        assert unknown.status_code == 404
        assert unknown.json()["title"] == "Member not found"
        metrics = await client.get("/metrics")
        assert "loyalty_consumer_lag" in metrics.text


async def test_a_recreated_topic_is_read_from_its_start_not_skipped(stack: Stack) -> None:
    # Tansu keeps topics in memory: after a broker restart the log is empty again while
    # Postgres remembers offsets far ahead. The consumer must notice and start over.
    stack.kill("rules")
    await stack.fetch(
        "UPDATE consumer_offsets SET next_offset = 100000 WHERE consumer LIKE '%rules'"
    )
    stack.start("rules")
    event = purchase("m-recreated", "120.00", NOW - timedelta(minutes=1))
    await stack.produce([event])

    async def paid() -> dict | None:
        return await _member(stack, "m-recreated")

    doc = await wait_until(paid, timeout=60, what="the event after the offset reset")
    assert doc["points"]["earned"] == 120 + 200


async def test_a_restarted_service_resumes_at_its_stored_offsets(stack: Stack) -> None:
    # The partition's last record batch holds several records. Tansu's ListOffsets answers
    # the offset after that batch's first record, which the stored offset is past: taken
    # at its word, the consumer thought the topic recreated and read it all again.
    async def rules_offsets(n: int) -> bool:
        stored = await stack.scalar(
            "SELECT sum(next_offset) FROM consumer_offsets WHERE consumer LIKE '%rules'"
        )
        return stored == n

    await stack.produce_batch(
        [purchase("m-resume", "100.00", NOW - timedelta(hours=h)) for h in (6, 5, 4, 3)]
    )
    await wait_until(lambda: rules_offsets(4), what="the batch consumed")

    def assignments() -> int:
        return sum("partitions_assigned" in x for x in stack.log_lines("rules"))

    before = assignments()
    stack.kill("rules")
    stack.start("rules")

    async def assigned_again() -> bool:  # before anything else lands on the partition
        return assignments() > before

    await wait_until(assigned_again, what="the restarted consumer's partitions")
    await stack.produce([purchase("m-resume", "100.00", NOW - timedelta(hours=2))])
    await wait_until(lambda: rules_offsets(5), what="the purchase after the restart consumed")

    rereads = ("stored_offset_beyond_log_end", "log_recreated")
    assert [x for x in stack.log_lines("rules") if any(r in x for r in rereads)] == []

    async def all_paid() -> bool:
        paid = await stack.scalar(
            "SELECT count(*) FROM ledger_entries WHERE member_id = 'm-resume' AND rule_id = 'base'"
        )
        return paid == 5

    await wait_until(all_paid, what="five purchases journaled")


def _json_of(line: str, service: str) -> bool:
    try:
        doc = json.loads(line)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("service") == service
