"""`make bench`: the pipeline's numbers on this machine, measured, with the machine described.

Starts its own Postgres (data under .run/bench/pg, `synchronous_commit=on`, `fsync=on`) and
a Tansu broker on free ports, runs the three services as processes (as the integration
harness does), and measures, each the median of several runs on a fresh database and a
fresh topic prefix:

1. e2e: N activity events pre-published, services started; from the first rules batch
   (min `rules_activity.received_at`) to the commit of the ledger batch that consumed
   the last grant (commit timestamp of the ledger's `consumer_offsets` row).
2. naive: the same, with `bench.naive` (one handler and one transaction per message).
3. latency at a fixed offered load: each event produced with its own timestamp (the
   broker's CreateTime); visible = commit timestamp of the ledger transaction that wrote
   its journal entries, which is the same transaction that updates the read models the
   API serves (`track_commit_timestamp=on`), so that is the instant GET would see it.
4. rebuild: `ledgerctl ledger rebuild` on a generated journal, when that command exists.
5. reads: `wrk` against GET /v1/members/{id} with 1,000,000 members in the read models.
6. backtesting: `ledgerctl rules simulate` if present, else the pure evaluator in-process.
7. expiry sweep (not a target of the issue; ops ask how long a large sweep takes): the
   ledger's `ExpirySweeper`, in this process, over N lots lapsed at once (a sweeper that
   was down, a backfill), then N lots inside the warning windows, then an idle sweep.

BENCH_QUICK=1 runs each once on smaller sizes (about two minutes).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench import machine_probe
from bench.workload import Event, describe, generate
from deploy import local
from services.common.config import Topics
from services.common.migrations import apply_migrations
from services.common.outbox import partition_for

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / ".run" / "bench"
RESULTS = Path(__file__).resolve().parent / "results"
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
PARTITIONS = 6
# `kafka`: Apache Kafka (KRaft, one node, the jars `make test` fetched) instead of Tansu.
BROKER = os.environ.get("BENCH_BROKER", "tansu")
OPS_KEY, READER_KEY = "bench-ops", "bench-reader"


def _int(name: str, full: int, quick: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else (quick if QUICK else full)


E2E_EVENTS = _int("BENCH_E2E_EVENTS", 200_000, 40_000)
NAIVE_EVENTS = _int("BENCH_NAIVE_EVENTS", 3_000, 1_000)
RUNS = _int("BENCH_RUNS", 3, 1)
LATENCY_EPS = _int("BENCH_LATENCY_EPS", 5_000, 5_000)
LATENCY_SECONDS = _int("BENCH_LATENCY_SECONDS", 15, 8)
# A second, single run at a load the pipeline sustains on this machine, for contrast.
LATENCY_LOW_EPS = _int("BENCH_LATENCY_LOW_EPS", 1_000, 1_000)
LATENCY_WARMUP_S = 2.0
REBUILD_ENTRIES = _int("BENCH_REBUILD_ENTRIES", 2_000_000, 200_000)
READ_MEMBERS = _int("BENCH_READ_MEMBERS", 1_000_000, 100_000)
READ_SECONDS = _int("BENCH_READ_SECONDS", 15, 5)
READ_CLIENTS = 32
SIM_EVENTS = _int("BENCH_SIM_EVENTS", 200_000, 20_000)
SWEEP_LOTS = _int("BENCH_SWEEP_LOTS", 300_000, 30_000)
REBUILD_MAX_S = 60.0  # one run only when a run takes longer than this (budget)
ONLY = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))


def want(step: str) -> bool:
    return not ONLY or step in ONLY


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------
# Infrastructure
# --------------------------------------------------------------------------------------


@dataclass
class Infra:
    admin_dsn: str
    bootstrap: str
    broker_pid: int
    pg_dir: Path
    pg_version: str = ""

    def dsn(self, db: str) -> str:
        return self.admin_dsn.rsplit("/", 1)[0] + "/" + db

    async def fresh_db(self, name: str) -> str:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        dsn = self.dsn(name)
        await asyncio.to_thread(apply_migrations, dsn)
        return dsn

    async def drop_db(self, name: str) -> None:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


async def start_infra() -> Infra:
    pg_dir = RUN / "pg"
    port = local.free_port()
    dsn = await asyncio.to_thread(local.start_postgres, pg_dir, port, RUN / "postgres.log")
    conn = await asyncpg.connect(dsn)
    try:
        # Commit timestamps are how latency is measured (see the module docstring).
        needs_restart = await conn.fetchval("SHOW track_commit_timestamp") != "on"
        if needs_restart:
            await conn.execute("ALTER SYSTEM SET track_commit_timestamp = on")
        # pg_stat_statements costs a few per cent: loaded only when asked for, and unloaded
        # again by the next bench that does not ask.
        preload = "pg_stat_statements" if PG_STATEMENTS else ""
        if await conn.fetchval("SHOW shared_preload_libraries") != preload:
            await conn.execute(
                "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'"
                if PG_STATEMENTS
                else "ALTER SYSTEM RESET shared_preload_libraries"
            )
            needs_restart = True
    finally:
        await conn.close()
    if needs_restart:
        await asyncio.to_thread(local.stop_postgres, pg_dir)
        dsn = await asyncio.to_thread(local.start_postgres, pg_dir, port, RUN / "postgres.log")
    if BROKER == "kafka":
        shutil.rmtree(RUN / "kafka", ignore_errors=True)  # an empty broker every bench
        pid, bootstrap = await asyncio.to_thread(
            local.start_kafka,
            local.free_port(),
            local.free_port(),
            RUN / "kafka",
            RUN / "kafka.log",
        )
    else:
        _, bootstrap = await asyncio.to_thread(
            local.start_tansu, local.free_port(), RUN / "tansu.log"
        )
        pid = _tansu_pid(bootstrap)
    infra = Infra(dsn, bootstrap, pid, pg_dir)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            infra.pg_version = await conn.fetchval("SHOW server_version")
        finally:
            await conn.close()
    except BaseException:
        await asyncio.to_thread(stop_infra, infra)  # nothing left running on a failed start
        raise
    return infra


def _tansu_pid(bootstrap: str) -> int:
    for pid, child in local._CHILDREN.items():
        if child.poll() is None and bootstrap in " ".join(map(str, child.args)):
            return pid
    return 0


def stop_infra(infra: Infra | None) -> None:
    if infra is None:
        return
    local.stop_pid(infra.broker_pid, 30)
    local.stop_postgres(infra.pg_dir)


@dataclass
class Services:
    """The services (or the naive stand-in) as processes, on one database and prefix."""

    dsn: str
    bootstrap: str
    topics: Topics
    tag: str
    ledger_port: int = 0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PYTHONPATH=str(ROOT),
            DATABASE_URL=self.dsn,
            KAFKA_BOOTSTRAP_SERVERS=self.bootstrap,
            LOYALTY_TOPIC_PREFIX=self.topics.prefix,
            LEDGER_PORT=str(self.ledger_port),
            LEDGER_API_KEYS=f"{OPS_KEY}:ops,{READER_KEY}:reader",
            LOG_LEVEL=os.environ.get("BENCH_SERVICE_LOG_LEVEL", "WARNING"),
            # Reads run with many members and no sweeps wanted mid-measurement.
            EXPIRY_SWEEP_SECONDS="3600",
            **local.consumer_env(BROKER),
        )
        return env

    def start(self, module: str, name: str | None = None) -> None:
        name = name or module.rsplit(".", 1)[-1]
        log = RUN / "logs" / f"{self.tag}-{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", module],
                cwd=ROOT,
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def assert_running(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {RUN / 'logs'}")

    def stop(self) -> None:
        for name in list(self.procs):
            proc = self.procs.pop(name)
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


PROFILE_S = int(os.environ.get("BENCH_PROFILE_SECONDS", "0"))


def profile(svc: Services, tag: str) -> None:
    """BENCH_PROFILE_SECONDS=N: py-spy samples every service for N s (collapsed stacks)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not PROFILE_S or not Path(spy).exists():
        return
    for name, proc in svc.procs.items():
        out = RUN / "profiles" / f"{tag}-{name}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(proc.pid),
                "-d",
                str(PROFILE_S),
                "-r",
                "200",
                "-f",
                "raw",
                "-o",
                str(out),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def _cpu(pid: int, reaped: bool = False) -> float:
    """utime + stime of a process (plus its reaped children's), in seconds; 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(infra: Infra, svc: Services) -> dict[str, float]:
    """CPU seconds so far of each service, of the broker, and of all Postgres processes."""
    out = {name: _cpu(proc.pid) for name, proc in svc.procs.items()}
    out[BROKER] = _cpu(infra.broker_pid)
    master = local.postgres_pid(infra.pg_dir) or 0
    pg = _cpu(master, reaped=True)  # backends that exited are in the postmaster's cutime
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == master:
                pg += _cpu(int(d.name))
    out["postgres"] = pg
    return out


async def create_topics(bootstrap: str, topics: Topics) -> None:
    await local.create_topics_async(bootstrap, topics.all(), partitions=PARTITIONS)


async def produce(bootstrap: str, topic: str, events: list[Event]) -> float:
    """Publish as fast as the client goes; returns events/s (for the record)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1)
    await producer.start()
    started = time.perf_counter()
    try:
        parts = sorted(await producer.partitions_for(topic))
        futures = []
        for i in range(0, len(events), 5_000):
            futures += await send_batches(producer, topic, parts, events[i : i + 5_000], None)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return len(events) / (time.perf_counter() - started)


async def send_batches(
    producer: AIOKafkaProducer,
    topic: str,
    partitions: list[int],
    events: list[Event],
    timestamp_ms: int | None,
) -> list[asyncio.Future[Any]]:
    """One record batch per partition, as the services' relays send (`producer.send` per
    event cost the paced producer ~50 µs of CPU an event, a quarter of a core at 5,000/s,
    on the cores the pipeline it measures runs on). Partitions are the producer's own
    (murmur2 of the key), so every event lands where `send` would have put it, in order."""
    groups: dict[int, list[Event]] = {}
    for e in events:
        groups.setdefault(partition_for(e.key, partitions), []).append(e)
    futures = []
    for part, group in groups.items():
        batch = producer.create_batch()
        for e in group:
            if batch.append(key=e.key, value=e.value, timestamp=timestamp_ms) is None:
                futures.append(await producer.send_batch(batch, topic, partition=part))
                batch = producer.create_batch()
                batch.append(key=e.key, value=e.value, timestamp=timestamp_ms)
        futures.append(await producer.send_batch(batch, topic, partition=part))
    return futures


async def end_offsets(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        ends = await consumer.end_offsets(tps)
        return int(sum(ends.values()))
    finally:
        await consumer.stop()


async def wait_until(
    probe: Callable[[], Awaitable[Any]], limit_s: float, what: str, every: float = 0.2
) -> Any:
    deadline = time.monotonic() + limit_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(every)
    raise TimeoutError(f"timed out after {limit_s:.0f}s waiting for {what}; last: {last!r}")


async def wait_drained(
    svc: Services, activity_end: int, limit_s: float, check: Callable[[], None]
) -> dict[str, Any]:
    """Every activity consumed, the rules outbox empty, and every grant journaled."""
    prefix = svc.topics.prefix
    conn = await asyncpg.connect(svc.dsn)
    try:

        async def offsets(consumer: str) -> int:
            return int(
                await conn.fetchval(
                    "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets"
                    " WHERE consumer = $1",
                    consumer,
                )
            )

        async def rules_done() -> bool:
            check()
            if await offsets(prefix + "rules") < activity_end:
                return False
            return not await conn.fetchval("SELECT count(*) FROM outbox WHERE service = 'rules'")

        await wait_until(rules_done, limit_s, "rules to consume every activity")
        grants_end = await end_offsets(svc.bootstrap, svc.topics.grants)
        while True:
            end = grants_end

            async def ledger_done(end: int = end) -> bool:
                check()
                return await offsets(prefix + "ledger") >= end

            await wait_until(ledger_done, limit_s, "ledger to journal every grant")
            # The grants' end offset read once, right after the rules' outbox emptied, was
            # sometimes short of the final one (2026-11-28: a run counted 206,686 entries
            # and its journal, dumped at the end, held 206,846): read it again until the
            # ledger has reached an end that no longer moves.
            grants_end = await end_offsets(svc.bootstrap, svc.topics.grants)
            if grants_end == end:
                break
            say(f"grants end offset moved {end:,} -> {grants_end:,} after the ledger reached it")
        row = await conn.fetchrow(
            "SELECT (SELECT min(received_at) FROM rules_activity) AS t0,"
            " (SELECT max(pg_xact_commit_timestamp(xmin)) FROM consumer_offsets"
            "   WHERE consumer = $1) AS t1,"
            " (SELECT count(*) FROM ledger_entries) AS entries,"
            " (SELECT count(*) FROM ledger_members) AS members",
            prefix + "ledger",
        )
        return {
            "seconds": (row["t1"] - row["t0"]).total_seconds(),
            "grants": grants_end,
            "entries": row["entries"],
            "members": row["members"],
        }
    finally:
        await conn.close()


# --------------------------------------------------------------------------------------
# 1 + 2: throughput
# --------------------------------------------------------------------------------------


DUMP_JOURNALS = os.environ.get("BENCH_DUMP_JOURNALS") == "1"
PG_STATEMENTS = os.environ.get("BENCH_PG_STATEMENTS") == "1"
TOP_STATEMENTS = """
SELECT round(total_exec_time)::bigint AS ms, calls, rows,
       round((total_exec_time / greatest(calls, 1))::numeric, 3) AS ms_per_call,
       regexp_replace(left(query, 160), '\\s+', ' ', 'g') AS query
FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 30
"""


async def reset_statements(dsn: str) -> None:
    """BENCH_PG_STATEMENTS=1: count statements from here (the run's database, once migrated)."""
    if not PG_STATEMENTS:
        return
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.execute("SELECT pg_stat_statements_reset()")
    finally:
        await conn.close()


async def dump_statements(dsn: str, path: Path) -> None:
    """BENCH_PG_STATEMENTS=1: the run's 30 statements by total time, as a table."""
    if not PG_STATEMENTS:
        return
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(TOP_STATEMENTS)
        total = await conn.fetchval("SELECT sum(total_exec_time) FROM pg_stat_statements")
    finally:
        await conn.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"total statement time {total / 1000:.1f} s", "ms\tcalls\trows\tms/call\tquery"]
    lines += ["\t".join(str(v) for v in r.values()) for r in rows]
    await asyncio.to_thread(path.write_text, "\n".join(lines) + "\n")
    say(f"statement times: {path}")


async def dump_journal(dsn: str, path: Path) -> None:
    """BENCH_DUMP_JOURNALS=1: the journal in id order, to diff runs of one invocation."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.copy_from_query(
            "SELECT entry_id, member_id, kind, points, balance_after, occurred_at, rule_id,"
            " source_event_id, order_id, allocations FROM ledger_entries ORDER BY entry_id",
            output=str(path),
        )
    finally:
        await conn.close()
    say(f"journal dumped: {path}")


async def throughput_run(
    infra: Infra, events: list[Event], naive: bool, tag: str
) -> dict[str, Any]:
    db = f"bench_{tag}"
    dsn = await infra.fresh_db(db)
    topics = Topics(prefix=f"b{uuid.uuid4().hex[:8]}.")
    await create_topics(infra.bootstrap, topics)
    produce_eps = await produce(infra.bootstrap, topics.activity, events)
    await reset_statements(dsn)
    svc = Services(dsn, infra.bootstrap, topics, tag, ledger_port=local.free_port())
    try:
        if naive:
            svc.start("bench.naive", "naive")
        else:
            svc.start("services.rules")
            svc.start("services.ledger")
        svc.start("services.notifier")
        profile(svc, tag)
        timeout = 60 + len(events) / (50 if naive else 500)
        cpu0 = cpu_snapshot(infra, svc)
        result = await wait_drained(svc, len(events), timeout, svc.assert_running)
        cpu1 = cpu_snapshot(infra, svc)
    finally:
        svc.stop()
    if DUMP_JOURNALS:
        await dump_journal(dsn, RUN / "journals" / f"{tag}.tsv")
    await dump_statements(dsn, RUN / "statements" / f"{tag}.tsv")
    await infra.drop_db(db)
    result["eps"] = len(events) / result["seconds"]
    # CPU time per 1,000 events by component: independent of what else the machine ran.
    result["cpu_ms_per_1k_events"] = {
        k: round(1000 * (cpu1[k] - cpu0.get(k, 0.0)) * 1000 / len(events), 1) for k in cpu1
    }
    result["load_average"] = os.getloadavg()[0]
    result["produce_eps"] = round(produce_eps)
    say(
        f"{'naive' if naive else 'e2e'} {tag}: {len(events)} events, {result['grants']} grants,"
        f" {result['entries']} entries in {result['seconds']:.2f}s = {result['eps']:,.0f} events/s;"
        f" CPU ms per 1k events {result['cpu_ms_per_1k_events']}"
    )
    return result


# --------------------------------------------------------------------------------------
# 3: latency at a fixed offered load
# --------------------------------------------------------------------------------------


async def paced_produce(
    bootstrap: str, topic: str, events: list[Event], eps: int
) -> tuple[dict[str, int], float, float]:
    """Sends `eps` events a second in 5 ms ticks, stamping each with its tick's send time;
    returns the stamps, the rate reached and this process's CPU seconds while sending."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1)
    await producer.start()
    sent: dict[str, int] = {}
    futures = []
    tick = 0.005 if eps * 0.005 >= 1 else 1 / eps
    cpu = time.process_time()
    started = time.perf_counter()
    i = 0
    try:
        parts = sorted(await producer.partitions_for(topic))
        while i < len(events):
            due = min(int((time.perf_counter() - started) * eps) + 1, len(events))
            if i < due:
                ts = int(time.time() * 1000)
                for e in events[i:due]:
                    sent[e.event_id] = ts
                futures += await send_batches(producer, topic, parts, events[i:due], ts)
                i = due
            await asyncio.sleep(tick)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return sent, len(events) / (time.perf_counter() - started), time.process_time() - cpu


async def latency_run(
    infra: Infra, events: list[Event], tag: str, eps: int = LATENCY_EPS
) -> dict[str, Any]:
    db = f"bench_{tag}"
    dsn = await infra.fresh_db(db)
    topics = Topics(prefix=f"b{uuid.uuid4().hex[:8]}.")
    await create_topics(infra.bootstrap, topics)
    svc = Services(dsn, infra.bootstrap, topics, tag, ledger_port=local.free_port())
    try:
        for name in ("rules", "ledger", "notifier"):
            svc.start(f"services.{name}")
        await wait_ready(svc)
        sent, offered, producer_cpu = await paced_produce(
            infra.bootstrap, topics.activity, events, eps
        )
        await wait_drained(svc, len(events), 600, svc.assert_running)
        api_probe = await probe_api(svc, events[-1])
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT source_event_id, min(pg_xact_commit_timestamp(xmin)) AS visible"
                " FROM ledger_entries WHERE source_event_id IS NOT NULL GROUP BY 1"
            )
            # Where the time goes: produce -> rules batch start -> rules commit -> visible.
            hops = await conn.fetch(
                "SELECT event_id, received_at, pg_xact_commit_timestamp(xmin) AS rules_commit"
                " FROM rules_activity"
            )
        finally:
            await conn.close()
    finally:
        svc.stop()
    await infra.drop_db(db)
    first = min(sent.values())
    lat = sorted(
        r["visible"].timestamp() * 1000 - sent[r["source_event_id"]]
        for r in rows
        if r["source_event_id"] in sent
        and sent[r["source_event_id"]] - first >= LATENCY_WARMUP_S * 1000
    )
    visible = {r["source_event_id"]: r["visible"].timestamp() * 1000 for r in rows}
    to_rules, in_rules, to_ledger = [], [], []
    for h in hops:
        sent_ms = sent.get(h["event_id"])
        if sent_ms is None or h["event_id"] not in visible:
            continue
        if sent_ms - first < LATENCY_WARMUP_S * 1000:
            continue
        start, commit = h["received_at"].timestamp() * 1000, h["rules_commit"].timestamp() * 1000
        to_rules.append(start - sent_ms)
        in_rules.append(commit - start)
        to_ledger.append(visible[h["event_id"]] - commit)
    out = {
        "breakdown_p50_p99_ms": {
            "produce_to_rules_batch": [_pct(sorted(to_rules), 50), _pct(sorted(to_rules), 99)],
            "rules_batch": [_pct(sorted(in_rules), 50), _pct(sorted(in_rules), 99)],
            "rules_commit_to_visible": [_pct(sorted(to_ledger), 50), _pct(sorted(to_ledger), 99)],
        },
        "offered_eps": round(offered),
        # The bench's own producer shares the two cores with what it measures.
        "producer_cpu_ms_per_1k": round(producer_cpu / len(events) * 1e6, 1),
        "samples": len(lat),
        "p50_ms": _pct(lat, 50),
        "p99_ms": _pct(lat, 99),
        "max_ms": round(lat[-1], 1) if lat else None,
        "api_probe": api_probe,
        "latencies_ms": lat,
    }
    say(
        f"latency {tag}: offered {offered:,.0f} events/s (producer"
        f" {out['producer_cpu_ms_per_1k']} ms CPU per 1k), {len(lat)} events with entries:"
        f" p50 {out['p50_ms']} ms, p99 {out['p99_ms']} ms, max {out['max_ms']} ms;"
        f" hops p50/p99 {out['breakdown_p50_p99_ms']}"
    )
    return out


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    k = min(len(xs) - 1, max(0, round(p / 100 * len(xs)) - 1))
    return round(xs[k], 1)


async def wait_ready(svc: Services) -> None:
    async def ready() -> bool:
        svc.assert_running()
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                r = await client.get(f"http://127.0.0.1:{svc.ledger_port}/readyz")
                if r.status_code != 200:
                    return False
        except httpx.HTTPError:
            return False
        conn = await asyncpg.connect(svc.dsn)
        try:
            n = await conn.fetchval("SELECT count(DISTINCT consumer) FROM consumer_offsets")
        finally:
            await conn.close()
        return bool(n >= 3)

    await wait_until(ready, 120, "services ready", every=0.25)


async def probe_api(svc: Services, event: Event) -> dict[str, Any]:
    """Cross-check: the API serves the member of the last event once its batch committed."""
    async with httpx.AsyncClient(timeout=5) as client:
        r = await client.get(
            f"http://127.0.0.1:{svc.ledger_port}/v1/members/{event.key.decode()}",
            headers={"Authorization": f"Bearer {READER_KEY}"},
        )
    return {"status": r.status_code, "member": event.key.decode()}


# --------------------------------------------------------------------------------------
# 4: rebuild
# --------------------------------------------------------------------------------------

GEN_ENTRIES = """
INSERT INTO ledger_entries (entry_id, member_id, kind, points, balance_after, occurred_at,
                            expires_at, rule_id, ruleset_version, source_event_id, store_id,
                            allocations)
SELECT 'x' || g, 'm' || lpad((g % $2)::text, 7, '0'), 'earn', 10 + g % 300,
       (g / $2 + 1) * 150, now() - interval '200 days' + g * interval '5 milliseconds',
       now() + interval '165 days' + g * interval '5 milliseconds', 'base', 'bench',
       'e' || g, 'sh-jingan', '[]'::jsonb
FROM generate_series(1, $1) AS g
"""


def rebuild_available() -> bool:
    r = subprocess.run(
        [sys.executable, "-m", "services.ctl", "ledger", "rebuild", "--help"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    return r.returncode == 0


async def rebuild_runs(infra: Infra) -> dict[str, Any]:
    if not rebuild_available():
        say("rebuild: `python -m services.ctl ledger rebuild` not available yet; skipped")
        return {"available": False}
    db = "bench_rebuild"
    dsn = await infra.fresh_db(db)
    members = max(1, REBUILD_ENTRIES // 20)
    conn = await asyncpg.connect(dsn)
    try:
        t = time.perf_counter()
        await conn.execute(GEN_ENTRIES, REBUILD_ENTRIES, members)
        await conn.execute("ANALYZE ledger_entries")
        say(
            f"rebuild: {REBUILD_ENTRIES:,} journal entries generated"
            f" in {time.perf_counter() - t:.1f}s"
        )
    finally:
        await conn.close()
    seconds = []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": dsn}
    try:
        for i in range(RUNS):
            t = time.perf_counter()
            r = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "services.ctl", "ledger", "rebuild", "--database-url", dsn],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
            )
            took = time.perf_counter() - t
            if r.returncode != 0:
                say(f"rebuild failed ({r.returncode}): {(r.stderr or r.stdout)[-800:]}")
                return {"available": True, "error": (r.stderr or r.stdout)[-2000:]}
            seconds.append(took)
            say(f"rebuild run {i + 1}: {REBUILD_ENTRIES:,} entries in {took:.1f}s")
            if took > REBUILD_MAX_S:
                break
    finally:
        await infra.drop_db(db)
    med = statistics.median(seconds)
    return {
        "available": True,
        "entries": REBUILD_ENTRIES,
        "members": members,
        "seconds": seconds,
        "eps": REBUILD_ENTRIES / med,
    }


# --------------------------------------------------------------------------------------
# 7: expiry sweep (run after rebuild, before reads)
# --------------------------------------------------------------------------------------

SWEEP_LOTS_PER_MEMBER = 5
# $3 names the lots apart; $4 is the first lot's expiry, the others an hour or a day later;
# `sweep_at` as the ledger writes a lot: its first warning's moment.
GEN_SWEEP_LOTS = """
INSERT INTO ledger_lots (lot_id, member_id, points, remaining, earned_at, available_from,
                         expires_at, source_event_id, rule_id, sweep_at)
SELECT lot_id, member_id, 100, 100, earned, earned, expires, source, 'base',
       expires - interval '30 days'
FROM (
    SELECT $3::text || g || '-' || k AS lot_id, 'm' || lpad(g::text, 7, '0') AS member_id,
           $4::timestamptz - interval '365 days' AS earned,
           $4::timestamptz + k * interval '1 day' + (g % 17) * interval '1 hour' AS expires,
           'e' || g || '-' || k AS source
    FROM generate_series(0, $1 - 1) AS g, generate_series(0, $2 - 1) AS k
) AS lots
"""
GEN_SWEEP_MEMBERS = """
INSERT INTO ledger_members (member_id, earned)
SELECT 'm' || lpad(g::text, 7, '0'), 200 * $2 FROM generate_series(0, $1 - 1) AS g
"""


async def sweep_run(infra: Infra, lots: int, tag: str) -> dict[str, Any]:
    """One sweep of `lots` lapsed lots, one of `lots` lots to warn about, one idle sweep."""
    from services.common.runtime import init_connection, tune_gc
    from services.ledger.sweeper import ExpirySweeper

    tune_gc()  # as the ledger process runs
    db = f"bench_sweep_{tag}"
    dsn = await infra.fresh_db(db)
    members = max(1, lots // SWEEP_LOTS_PER_MEMBER)
    now = datetime.now(UTC)
    out: dict[str, Any] = {"lots": members * SWEEP_LOTS_PER_MEMBER, "members": members}
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2, init=init_connection)
    try:
        sweeper = ExpirySweeper(pool, "bench.ledger", 60, lambda: None)

        async def analyze(sql: str = "", *args: Any) -> None:
            async with pool.acquire() as conn:
                if sql:
                    await conn.execute(sql, *args)
                await conn.execute("ANALYZE ledger_members, ledger_lots")  # as autovacuum would

        async def timed_sweep() -> tuple[float, tuple[int, int]]:
            t = time.perf_counter()
            done = await sweeper.sweep_once(now)
            return time.perf_counter() - t, done

        await analyze(GEN_SWEEP_MEMBERS, members, SWEEP_LOTS_PER_MEMBER)
        # Lapsed 1-35 days ago.
        await analyze(GEN_SWEEP_LOTS, members, SWEEP_LOTS_PER_MEMBER, "x", now - timedelta(35))
        out["expire_seconds"], (expired, _) = await timed_sweep()
        # 10-15 days ahead: inside the 30-day window, not the 7-day one.
        await analyze(GEN_SWEEP_LOTS, members, SWEEP_LOTS_PER_MEMBER, "w", now + timedelta(10))
        out["warn_seconds"], (_, warned) = await timed_sweep()
        await analyze()
        out["idle_seconds"], idle = await timed_sweep()
        assert idle == (0, 0), idle
        out["expired_entries"], out["warnings"] = expired, warned
    finally:
        await pool.close()
        await infra.drop_db(db)
    out["expire_eps"] = expired / out["expire_seconds"]
    out["warn_eps"] = warned / out["warn_seconds"]
    say(
        f"sweep {tag}: {expired:,} lapsed lots expired in {out['expire_seconds']:.1f}s"
        f" ({out['expire_eps']:,.0f}/s), {warned:,} warnings in {out['warn_seconds']:.1f}s"
        f" ({out['warn_eps']:,.0f}/s), idle sweep over them {out['idle_seconds']:.2f}s"
    )
    return out


async def sweep_runs(infra: Infra) -> dict[str, Any]:
    runs = [await sweep_run(infra, SWEEP_LOTS, str(i)) for i in range(RUNS)]
    return {
        "lots": runs[0]["lots"],
        "method": "ExpirySweeper.sweep_once in the bench process (the ledger's own code), pages"
        " of 500 members / 5,000 lots, relay not running (outbox rows written, not published)",
        "runs": runs,
        "expire_eps": statistics.median(r["expire_eps"] for r in runs),
        "warn_eps": statistics.median(r["warn_eps"] for r in runs),
        "idle_seconds": statistics.median(r["idle_seconds"] for r in runs),
    }


# --------------------------------------------------------------------------------------
# 5: reads
# --------------------------------------------------------------------------------------

GEN_MEMBERS = """
INSERT INTO ledger_members (member_id, tier, qualifying_spend, earned, redeemed, expired)
SELECT 'm' || lpad(g::text, 7, '0'), (ARRAY['member','silver','gold','diamond'])[1 + g % 4],
       (g % 50000)::numeric, 1000 + g % 9000, g % 500, 0
FROM generate_series(0, $1 - 1) AS g
"""
# `sweep_at` as the ledger writes a lot (its first warning; none is due here): left to its
# default, every lot would be due and the ledger's first sweep would look at all of them
# while the reads are measured.
GEN_LOTS = """
INSERT INTO ledger_lots (lot_id, member_id, points, remaining, earned_at, available_from,
                         expires_at, rule_id, sweep_at)
SELECT lot_id, member_id, 500, 400, earned, earned, expires, 'base', expires - interval '30 days'
FROM (
    SELECT 'l' || g || '-' || k AS lot_id, 'm' || lpad(g::text, 7, '0') AS member_id,
           now() - k * interval '40 days' AS earned,
           now() + interval '365 days' - k * interval '40 days' - (g % 30) * interval '1 day'
               AS expires
    FROM generate_series(0, $1 - 1) AS g, generate_series(0, 1) AS k
) AS lots
"""
WRK_SCRIPT = """
math.randomseed(os.time())
wrk.headers["Authorization"] = "Bearer %s"
request = function()
  return wrk.format("GET", string.format("/v1/members/m%%07d", math.random(0, %d)))
end
"""


async def read_runs(infra: Infra) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        say("reads: wrk not installed (apt-get install wrk); skipped")
        return {"available": False}
    db = "bench_reads"
    dsn = await infra.fresh_db(db)
    conn = await asyncpg.connect(dsn)
    try:
        t = time.perf_counter()
        await conn.execute(GEN_MEMBERS, READ_MEMBERS)
        await conn.execute(GEN_LOTS, READ_MEMBERS)
        await conn.execute("VACUUM ANALYZE ledger_members")
        await conn.execute("VACUUM ANALYZE ledger_lots")
        say(
            f"reads: {READ_MEMBERS:,} members, {2 * READ_MEMBERS:,} lots"
            f" in {time.perf_counter() - t:.1f}s"
        )
    finally:
        await conn.close()
    topics = Topics(prefix=f"b{uuid.uuid4().hex[:8]}.")
    await create_topics(infra.bootstrap, topics)
    svc = Services(dsn, infra.bootstrap, topics, "reads", ledger_port=local.free_port())
    runs: list[dict[str, float]] = []
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT % (READER_KEY, READ_MEMBERS - 1))
        script = f.name
    try:
        svc.start("services.ledger")
        await wait_until(lambda: _http_ok(svc.ledger_port), 60, "ledger API", every=0.25)
        url = f"http://127.0.0.1:{svc.ledger_port}"
        # Warm-up: connections, the pool, the planner's cached plans.
        await asyncio.to_thread(_wrk, wrk, url, script, 3)
        for i in range(RUNS):
            rps, p99, p50, errors = await asyncio.to_thread(_wrk, wrk, url, script, READ_SECONDS)
            runs.append({"rps": rps, "p50_ms": p50, "p99_ms": p99, "errors": errors})
            say(f"reads run {i + 1}: {rps:,.0f} req/s, p50 {p50} ms, p99 {p99} ms, errors {errors}")
    finally:
        svc.stop()
        os.unlink(script)
        await infra.drop_db(db)
    best = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
    return {
        "available": True,
        "members": READ_MEMBERS,
        "clients": READ_CLIENTS,
        "runs": runs,
        **best,
    }


async def _http_ok(port: int) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            return (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
    except httpx.HTTPError:
        return False


def _wrk(wrk: str, url: str, script: str, seconds: int) -> tuple[float, float, float, int]:
    r = subprocess.run(
        [wrk, "-t2", f"-c{READ_CLIENTS}", f"-d{seconds}s", "--latency", "-s", script, url],
        capture_output=True,
        text=True,
        check=True,
    )
    out = r.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m, out
        v = float(m.group(1))
        return round({"us": v / 1000, "ms": v, "s": v * 1000}[m.group(2)], 2)

    errs = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors:.*", out)
    errors = int(errs.group(1)) if errs else 0
    if sock:
        errors += sum(int(x) for x in re.findall(r"\d+", sock.group(0)))
    return rps, pct("99"), pct("50"), errors


# --------------------------------------------------------------------------------------
# 6: backtesting
# --------------------------------------------------------------------------------------


def simulate_available() -> bool:
    r = subprocess.run(
        [sys.executable, "-m", "services.ctl", "rules", "simulate", "--help"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    return r.returncode == 0


async def simulate_cli(infra: Infra, events: list[Event]) -> dict[str, Any]:
    """`ledgerctl rules simulate` over recorded activity (rows COPYed in): the rule book in
    force (default) vs the reference-004 candidate. The figure is the rate the command
    reports for its replay (reading, parsing, both lanes, what is left of the workers'
    start-up); the wall time of the whole process, start-up and connecting included, is
    kept beside it."""
    import orjson

    db = "bench_sim"
    dsn = await infra.fresh_db(db)
    rows = []
    for i, e in enumerate(events):
        body = orjson.loads(e.value)
        at = datetime.fromisoformat(body["occurred_at"])
        rows.append((e.event_id, body["member_id"], body["type"], at, "bench", 0, i, e.value))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.copy_records_to_table(
            "rules_activity",
            records=rows,
            columns=[
                "event_id",
                "member_id",
                "type",
                "occurred_at",
                "topic",
                "partition",
                "offset",
                "payload",
            ],
        )
    finally:
        await conn.close()
    start = min(r[3] for r in rows).isoformat()
    end = (max(r[3] for r in rows) + timedelta(seconds=1)).isoformat()
    from services.rules.rulebook_store import RULESETS_DIR

    cmd = [
        sys.executable,
        "-m",
        "services.ctl",
        "rules",
        "simulate",
        "--ruleset",
        str(RULESETS_DIR / "reference-004.yaml"),
        "--from",
        start,
        "--to",
        end,
        "--no-warmup",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": dsn}
    seconds: list[float] = []
    reported: list[float] = []
    try:
        for i in range(RUNS):
            t = time.perf_counter()
            r = await asyncio.to_thread(
                subprocess.run,
                cmd,
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
            )
            took = time.perf_counter() - t
            if r.returncode != 0:
                say(f"simulate failed ({r.returncode}): {(r.stderr or r.stdout)[-800:]}")
                return {"available": True, "error": (r.stderr or r.stdout)[-2000:]}
            seconds.append(took)
            m = re.search(r"replayed ([\d,]+) events in ([\d.]+) s", r.stderr)
            if m is None:
                say(f"simulate printed no replay rate: {r.stderr[-400:]}")
                return {"available": True, "error": "no replay rate in the output"}
            reported.append(int(m.group(1).replace(",", "")) / float(m.group(2)))
            say(
                f"simulate run {i + 1}: {len(events):,} events, replay {float(m.group(2)):.2f}s"
                f" ({reported[-1]:,.0f} events/s), {took:.2f}s with process start-up"
            )
    finally:
        await infra.drop_db(db)
    return {
        "available": True,
        "method": "`ledgerctl rules simulate --no-warmup --ruleset reference-004.yaml`: each"
        " event priced under the book in force and the candidate; the rate it reports for"
        " the replay (reading Postgres, parsing, both lanes, what is left of the workers'"
        " start-up)",
        "compiled_core": services_rules_native(),
        "events": len(events),
        "replay_eps": reported,
        "eps": statistics.median(reported),
        "wall_seconds_with_startup": seconds,
        "wall_eps_with_startup": len(events) / statistics.median(seconds),
    }


def simulate(events: list[Event]) -> dict[str, Any]:
    """The pure evaluator over the workload, parsing included: what a backtest does per event."""
    from schemas.activity import parse_activity
    from services.rules.engine import evaluate
    from services.rules.rulebook_store import DEFAULT_RULESET
    from services.rules.ruleset import load_ruleset
    from services.rules.state import MemberState, with_shared_tz

    ruleset = load_ruleset(DEFAULT_RULESET)
    runs = []
    grants = 0
    for _ in range(1):
        states: dict[str, MemberState] = {}
        referrers: dict[str, str | None] = {}
        grants = 0
        t = time.perf_counter()
        for raw in events:
            event = with_shared_tz(parse_activity(raw.value))  # as the live adapter does
            state = states.get(event.member_id) or MemberState(member_id=event.member_id)
            result = evaluate(state, event, ruleset, referrers)
            states[event.member_id] = result.state
            referrers[event.member_id] = result.state.referrer_id
            grants += len(result.grants)
        runs.append(time.perf_counter() - t)
    eps = len(events) / statistics.median(runs)
    say(
        f"backtesting (pure evaluator): {len(events):,} events, {grants:,} grants,"
        f" {eps:,.0f} events/s"
    )
    return {
        "method": "pure evaluator in-process (parse + evaluate)",
        "events": len(events),
        "eps": eps,
        "seconds": runs,
    }


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def services_rules_native() -> bool:
    import services.rules

    return services.rules.NATIVE


def _rules_core() -> str:
    import services.rules
    from services.common import native

    if services.rules.NATIVE:
        return "compiled (mypyc)"
    if not native.enabled():
        return "Python (LOYALTY_NATIVE=0)"
    return f"Python ({native.stale_reason() or 'no native build'})"


def machine(infra: Infra) -> dict[str, Any]:
    cpu = ""
    try:
        m = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1) if m else ""
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "rules_core": _rules_core(),
        "broker": (
            f"Apache Kafka {local.KAFKA_VERSION} (KRaft, one node)"
            if BROKER == "kafka"
            else f"Tansu ({Path(local.tansu_bin()).name}, memory storage)"
        )
        + f", {PARTITIONS} partitions",
        "postgres": infra.pg_version,
        "synchronous_commit": "on",
        "fsync": "on",
        "consumer_max_batch": int(os.environ.get("CONSUMER_MAX_BATCH", "5000")),
        "consumer_batch_wait_ms": int(os.environ.get("CONSUMER_BATCH_WAIT_MS", "5")),
        "consumer_fetch_wait_ms": int(local.consumer_env(BROKER)["CONSUMER_FETCH_WAIT_MS"]),
        "planner_stats_seconds": float(os.environ.get("PLANNER_STATS_SECONDS") or 2.0),
        "load_average_at_start": os.getloadavg()[0],
        # bench/machine_probe.py: what makes runs on different days comparable.
        "wakeup_rtt_us": round(machine_probe.wakeup_rtt_us(), 1),
        "python_loop_us": round(machine_probe.python_loop_us(), 2),
    }


def chart(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib not installed: no chart")
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    s = results["summary"]
    names = ["e2e", "naive", "rebuild", "reads (rps)", "backtest"]
    vals = [s["e2e_eps"], s["naive_eps"], s["rebuild_eps"], s["read_rps"], s["sim_eps"]]
    targets = [20_000, None, 200_000, 3_000, 100_000]
    ax1.bar(names, [v or 0 for v in vals], color="#4a7")
    for i, t in enumerate(targets):
        if t:
            ax1.plot([i - 0.4, i + 0.4], [t, t], "r--", lw=1)
    ax1.set_yscale("log")
    ax1.set_ylabel("per second (log)")
    ax1.set_title("throughput (red: target)")
    lat = results.get("latency", {}).get("best_latencies_ms") or []
    if lat:
        ys = [(i + 1) / len(lat) for i in range(len(lat))]
        ax2.plot(lat, ys)
        ax2.axvline(100, color="r", ls="--", lw=1)
        ax2.set_xscale("log")
        ax2.set_xlabel("produce -> visible (ms, log)")
        ax2.set_ylabel("fraction of events")
        ax2.set_title(f"latency CDF at {LATENCY_EPS:,} events/s")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _fmt(v: Any, nd: int = 0) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.{nd}f}"


async def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    infra: Infra | None = None
    results: dict[str, Any] = {"quick": QUICK, "started_at": datetime.now(UTC).isoformat()}
    t_start = time.perf_counter()
    try:
        say("starting Postgres and Tansu")
        infra = await start_infra()
        results["machine"] = machine(infra)
        say(f"machine: {json.dumps(results['machine'])}")
        events = generate(max(E2E_EVENTS, NAIVE_EVENTS, SIM_EVENTS), seed=42)
        results["workload"] = describe(events[:E2E_EVENTS])

        if want("e2e"):
            runs = [
                await throughput_run(infra, events[:E2E_EVENTS], False, f"e2e{i}")
                for i in range(RUNS)
            ]
            results["e2e"] = {
                "events": E2E_EVENTS,
                "runs": runs,
                "eps": statistics.median(r["eps"] for r in runs),
            }
        if want("naive"):
            runs = [
                await throughput_run(infra, events[:NAIVE_EVENTS], True, f"naive{i}")
                for i in range(RUNS)
            ]
            results["naive"] = {
                "events": NAIVE_EVENTS,
                "runs": runs,
                "eps": statistics.median(r["eps"] for r in runs),
            }
        if want("latency"):
            lat_events = generate(LATENCY_EPS * LATENCY_SECONDS, seed=7)
            runs = [await latency_run(infra, lat_events, f"lat{i}") for i in range(RUNS)]
            med = sorted(runs, key=lambda r: r["p99_ms"] or 0)[len(runs) // 2]
            results["latency"] = {
                "offered_eps": LATENCY_EPS,
                "seconds": LATENCY_SECONDS,
                "warmup_excluded_s": LATENCY_WARMUP_S,
                "method": "broker CreateTime (set at send) -> commit timestamp of the ledger"
                " transaction that journaled the event's first entry and updated the read models",
                "runs": [{k: v for k, v in r.items() if k != "latencies_ms"} for r in runs],
                "p50_ms": statistics.median(r["p50_ms"] or 0 for r in runs),
                "p99_ms": statistics.median(r["p99_ms"] or 0 for r in runs),
                "max_ms": statistics.median(r["max_ms"] or 0 for r in runs),
                "best_latencies_ms": med["latencies_ms"][
                    :: max(1, len(med["latencies_ms"]) // 2000)
                ],
            }
            low = await latency_run(
                infra, lat_events[: LATENCY_LOW_EPS * LATENCY_SECONDS], "latlow", LATENCY_LOW_EPS
            )
            results["latency"]["at_sustainable_load"] = {
                "offered_eps": LATENCY_LOW_EPS,
                **{k: v for k, v in low.items() if k != "latencies_ms"},
            }
        if want("rebuild"):
            results["rebuild"] = await rebuild_runs(infra)
        if want("sweep"):
            results["sweep"] = await sweep_runs(infra)
        if want("reads"):
            results["reads"] = await read_runs(infra)
        if want("sim"):
            pure = await asyncio.to_thread(simulate, events[:SIM_EVENTS])
            if simulate_available():
                results["sim"] = await simulate_cli(infra, events[:SIM_EVENTS])
                results["sim"]["pure_evaluator_eps"] = pure["eps"]
            else:
                say("simulate: `ledgerctl rules simulate` not available; pure evaluator reported")
                results["sim"] = pure
    finally:
        await asyncio.to_thread(stop_infra, infra)

    e2e = results.get("e2e", {}).get("eps")
    naive = results.get("naive", {}).get("eps")
    s = {
        "e2e_eps": e2e,
        "naive_eps": naive,
        "ratio": (e2e / naive) if e2e and naive else None,
        "p99_ms": results.get("latency", {}).get("p99_ms"),
        "rebuild_eps": results.get("rebuild", {}).get("eps"),
        "read_rps": results.get("reads", {}).get("rps"),
        "read_p99_ms": results.get("reads", {}).get("p99_ms"),
        "sim_eps": results.get("sim", {}).get("eps"),
    }
    results["summary"] = s
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    out = RESULTS / f"{stamp}{'-quick' if QUICK else ''}.json"
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    png = out.with_suffix(".png")
    chart(results, png)

    lat = results.get("latency", {})
    low = lat.get("at_sustainable_load", {})
    rows = [
        ("end-to-end", f"{_fmt(e2e)} events/s", "≥ 20,000"),
        ("naive baseline", f"{_fmt(naive)} events/s", ""),
        ("ratio", _fmt(s["ratio"], 1), "≥ 20"),
        (
            f"latency @ {LATENCY_EPS:,}/s",
            f"p50 {_fmt(lat.get('p50_ms'), 1)} / p99 {_fmt(lat.get('p99_ms'), 1)}"
            f" / max {_fmt(lat.get('max_ms'), 1)} ms",
            "p99 ≤ 100 ms",
        ),
        (
            f"latency @ {LATENCY_LOW_EPS:,}/s",
            f"p50 {_fmt(low.get('p50_ms'), 1)} / p99 {_fmt(low.get('p99_ms'), 1)}"
            f" / max {_fmt(low.get('max_ms'), 1)} ms",
            "(context)",
        ),
        ("rebuild", f"{_fmt(s['rebuild_eps'])} entries/s", "≥ 200,000"),
        (
            "reads",
            f"{_fmt(s['read_rps'])} req/s, p99 {_fmt(s['read_p99_ms'], 1)} ms",
            "≥ 3,000, p99 ≤ 20 ms",
        ),
        ("backtesting", f"{_fmt(s['sim_eps'])} events/s", "≥ 100,000"),
    ]
    sweep = results.get("sweep")
    if sweep:
        rows.append(
            (
                "expiry sweep",
                f"{sweep['lots']:,} lots: expire {_fmt(sweep['expire_eps'])}/s,"
                f" warn {_fmt(sweep['warn_eps'])}/s, idle {_fmt(sweep['idle_seconds'], 2)} s",
                "(context)",
            )
        )
    print()
    print(f"{'measure':<22} {'result':<44} target")
    for name, val, target in rows:
        print(f"{name:<22} {val:<44} {target}")
    print(f"\nmachine: {json.dumps(results['machine']) if 'machine' in results else 'n/a'}")
    print(f"results: {out.relative_to(ROOT)}  chart: {png.relative_to(ROOT)}")
    print(f"total: {results['total_seconds']:.0f}s")

    def n(v: Any) -> str:
        return "NA" if v is None else str(round(v))

    def x(v: Any) -> str:
        return "NA" if v is None else f"{v:.1f}"

    print(
        f"bench: e2e_eps={n(e2e)} naive_eps={n(naive)} ratio={x(s['ratio'])}"
        f" p99_ms={x(s['p99_ms'])} rebuild_eps={n(s['rebuild_eps'])}"
        f" read_rps={n(s['read_rps'])} read_p99_ms={x(s['read_p99_ms'])}"
        f" sim_eps={n(s['sim_eps'])}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
