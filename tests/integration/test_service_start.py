"""How the service processes start, and how they stop or fail while starting."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from structlog.testing import capture_logs
from yoyo import get_backend, read_migrations

from deploy.local import free_port
from services.common.config import Settings
from services.common.migrations import MIGRATIONS_DIR, _yoyo_url, migration_ids
from services.common.runtime import create_pool
from tests.integration.direct import migrated_pool
from tests.integration.harness import ROOT, wait_until

pytestmark = pytest.mark.integration


def start(service: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", f"services.{service}"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


async def test_a_ledger_waiting_for_postgres_stops_on_sigterm(tmp_path: Path) -> None:
    """The ledger waits for Postgres in uvicorn's start-up, which a SIGTERM did not
    interrupt: it stopped only after its 40 attempts, ~110 s, past `make down`'s kill."""
    log = tmp_path / "ledger.log"
    nobody = f"postgresql://loyalty:loyalty@127.0.0.1:{free_port()}/loyalty"
    ledger = start("ledger", log, DATABASE_URL=nobody, LEDGER_PORT=str(free_port()))
    try:

        async def waiting() -> bool:
            return "database_unavailable" in log.read_text()

        await wait_until(waiting, timeout=30, what="the ledger to wait for Postgres")
        asked = time.monotonic()
        ledger.send_signal(signal.SIGTERM)
        await asyncio.to_thread(ledger.wait, 10)
        assert time.monotonic() - asked < 3
        assert "startup_cancelled" in log.read_text()
    finally:
        ledger.kill()
        ledger.wait()


@pytest.mark.parametrize("service", ["rules", "notifier", "ledger"])
async def test_a_service_that_cannot_start_says_why_in_one_json_line(
    tmp_path: Path, service: str
) -> None:
    """The rules and notifier ended with a raw traceback (many lines of text, no JSON)."""
    log = tmp_path / f"{service}.log"
    proc = start(service, log, CONSUMER_MAX_BATCH="abc", LEDGER_PORT=str(free_port()))
    assert await asyncio.to_thread(proc.wait, 30) == 1
    lines = [json.loads(line) for line in log.read_text().splitlines()]  # JSON, every one
    assert [(x["event"], x["error"]) for x in lines if x["level"] == "error"] == [
        ("startup_failed", "CONSUMER_MAX_BATCH='abc': not a whole number")
    ]


@pytest.mark.parametrize(("service", "code"), [("rules", 1), ("notifier", 1), ("ledger", 3)])
async def test_a_service_refuses_a_database_not_migrated(
    tmp_path: Path, fresh_database: str, service: str, code: int
) -> None:
    """The services do not apply the migrations: on a database never migrated they
    crashed with UndefinedTableError (the ledger's exits 3 after uvicorn's own lines)."""
    log = tmp_path / f"{service}.log"
    proc = start(service, log, DATABASE_URL=fresh_database, LEDGER_PORT=str(free_port()))
    assert await asyncio.to_thread(proc.wait, 30) == code
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    failed = [x["error"] for x in lines if x["event"] == "startup_failed"]
    assert failed == [
        "database not migrated: run python -m services.common.migrations"
        f" ({len(migration_ids())} of {len(migration_ids())} migrations missing,"
        " the first 0001_pipeline)"
    ]


async def test_a_service_refuses_a_database_a_migration_behind(
    tmp_path: Path, fresh_database: str
) -> None:
    latest = max(migration_ids())
    backend = get_backend(_yoyo_url(fresh_database))
    with backend.lock():
        pending = backend.to_apply(read_migrations(str(MIGRATIONS_DIR)))
        backend.apply_migrations(pending.filter(lambda m: m.id != latest))
    log = tmp_path / "rules.log"
    proc = start("rules", log, DATABASE_URL=fresh_database)
    assert await asyncio.to_thread(proc.wait, 30) == 1
    assert f"1 of {len(migration_ids())} migrations missing, the first {latest}" in log.read_text()


async def test_a_service_starting_while_postgres_is_out_of_connections_waits(
    fresh_database: str,
) -> None:
    """ "Too many connections" at start (every instance reconnecting after a database
    restart) ended the service at once, while a database still starting was waited for."""
    role = f"r{uuid.uuid4().hex[:12]}"
    url = urlsplit(fresh_database)
    limited = urlunsplit(url._replace(netloc=f"{role}:{role}@{url.hostname}:{url.port}"))
    async with migrated_pool(fresh_database) as pool:
        await pool.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{role}' CONNECTION LIMIT 1")
        try:
            await pool.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
            taken = await asyncpg.connect(limited)  # the role's one connection
            with capture_logs() as logs:
                starting = asyncio.create_task(
                    create_pool(Settings(database_url=limited, bootstrap_servers=""), 1)
                )
                await wait_until(
                    lambda: asyncio.sleep(
                        0, any(e["event"] == "database_unavailable" for e in logs)
                    ),
                    what="the pool to wait for a connection",
                )
                await taken.close()
                started = await asyncio.wait_for(starting, timeout=30)
            assert await started.fetchval("SELECT 1") == 1
            await started.close()
        finally:
            await pool.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
