"""The rules service's member-state write: one `INSERT … ON CONFLICT DO UPDATE` for every
touched member, or a plain `UPDATE … FROM unnest` for the members the batch found (and
locked) plus the upsert for the new ones only; and the table's fillfactor.

The states are the evaluator's over the bench workload (`json_columns.batches`, batches of
5,000 events). Each batch runs as the service runs it: `SELECT … FOR UPDATE` of its
members, then the write. Two passes over the workload: the first from an empty table (as
a bench run, about half the writes new), the second with every member there (a service
in steady state). Each way in its own database, alternating; Postgres backend CPU per
state written.

    PYTHONPATH=. .venv/bin/python bench/experiments/state_writes.py [events]
"""

from __future__ import annotations

import asyncio
import sys

import asyncpg

from bench.experiments._pg import backend_cpu_seconds, fresh_databases
from bench.experiments.json_columns import Batch, batches
from services.common.runtime import init_connection, tune_gc
from services.rules.app import SELECT_STATES, UPSERT_STATES

UPDATE_STATES = """
UPDATE rules_member_state AS s
SET referrer_id = u.r, referrer_since = COALESCE(s.referrer_since, u.rs), state = u.st::json,
    tier_valid_until = u.tu, activity_partition = u.p, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::timestamptz[],
            $6::int[]) AS u(m, r, rs, st, tu, p)
WHERE s.member_id = u.m
"""
WAYS = {  # name: (split the write, fillfactor)
    "upsert": (False, 100),
    "split": (True, 100),
    "split-ff80": (True, 80),
}


def columns(members: list[str], docs: list[str]) -> list[list[object]]:
    n = len(members)
    return [members, [None] * n, [None] * n, docs, [None] * n, [0] * n]


async def write(conn: asyncpg.Connection, split: bool, members: list[str], docs: list[str]) -> None:
    async with conn.transaction():
        found = {r["member_id"] for r in await conn.fetch(SELECT_STATES, members)}
        if not split:
            await conn.execute(UPSERT_STATES, *columns(members, docs))
            return
        old = [i for i, m in enumerate(members) if m in found]
        new = [i for i, m in enumerate(members) if m not in found]
        for statement, rows in ((UPDATE_STATES, old), (UPSERT_STATES, new)):
            if rows:
                await conn.execute(
                    statement, *columns([members[i] for i in rows], [docs[i] for i in rows])
                )


async def run(conn: asyncpg.Connection, way: str, work: list[Batch]) -> tuple[float, float]:
    """Backend CPU seconds of the two passes."""
    split, fillfactor = WAYS[way]
    await conn.execute("TRUNCATE rules_member_state")
    await conn.execute(f"ALTER TABLE rules_member_state SET (fillfactor = {fillfactor})")
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    out = []
    for _ in range(2):
        before = backend_cpu_seconds(pid)
        for members, docs, _notes in work:
            await write(conn, split, members, docs)
        out.append(backend_cpu_seconds(pid) - before)
    return out[0], out[1]


async def main(events: int) -> None:
    tune_gc()
    work = batches(events)
    writes = sum(len(b[0]) for b in work)
    print(f"{events:,} events: {writes:,} state writes a pass")
    async with fresh_databases([f"states_{i}" for i in range(len(WAYS))]) as dbs:
        conns = dict(zip(WAYS, dbs.values(), strict=True))
        for conn in conns.values():
            await init_connection(conn)
        spent: dict[str, list[tuple[float, float]]] = {way: [] for way in WAYS}
        for _ in range(3):
            for way, conn in conns.items():
                spent[way].append(await run(conn, way, work))
    for way, runs in spent.items():
        first = sorted(round(r[0] / writes * 1e6, 2) for r in runs)
        second = sorted(round(r[1] / writes * 1e6, 2) for r in runs)
        print(
            f"{way:10}: first pass {first[1]:.2f} µs, second pass {second[1]:.2f} µs of backend"
            f" CPU per state written (runs {first} / {second})"
        )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 60_000))
