"""Infrastructure: Postgres and the broker, the services as processes, their CPU time,
topics, producing the workload, and waiting for the pipeline to drain."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer, TopicPartition

from bench.settings import (
    BROKER,
    OPS_KEY,
    PARTITIONS,
    PG_STATEMENTS,
    PROFILE_S,
    READER_KEY,
    ROOT,
    RUN,
    say,
)
from bench.workload import Event
from deploy import local
from services.common.config import KafkaAccess, Topics
from services.common.log_end import log_ends_of
from services.common.migrations import apply_migrations
from services.common.outbox import partition_for


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
        # Commit timestamps are how latency is measured (see bench/run.py's docstring).
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
    """The offsets after the topic's last records, summed over its partitions: the high
    watermarks, since Tansu's ListOffsets answers short of a last batch (`log_end`)."""
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    ends = await log_ends_of(KafkaAccess(bootstrap), tps)
    return int(sum(ends.values()))


def ctl_available(*command: str) -> bool:
    """Whether this checkout's `ledgerctl` has `command` (the bench is older than some)."""
    r = subprocess.run(
        [sys.executable, "-m", "services.ctl", *command, "--help"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    return r.returncode == 0


async def ledgerctl(args: list[str], dsn: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """`python -m services.ctl ARGS` on `dsn`, as ops run it; the result and its wall time
    (process start-up included)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": dsn}
    t = time.perf_counter()
    r = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.ctl", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    return r, time.perf_counter() - t


def ctl_failed(what: str, r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """What a measure records when its command failed (the tail of its output, said too)."""
    say(f"{what} failed ({r.returncode}): {(r.stderr or r.stdout)[-800:]}")
    return {"available": True, "error": (r.stderr or r.stdout)[-2000:]}


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
            # Until 2026-11-29 the end came from ListOffsets, which on Tansu answers short
            # of each partition's last batch, so a run could stop a batch early (a run
            # counted 206,686 entries and its journal, dumped at the end, held 206,846).
            # With the high watermarks it cannot move once the rules' outbox is empty;
            # read again all the same, so that a run never stops on an end that moved.
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
