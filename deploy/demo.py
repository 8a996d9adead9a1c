"""``make demo``: a scripted week of a two-store clinic through the real stack, then stop.

Steps: start the embedded stack with deploy.stack's own pieces (Postgres, broker,
migrations, stack.env, the three service processes); publish the week of
:mod:`deploy.demo_week` to ``loyalty.activity.v1`` keyed by member; wait (deadline, no
blind sleeps) until every consumer's stored offsets reach the end of its topic, the
outboxes are empty and every notification is delivered; print members, notifications,
the DLQ and points per rule; stop the stack, also on failure or Ctrl-C.

Re-runs: each run gets a fresh database ``<db>_demo`` (dropped and recreated; the
``make up`` database is never touched) and its own topic prefix ``demo-<run>.``, so the
output is the same on every run whatever the broker kept from earlier ones (Kafka keeps
its topics, and consumed offsets live in Postgres). The demo database is kept after the
run for poking around with ``make up`` + psql; the next demo replaces it.

Notifications go to a webhook receiver inside this process (``http.server`` on a free
port) that checks each body's HMAC-SHA256 signature; only signed, valid posts get a 2xx,
so "delivered" in the table means "delivered and verified".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, Final

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from rich.console import Console
from rich.table import Table

from deploy import local, stack
from deploy.demo_week import SHANGHAI, Week, build_week
from services.common.config import KafkaAccess, Topics
from services.common.kafka_clients import client_kwargs
from services.common.log_end import log_ends
from services.notifier import signing

DEMO_DB_SUFFIX: Final = "_demo"
# Piped output (CI logs, `make demo | tee`) gets a wide page rather than rich's 80 columns.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)


def say(msg: str) -> None:
    console.print(f"[bold cyan]›[/] {msg}")


# --------------------------------------------------------------------------------------
# Webhook receiver
# --------------------------------------------------------------------------------------


@dataclass
class WebhookReceiver:
    """A clinic's webhook endpoint: accepts only bodies signed with the shared secret."""

    secret: str
    received: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/loyalty/notifications"

    def verify(self, body: bytes, timestamp: str | None, signature: str | None) -> bool:
        return signing.verify(self.secret, timestamp, body, signature, time.time())

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                stamp = self.headers.get(signing.TIMESTAMP_HEADER)
                if not receiver.verify(body, stamp, self.headers.get(signing.SIGNATURE_HEADER)):
                    with receiver._lock:
                        receiver.rejected += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                doc = json.loads(body)
                with receiver._lock:  # deliveries are at-least-once: dedupe on the id
                    receiver.received[doc["notification_id"]] = doc
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep the demo's output readable

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


# --------------------------------------------------------------------------------------
# Stack
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoStack:
    dsn: str
    kafka: KafkaAccess
    broker: str
    topics: Topics
    partitions: int
    api_url: str
    reader_key: str


def _with_database(dsn: str, name: str) -> str:
    """`dsn` naming database `name`, its parameters kept (`sslmode`, `sslrootcert`: the
    demo's services would have checked no certificate of an external Postgres)."""
    base, mark, query = dsn.partition("?")
    return base.rsplit("/", 1)[0] + "/" + name + mark + query


async def _recreate_database(dsn: str) -> str:
    """A brand-new `<db>_demo` next to the stack's database; its DSN."""
    base = dsn.partition("?")[0].rsplit("/", 1)[1] or "loyalty"
    name = base + DEMO_DB_SUFFIX
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return _with_database(dsn, name)


def _stop_services() -> None:
    """Services a previous `make up` left running would read the wrong database."""
    for name, module in reversed(stack.SERVICES):
        pid = stack.service_pid(name, module)
        if pid:
            local.stop_pid(pid, 15)
            say(f"{name}: stopped the running instance (pid {pid}) to start it for the demo")


def start_stack(run: str, receiver: WebhookReceiver) -> DemoStack:
    """deploy.stack's `up`, pointed at the demo's database and topic prefix."""
    stack.RUN.mkdir(exist_ok=True)
    stack.LOGS.mkdir(exist_ok=True)
    previous = stack.read_env_file()
    _stop_services()
    dsn = stack.ensure_postgres(previous)
    kind, bootstrap = stack.ensure_broker(previous)
    kafka = stack.kafka_access(previous, kind, bootstrap)
    demo_dsn = asyncio.run(_recreate_database(dsn))
    say(f"database: {demo_dsn.rsplit('/', 1)[1]} (fresh for this run)")
    stack.apply_migrations(demo_dsn)
    topics = Topics(prefix=f"demo-{run}.")
    partitions = int(os.environ.get("TOPIC_PARTITIONS", "6"))
    local.create_topics(kafka, topics.all(), partitions)
    say(f"topics: {topics.prefix}* ({partitions} partitions each)")
    env = stack.build_env(previous, demo_dsn, kind, bootstrap)
    env.update(
        LOYALTY_TOPIC_PREFIX=topics.prefix,
        NOTIFIER_WEBHOOK_URL=receiver.url,
        NOTIFIER_WEBHOOK_SECRET=receiver.secret,
        STACK_WRITER="demo",  # a later `make up` keeps none of these (deploy.stack.sticky)
    )
    stack.write_env_file(env)
    if not stack.ensure_services(env):
        raise SystemExit("a service's port is taken (see above), so it was not started")
    return DemoStack(
        dsn=demo_dsn,
        kafka=kafka,
        broker=kind,
        topics=topics,
        partitions=partitions,
        api_url=env["LEDGER_API_URL"],
        reader_key=env["LEDGER_READER_KEY"],
    )


# --------------------------------------------------------------------------------------
# Publishing and waiting
# --------------------------------------------------------------------------------------


async def publish(
    kafka: KafkaAccess,
    topic: str,
    events: Iterable[dict[str, Any]],
    raw: Iterable[tuple[str, bytes]],
) -> int:
    """Send events keyed by member (one member's events in order on one partition)."""
    producer = AIOKafkaProducer(**client_kwargs(kafka), acks="all", linger_ms=5)
    await producer.start()
    try:
        sent = [
            await producer.send(topic, json.dumps(e).encode(), key=e["member_id"].encode())
            for e in events
        ]
        sent += [await producer.send(topic, value, key=key.encode()) for key, value in raw]
        await asyncio.gather(*sent)
        return len(sent)
    finally:
        await producer.stop()


SNAPSHOT: Final = """
SELECT (SELECT coalesce(json_agg(json_build_array(consumer, topic, partition, next_offset)),
                        '[]')::text FROM consumer_offsets WHERE consumer = ANY($1::text[])),
       (SELECT count(*) FROM outbox),
       (SELECT count(*) FROM notifications WHERE status = 'pending')
"""


@dataclass(frozen=True)
class Progress:
    behind: dict[str, int]  # stage -> records not yet applied
    outbox: int
    pending_notifications: int

    @property
    def done(self) -> bool:
        return not any(self.behind.values()) and not self.outbox and not self.pending_notifications

    def describe(self) -> str:
        parts = [f"{stage} {n} behind" for stage, n in self.behind.items() if n]
        if self.outbox:
            parts.append(f"{self.outbox} in outboxes")
        if self.pending_notifications:
            parts.append(f"{self.pending_notifications} notifications to deliver")
        return ", ".join(parts) or "all caught up"


async def progress(
    conn: asyncpg.Connection,
    consumer: AIOKafkaConsumer,
    topics: Topics,
    partitions: int,
    stages: Mapping[str, str] | None = None,
) -> Progress:
    """Where the pipeline stands: one database snapshot, then the topics' end offsets.

    Reading the ends after the snapshot makes "offsets at the end and outbox empty" a
    safe conclusion: nothing the snapshot had consumed can still add records upstream.
    """
    stages = stages or {
        "rules": topics.activity,
        "ledger": topics.grants,
        "notifier": topics.ledger,
    }
    names = [topics.prefix + s for s in stages]
    row = await conn.fetchrow(SNAPSHOT, names)
    assert row is not None
    stored = {(c, t, p): n for c, t, p, n in json.loads(row[0])}
    tps = [TopicPartition(t, p) for t in stages.values() for p in range(partitions)]
    ends = await log_ends(consumer, tps)  # high watermarks: right on Tansu too
    behind = {
        stage: sum(
            max(
                0, ends[TopicPartition(topic, p)] - stored.get((topics.prefix + stage, topic, p), 0)
            )
            for p in range(partitions)
        )
        for stage, topic in stages.items()
    }
    return Progress(behind, int(row[1]), int(row[2]))


async def wait_processed(
    dsn: str,
    kafka: KafkaAccess,
    topics: Topics,
    partitions: int,
    *,
    timeout: float = 180.0,  # noqa: ASYNC109 (a deadline for polling, not a cancel scope)
    stages: Mapping[str, str] | None = None,
    on_change: Callable[[str], None] = lambda _: None,
) -> Progress:
    """Poll until every stage has applied everything published; fail at the deadline."""
    conn = await asyncpg.connect(dsn)
    consumer = AIOKafkaConsumer(**client_kwargs(kafka), enable_auto_commit=False)
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            now = await progress(conn, consumer, topics, partitions, stages)
            if now.done:
                return now
            if now.describe() != last:
                last = now.describe()
                on_change(last)
            if time.monotonic() > deadline:
                raise TimeoutError(f"pipeline not caught up after {timeout:.0f}s: {last}")
            await asyncio.sleep(0.2)
    finally:
        await consumer.stop()
        await conn.close()


async def wait_ready(api_url: str, timeout: float = 90.0) -> None:  # noqa: ASYNC109
    """The ledger's /readyz: database and broker reachable, every consumer assigned."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=api_url, timeout=2.0) as client:
        while True:
            try:
                if (await client.get("/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"ledger not ready after {timeout:.0f}s (.run/logs/ledger.log)")
            for name, module in stack.SERVICES:
                if stack.service_pid(name, module) is None:
                    raise RuntimeError(f"{name} exited; see .run/logs/{name}.log")
            await asyncio.sleep(0.2)


async def drive_week(
    week: Week,
    kafka: KafkaAccess,
    dsn: str,
    topics: Topics,
    partitions: int,
    *,
    timeout: float = 180.0,  # noqa: ASYNC109
    on_change: Callable[[str], None] = lambda _: None,
) -> None:
    """Sign-ups first, applied before the rest, as a CRM registers members before sales.

    The referral chain needs it: C's first purchase pays A through B's referrer, which the
    rules service must already know when C's purchase is evaluated on another partition.
    """
    await publish(kafka, topics.activity, week.signups, [])
    await wait_processed(
        dsn,
        kafka,
        topics,
        partitions,
        timeout=timeout,
        stages={"rules": topics.activity},
        on_change=lambda s: on_change(f"sign-ups: {s}"),
    )
    await publish(kafka, topics.activity, week.activity, week.malformed)
    await wait_processed(
        dsn,
        kafka,
        topics,
        partitions,
        timeout=timeout,
        on_change=lambda s: on_change(f"the week: {s}"),
    )


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

TIER_STYLE: Final = {
    "member": "white",
    "silver": "bright_white",
    "gold": "yellow",
    "diamond": "cyan",
}


async def member_docs(api_url: str, key: str, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    async with httpx.AsyncClient(base_url=api_url, timeout=10.0) as client:
        out: dict[str, dict[str, Any]] = {}
        for member_id in ids:
            resp = await client.get(
                f"/v1/members/{member_id}", headers={"Authorization": f"Bearer {key}"}
            )
            resp.raise_for_status()
            out[member_id] = resp.json()
        return out


def check_members(week: Week, docs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every way the ledger's answer differs from the week's worked-out outcomes."""
    problems = []
    for m in week.members:
        doc = docs.get(m.member_id)
        if doc is None:
            problems.append(f"{m.member_id}: unknown to the ledger")
            continue
        got = (doc["tier"], doc["points"]["available"], doc["qualifying_spend"])
        want = (m.expected_tier, m.expected_points, m.expected_spend)
        if got != want:
            problems.append(f"{m.member_id} ({m.story}): got {got}, expected {want}")
    return problems


RULE_SUMMARY: Final = """
SELECT coalesce(rule_id, kind) AS rule,
       count(*) FILTER (WHERE kind = 'earn') AS grants,
       coalesce(sum(points) FILTER (WHERE kind = 'earn'), 0) AS earned,
       coalesce(sum(points) FILTER (WHERE kind = 'revoke'), 0) AS revoked,
       count(DISTINCT member_id) AS members
FROM ledger_entries GROUP BY 1 ORDER BY 3 DESC, 1
"""
NOTIFICATIONS: Final = """
SELECT n.member_id, n.kind, n.message, n.status,
       (n.payload->>'occurred_at')::timestamptz AS at
FROM notifications n
ORDER BY at, n.member_id, (n.payload->'data'->>'balance_after')::bigint NULLS LAST
"""
DEAD_LETTERS: Final = """
SELECT consumer, reason, partition, "offset", original FROM dead_letters ORDER BY received_at
"""


async def report(ds: DemoStack, week: Week, receiver: WebhookReceiver) -> bool:
    docs = await member_docs(ds.api_url, ds.reader_key, [m.member_id for m in week.members])
    conn = await asyncpg.connect(ds.dsn)
    try:
        rules = await conn.fetch(RULE_SUMMARY)
        notes = await conn.fetch(NOTIFICATIONS)
        dead = await conn.fetch(DEAD_LETTERS)
    finally:
        await conn.close()

    members = Table(title="Members after the week (GET /v1/members/{id})", title_justify="left")
    for col, just in [
        ("member", "left"),
        ("store", "left"),
        ("story", "left"),
        ("tier", "left"),
        ("qualifying spend", "right"),
        ("available", "right"),
        ("earned", "right"),
        ("expected", "center"),
    ]:
        members.add_column(col, justify=just)  # type: ignore[arg-type]
    for m in week.members:
        doc = docs[m.member_id]
        ok = (doc["tier"], doc["points"]["available"], doc["qualifying_spend"]) == (
            m.expected_tier,
            m.expected_points,
            m.expected_spend,
        )
        members.add_row(
            m.member_id,
            m.store_id,
            m.story,
            f"[{TIER_STYLE.get(doc['tier'], 'white')}]{doc['tier']}[/]",
            f"¥{float(doc['qualifying_spend']):,.2f}",
            f"{doc['points']['available']:,}",
            f"{doc['points']['earned']:,}",
            "[green]✓[/]" if ok else f"[red]✗ {m.expected_points:,}/{m.expected_tier}[/]",
        )
    console.print(members)

    nt = Table(title="Notifications (table notifications)", title_justify="left")
    for col in ("when (Asia/Shanghai)", "member", "kind", "message (zh-CN)", "status"):
        nt.add_column(col)
    for n in notes:
        at: datetime | None = n["at"]
        when = at.astimezone(SHANGHAI).strftime("%m-%d %H:%M") if at else "-"
        style = "green" if n["status"] == "delivered" else "yellow"
        nt.add_row(when, n["member_id"], n["kind"], n["message"], f"[{style}]{n['status']}[/]")
    console.print(nt)
    delivered = sum(1 for n in notes if n["status"] == "delivered")
    console.print(
        f"webhook: {len(receiver.received)} received with a valid HMAC-SHA256 signature,"
        f" {receiver.rejected} rejected; {delivered}/{len(notes)} notifications delivered"
    )

    console.print(f"\n[bold]DLQ[/] ({ds.topics.dlq}): {len(dead)} message(s)")
    for d in dead:
        original = bytes(d["original"]).decode("utf-8", "replace")
        console.print(
            f"  {d['consumer']} p{d['partition']}@{d['offset']}: {d['reason'][:100]}\n"
            f"    original: {original[:90]}"
        )

    rt = Table(title="Points by rule (ledger_entries)", title_justify="left")
    for col in ("rule", "grants", "earned", "revoked (refunds)", "members"):
        rt.add_column(col, justify="left" if col == "rule" else "right")
    for r in rules:
        rt.add_row(
            r["rule"], str(r["grants"]), f"{r['earned']:,}", f"{r['revoked']:,}", str(r["members"])
        )
    total_e = sum(r["earned"] for r in rules)
    total_r = sum(r["revoked"] for r in rules)
    rt.add_row("[bold]total[/]", "", f"[bold]{total_e:,}[/]", f"[bold]{total_r:,}[/]", "")
    console.print(rt)

    problems = check_members(week, docs)
    if len(dead) != len(week.malformed):
        problems.append(f"DLQ holds {len(dead)} messages, expected {len(week.malformed)}")
    if delivered != len(notes) or len(receiver.received) != len(notes):
        problems.append(f"{delivered} of {len(notes)} notifications delivered and verified")
    for p in problems:
        console.print(f"[red]MISMATCH[/] {p}")
    if not problems:
        console.print("[green]every member, the DLQ and every notification came out as scripted[/]")
    return not problems


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # `make` sends SIGTERM on some paths: stop the stack the same way


async def _run(ds: DemoStack, week: Week, receiver: WebhookReceiver, timeout: float) -> bool:  # noqa: ASYNC109
    say("waiting for the services (ledger /readyz: consumers assigned)…")
    await wait_ready(ds.api_url)
    say(
        f"publishing {week.event_count} events ({len(week.signups)} sign-ups first, then"
        f" {len(week.activity)} + {len(week.malformed)} malformed) to {ds.topics.activity}…"
    )
    t0 = time.monotonic()
    await drive_week(
        week,
        ds.kafka,
        ds.dsn,
        ds.topics,
        ds.partitions,
        timeout=timeout,
        on_change=lambda s: say(f"waiting for the pipeline: {s}…"),
    )
    say(f"all events processed and notifications delivered in {time.monotonic() - t0:.1f}s")
    return await report(ds, week, receiver)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait per phase")
    parser.add_argument("--keep", action="store_true", help="leave the stack running afterwards")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)

    run = secrets.token_hex(3)
    week = build_week(datetime.now(SHANGHAI), run)
    receiver = WebhookReceiver(secret=secrets.token_urlsafe(24))
    receiver.start()
    say(
        f"demo run {run}: {len(week.members)} members, stores sh-jingan and sh-xuhui, "
        f"the week {week.signups[0]['occurred_at'][:10]} .. "
        f"{week.activity[-1]['occurred_at'][:10]} (Asia/Shanghai)"
    )
    say(f"webhook receiver on {receiver.url}")
    ds: DemoStack | None = None
    ok = False
    try:
        say("starting stack…")
        ds = start_stack(run, receiver)
        ok = asyncio.run(_run(ds, week, receiver, args.timeout))
    except KeyboardInterrupt:
        say("interrupted")
    except (TimeoutError, RuntimeError) as exc:
        console.print(f"[red]demo failed:[/] {exc}")
    finally:
        if ds is not None and not args.keep:
            try:
                local.delete_topics(ds.kafka, ds.topics.all())
            except Exception as exc:  # cleanup only; the broker may be gone
                say(f"topics {ds.topics.prefix}* not deleted: {exc}")
        if args.keep:
            say("stack left running (--keep); `make down` stops it")
        else:
            say("stopping stack…")
            stack.down()
        receiver.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
