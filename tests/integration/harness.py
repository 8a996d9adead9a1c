"""Runs the real services as processes against a real broker and Postgres, per test.

Each test gets its own database and its own topic prefix, so tests never see each other's
events even on one broker. Helpers wait for conditions with a deadline; none sleeps blind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from deploy import local
from deploy.local import free_port
from services.common.config import KafkaAccess, Topics, load_kafka_security
from services.common.kafka_clients import client_kwargs
from services.common.migrations import apply_migrations
from services.common.outbox import partition_for

ROOT = Path(__file__).resolve().parents[2]
LOGS = ROOT / ".run" / "test-logs"
SERVICES = ("rules", "ledger", "notifier")
OPS_KEY = "test-ops-key"
READER_KEY = "test-reader-key"
REDEEMER_KEY = "test-redeemer-key"
T = TypeVar("T")


async def wait_until(
    probe: Callable[[], Awaitable[T]], *, timeout: float = 60.0, what: str = "condition"
) -> T:
    """Polls `probe` until it returns something truthy; fails with `what` on the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


@dataclass
class Stack:
    bootstrap: str
    dsn: str
    topics: Topics
    ledger_port: int
    metrics_ports: dict[str, int]
    name: str
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ledger_port}"

    @property
    def kafka(self) -> KafkaAccess:
        """The broker as the services reach it (KAFKA_SECURITY_* in `extra_env`)."""
        return KafkaAccess(self.bootstrap, load_kafka_security(self.env("rules")))

    def env(self, service: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PYTHONPATH=str(ROOT),
            DATABASE_URL=self.dsn,
            KAFKA_BOOTSTRAP_SERVERS=self.bootstrap,
            LOYALTY_TOPIC_PREFIX=self.topics.prefix,
            LEDGER_PORT=str(self.ledger_port),
            LEDGER_API_KEYS=f"{OPS_KEY}:ops,{READER_KEY}:reader,{REDEEMER_KEY}:redeemer",
            METRICS_PORT=str(self.metrics_ports.get(service, 0)),
            # Small batches make a SIGKILL land mid-stream rather than between two batches.
            CONSUMER_MAX_BATCH=os.environ.get("TEST_CONSUMER_MAX_BATCH", "500"),
            # Faster group joins (Tansu waits about half of it); production keeps 10 s.
            KAFKA_SESSION_TIMEOUT_MS="6000",
        )
        env.update(self.extra_env)
        return env

    def start(self, service: str, instance: str = "", **env: str) -> None:
        """Start `service`; a non-empty `instance` names a further process of it (its
        name is service + instance, its `env` overrides ports and the like)."""
        LOGS.mkdir(parents=True, exist_ok=True)
        name = service + instance
        log = (LOGS / f"{self.name}-{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", f"services.{service}"],
            cwd=ROOT,
            env={**self.env(service), **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log_lines(self, name: str) -> list[str]:
        """What process `name` (service + instance) has written so far, line by line."""
        path = LOGS / f"{self.name}-{name}.log"
        return [x for x in path.read_text(errors="replace").splitlines() if x.strip()]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def stop_all(self) -> None:
        for service in list(self.procs):
            proc = self.procs.pop(service)
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def assert_running(self) -> None:
        for service, proc in self.procs.items():
            assert proc.poll() is None, f"{service} exited with {proc.returncode}; see {LOGS}"

    async def produce(
        self, events: Iterable[dict[str, Any] | bytes], topic: str | None = None
    ) -> int:
        producer = AIOKafkaProducer(**client_kwargs(self.kafka), linger_ms=5)
        await producer.start()
        n = 0
        try:
            futures = []
            for e in events:
                if isinstance(e, bytes):
                    value, key = e, b"m-bad"
                else:
                    value, key = json.dumps(e).encode(), str(e["member_id"]).encode()
                futures.append(await producer.send(topic or self.topics.activity, value, key=key))
                n += 1
            await asyncio.gather(*futures)
        finally:
            await producer.stop()
        return n

    async def produce_batch(self, events: Sequence[dict[str, Any]]) -> None:
        """One member's events as a single record batch, as a producer that lingers sends
        them: the batch's records share one produce request and one base offset."""
        producer = AIOKafkaProducer(**client_kwargs(self.kafka))
        await producer.start()
        try:
            topic = self.topics.activity
            keys = {str(e["member_id"]).encode() for e in events}
            assert len(keys) == 1, "one member, so one partition"
            key = keys.pop()
            partition = partition_for(key, sorted(await producer.partitions_for(topic)))
            batch = producer.create_batch()
            for e in events:
                assert batch.append(key=key, value=json.dumps(e).encode(), timestamp=None)
            await (await producer.send_batch(batch, topic, partition=partition))
        finally:
            await producer.stop()

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.dsn)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    async def scalar(self, sql: str, *args: Any) -> Any:
        rows = await self.fetch(sql, *args)
        return rows[0][0] if rows else None

    async def get(self, path: str, key: str = READER_KEY) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.api, timeout=10) as client:
            return await client.get(path, headers={"Authorization": f"Bearer {key}"})

    async def wait_ready(self) -> None:
        async def ready() -> bool:
            self.assert_running()
            try:
                async with httpx.AsyncClient(base_url=self.api, timeout=2) as client:
                    return (await client.get("/readyz")).status_code == 200
            except httpx.HTTPError:
                return False

        await wait_until(ready, timeout=90, what="ledger /readyz")
        # Every consumer has its partitions once all have stored offset rows.
        await wait_until(
            lambda: self.scalar("SELECT count(DISTINCT consumer) >= 3 FROM consumer_offsets"),
            timeout=90,
            what="all three consumers assigned",
        )

    async def read_topic(self, topic: str, expect: int, timeout: float = 30) -> list[Any]:
        consumer = AIOKafkaConsumer(
            topic,
            **client_kwargs(self.kafka),
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
        )
        await consumer.start()
        out: list[Any] = []
        try:
            deadline = time.monotonic() + timeout
            while len(out) < expect and time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    out.extend(records)
        finally:
            await consumer.stop()
        return out


async def create_topics(broker: str | KafkaAccess, topics: Topics, partitions: int = 6) -> None:
    kafka = KafkaAccess(broker) if isinstance(broker, str) else broker
    admin = AIOKafkaAdminClient(**client_kwargs(kafka))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, partitions, 1) for t in topics.all()])
        await wait_until(
            lambda: _has_topics(admin, topics.all()), timeout=30, what="topics to exist"
        )
    finally:
        await admin.close()


async def _has_topics(admin: AIOKafkaAdminClient, names: list[str]) -> bool:
    return set(names) <= set(await admin.list_topics())


async def make_stack(
    bootstrap: str, dsn: str, broker_kind: str, extra_env: dict[str, str] | None = None
) -> Stack:
    name = uuid.uuid4().hex[:10]
    topics = Topics(prefix=f"t{name}.")
    await asyncio.to_thread(apply_migrations, dsn)
    stack = Stack(
        bootstrap=bootstrap,
        dsn=dsn,
        topics=topics,
        ledger_port=free_port(),
        metrics_ports={"rules": free_port(), "notifier": free_port()},
        name=name,
        extra_env={**local.consumer_env(broker_kind), **(extra_env or {})},
    )
    await create_topics(stack.kafka, topics)
    for service in SERVICES:
        stack.start(service)
    return stack
