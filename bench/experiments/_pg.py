"""What the Postgres experiments share: the bench's cluster with fresh migrated databases,
and the CPU of one backend (from /proc, so other processes on the machine do not count)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import asyncpg

from deploy import local
from services.common.migrations import apply_migrations

RUN = Path(".run/bench")


def backend_cpu_seconds(pid: int) -> float:
    """User + system CPU of a Postgres backend (`SELECT pg_backend_pid()`) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.asynccontextmanager
async def fresh_databases(names: Sequence[str]) -> AsyncIterator[dict[str, asyncpg.Connection]]:
    """Starts the bench's cluster, creates one migrated database per name (dropped again
    at the end, also on failure) and yields a connection to each."""
    dsn = await asyncio.to_thread(
        local.start_postgres, RUN / "pg", local.free_port(), RUN / "postgres.log"
    )
    admin = await asyncpg.connect(dsn)
    conns: dict[str, asyncpg.Connection] = {}
    try:
        for name in names:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            await admin.execute(f"CREATE DATABASE {name}")
            db = dsn.rsplit("/", 1)[0] + f"/{name}"
            await asyncio.to_thread(apply_migrations, db)
            conns[name] = await asyncpg.connect(db)
        yield conns
    finally:
        for conn in conns.values():
            await conn.close()
        for name in names:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
        await asyncio.to_thread(local.stop_postgres, RUN / "pg")
