"""The relay keeps a partition's rows in id order on the topic even when a broker stall
fails one record batch of a page: consumers keep the first copy of an event id, so the
first arrivals are the order a member's events are applied in.

Tansu is reached through a local TCP proxy that can swallow its open connections (a
network stall, or a broker paused longer than the producer's request timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from deploy.brokers import tansu_bin, wait_for_broker_async
from deploy.processes import start_process, stop_pid
from services.common.config import KafkaAccess, Settings
from services.common.outbox import (
    OutboxRelay,
    OutboxRow,
    make_producer,
    partition_for,
    write_outbox,
)
from services.ledger import projector
from services.ledger.rulebook import LedgerRules
from tests.integration.direct import consumer_of, migrated_pool
from tests.integration.harness import free_port, wait_until
from tests.integration.ledger_helpers import grant, revoke, tier_report

pytestmark = pytest.mark.integration
PARTITIONS = 6  # the default TOPIC_PARTITIONS


class StallingProxy:
    """Forwards a local port to `target_port`. `stall()` swallows the bytes of every
    connection open then or opened until `heal()`, both ways, closing nothing; those stay
    hung until their client gives up on them."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.stalling = False
        self._conns: list[dict[str, bool]] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> StallingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()

    def stall(self) -> None:
        self.stalling = True
        for conn in self._conns:
            conn["stalled"] = True

    def heal(self) -> None:
        self.stalling = False

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:  # the broker is gone (the test's end)
            cw.close()
            return
        state = {"stalled": self.stalling}
        self._conns.append(state)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    if not state["stalled"]:
                        w.write(data)
                        await w.drain()
            with contextlib.suppress(Exception):
                w.close()

        await asyncio.gather(pipe(cr, sw), pipe(sr, cw))


async def test_a_failed_batch_is_not_overtaken_by_the_next_batch_of_its_partition(
    fresh_database: str, tmp_path: Path
) -> None:
    tansu_port = free_port()
    async with StallingProxy(tansu_port) as proxy:
        log_path = tmp_path / "tansu.log"
        pid = start_process(
            [tansu_bin(), "broker", "--listener-url", f"tcp://127.0.0.1:{tansu_port}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{proxy.port}",
             "--storage-engine", "memory://tansu/"],
            log_path,
        )  # fmt: skip
        bootstrap = f"127.0.0.1:{proxy.port}"
        try:
            await wait_for_broker_async(bootstrap, 30, pid=pid, log_path=log_path)
            topic = f"t{uuid.uuid4().hex[:8]}.grants"
            admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
            await admin.start()
            await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
            await admin.close()

            m = "m-victim"
            now = datetime.now(UTC) - timedelta(hours=1)
            later = now + timedelta(minutes=5)
            g = grant(m, 1000, now)
            early = [
                g,
                tier_report(m, now, "member", "gold", "20000.00", ("diamond", "50000.00"),
                            now + timedelta(days=365)),
            ]  # fmt: skip
            late = [
                revoke(m, 1000, later, g["data"]["order_id"]),
                tier_report(m, later, "gold", "member", "0.00", ("silver", "5000.00"), None),
            ]
            # ~700 KB of other members' grants between them, all on the victim's partition:
            # the page's partition takes two record batches (512 KiB each), the victim's
            # early events in the first, the late ones in the second.
            parts = list(range(PARTITIONS))
            mine = partition_for(m.encode(), parts)
            same = (f"m-{i}" for i in range(20000))
            neighbours = [k for k in same if partition_for(k.encode(), parts) == mine][:1700]
            payloads = early + [grant(k, 10, now) for k in neighbours] + late
            written = [p["event_id"] for p in payloads]

            async with migrated_pool(fresh_database) as pool:
                async with pool.acquire() as conn:
                    await write_outbox(conn, "rules", [
                        OutboxRow(topic, p["member_id"], json.dumps(p).encode()) for p in payloads
                    ])  # fmt: skip
                producer = make_producer(KafkaAccess(bootstrap))
                await producer.start()
                await producer.partitions_for(topic)  # metadata known before the stall
                relay = OutboxRelay(pool, producer, "rules", dlq_topic=f"{topic}.dlq")
                # The first batch is sent into the stall and expires (request_timeout_ms);
                # the second, queued behind it, would go out on a new connection after.
                proxy.stall()
                task = asyncio.create_task(relay.run())
                await asyncio.sleep(10)
                proxy.heal()
                try:
                    await wait_until(
                        lambda: pool.fetchval("SELECT count(*) = 0 FROM outbox"),
                        timeout=120, what="the outbox relayed",
                    )  # fmt: skip
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    await producer.stop()

                consumer = AIOKafkaConsumer(
                    topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest"
                )
                await consumer.start()
                got = []
                first_seen: dict[str, None] = {}
                try:
                    async with asyncio.timeout(60):
                        while len(first_seen) < len(written):
                            batch = await consumer.getmany(timeout_ms=500)
                            for recs in batch.values():
                                got.extend(recs)
                                first_seen.update(
                                    (json.loads(r.value)["event_id"], None) for r in recs
                                )
                finally:
                    await consumer.stop()
                assert list(first_seen) == written, "a member's events overtook each other"

                # The ledger, fed the topic as it stands, ends where the member's last
                # tier report put them.
                settings = Settings(database_url=fresh_database, bootstrap_servers="")
                handler = projector.make_handler(settings, "ledger", LedgerRules())
                await consumer_of(pool, "ledger", topic, handler).process(got)
                tier = await pool.fetchval(
                    "SELECT tier FROM ledger_members WHERE member_id = $1", m
                )
                assert tier == "member"
        finally:
            stop_pid(pid, timeout=10)
