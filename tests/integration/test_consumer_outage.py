"""A database that refuses writes must hold a batch, not skip it.

Before, a read-only database (after a failover) failed the batch with an error the
consumer took for a poison record; its dead letter failed the same way, the exception
escaped to FastStream, which swallows it with the fetch position already past the batch,
and the next good batch stored offsets beyond it: the records were never paid and never
dead-lettered. Real Postgres, the ledger's own handler, driven directly.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
import pytest
from structlog.testing import capture_logs

from services.common.config import Settings
from services.common.dlq import DEAD_LETTERS
from services.common.runtime import init_connection
from services.ledger import projector
from services.ledger.rulebook import LedgerRules
from tests.integration import direct
from tests.integration.direct import consumer_of, migrated_pool
from tests.integration.harness import wait_until
from tests.integration.ledger_helpers import grant

pytestmark = pytest.mark.integration
TOPIC = "loyalty.grants.v1"


async def test_a_batch_waits_while_the_database_refuses_writes(fresh_database: str) -> None:
    settings = Settings(database_url=fresh_database, bootstrap_servers="")
    handler = projector.make_handler(settings, "ledger", LedgerRules())
    now = datetime.now(UTC)
    batch = direct.records(TOPIC, grant("m-ro", 1200, now), grant("m-ro", 300, now))
    async with migrated_pool(fresh_database) as pool:
        read_only = await asyncpg.create_pool(
            fresh_database, min_size=1, max_size=2, init=init_connection,
            server_settings={"default_transaction_read_only": "on"},
        )  # fmt: skip
        assert read_only is not None
        consumer = consumer_of(read_only, "ledger", TOPIC, handler)
        with capture_logs() as logs:
            task = asyncio.create_task(consumer.process(batch))
            try:
                await wait_until(
                    lambda: asyncio.sleep(0, sum(e["event"] == "batch_retry" for e in logs) >= 3),
                    what="three attempts on the read-only database",
                )
                assert not task.done()
                # The database takes writes again (the failover is over).
                consumer.bind(pool, handler)
                await asyncio.wait_for(task, timeout=30)
            finally:
                task.cancel()
                await read_only.close()
        retried = [e for e in logs if e["event"] == "batch_retry"]
        assert "ReadOnlySQLTransactionError" in retried[0]["error"]
        assert not [e for e in logs if e["event"] in ("batch_failed_isolating", "poison_record")]
        async with pool.acquire() as conn:
            balance = await conn.fetchval(
                "SELECT earned FROM ledger_members WHERE member_id = 'm-ro'"
            )
            dead = await conn.fetchval("SELECT count(*) FROM dead_letters")
            stored = await conn.fetchval(
                "SELECT next_offset FROM consumer_offsets WHERE consumer = 'ledger'"
            )
    assert balance == 1500
    assert dead == 0
    assert stored == batch[-1].offset + 1


async def test_a_lock_wait_past_a_dbas_lock_timeout_is_retried_not_dead_lettered(
    fresh_database: str,
) -> None:
    """A DBA's `lock_timeout` (`ALTER ROLE ... SET lock_timeout = '1s'`) cancels a batch
    that waits on a member row another writer holds (a redemption, a sweep page). That
    failure was taken for the batch's own: its records were isolated and the ones still
    meeting the lock dead-lettered, unpaid."""
    settings = Settings(database_url=fresh_database, bootstrap_servers="")
    handler = projector.make_handler(settings, "ledger", LedgerRules())
    now = datetime.now(UTC)
    async with migrated_pool(fresh_database) as pool:
        await consumer_of(pool, "ledger", TOPIC, handler).process(
            direct.records(TOPIC, grant("m-lk", 100, now))
        )
        timing_out = await asyncpg.create_pool(
            fresh_database, min_size=1, max_size=2, init=init_connection,
            server_settings={"lock_timeout": "200ms"},
        )  # fmt: skip
        assert timing_out is not None
        consumer = consumer_of(timing_out, "ledger", TOPIC, handler)
        batch = direct.records(TOPIC, grant("m-lk", 1200, now), grant("m-lk", 300, now))
        try:
            async with pool.acquire() as holder, holder.transaction():
                await holder.execute(
                    "SELECT 1 FROM ledger_members WHERE member_id = 'm-lk' FOR UPDATE"
                )
                with capture_logs() as logs:
                    task = asyncio.create_task(consumer.process(batch))
                    await wait_until(
                        lambda: asyncio.sleep(0, any(e["event"] == "batch_retry" for e in logs)),
                        what="a retry after the lock timeout",
                    )
            await asyncio.wait_for(task, timeout=30)  # the row let go
        finally:
            await timing_out.close()
        assert not [e for e in logs if e["event"] in ("batch_failed_isolating", "poison_record")]
        earned = await pool.fetchval("SELECT earned FROM ledger_members WHERE member_id = 'm-lk'")
        dead = await pool.fetchval("SELECT count(*) FROM dead_letters")
    assert (earned, dead) == (1600, 0)


async def test_a_dead_letter_is_written_whatever_its_reason_quotes(fresh_database: str) -> None:
    """Since nothing escapes `process`, a dead letter that cannot be written would be
    retried for ever: a reason quoting a NUL or a lone surrogate (Postgres `text` takes
    neither) is escaped."""

    async def refuse(conn: asyncpg.Connection, records: object, work: object) -> None:
        raise ValueError("cannot use 'a\x00b\ud800'")

    async with migrated_pool(fresh_database) as pool:
        consumer = consumer_of(pool, "ledger", TOPIC, refuse)
        record = direct.records(TOPIC, grant("m-dl", 5, datetime.now(UTC)))
        await asyncio.wait_for(consumer.process(record), timeout=30)
        async with pool.acquire() as conn:
            reason = await conn.fetchval("SELECT reason FROM dead_letters")
    assert reason == "ValueError: cannot use 'a\\x00b\\ud800'"


async def test_a_record_keyed_with_a_nul_is_dead_lettered(fresh_database: str) -> None:
    """A malformed message whose key holds a NUL: the dead letter's outbox row copies the
    key into `outbox.key` (text), which Postgres refuses. Since nothing escapes `process`
    that would be retried for ever, the partition stuck; the key is escaped."""
    settings = Settings(database_url=fresh_database, bootstrap_servers="")
    handler = projector.make_handler(settings, "ledger", LedgerRules())
    bad = grant("m\x00x", 5, datetime.now(UTC))
    bad["_raw"] = b"not json"
    async with migrated_pool(fresh_database) as pool:
        consumer = consumer_of(pool, "ledger", TOPIC, handler)
        await asyncio.wait_for(consumer.process(direct.records(TOPIC, bad)), timeout=30)
        async with pool.acquire() as conn:
            key = await conn.fetchval("SELECT key FROM outbox WHERE topic = 'loyalty.dlq.v1'")
            dead = await conn.fetchval("SELECT count(*) FROM dead_letters")
    assert (key, dead) == ("m\\x00x", 1)


async def test_a_dead_letter_the_tables_refuse_is_kept_plainer(fresh_database: str) -> None:
    """Should a dead letter still hold something the tables refuse (here a constraint the
    test adds on its reason), a plain one is written instead: the record is kept and the
    partition moves on."""

    async def refuse(conn: asyncpg.Connection, records: object, work: object) -> None:
        raise ValueError("forbidden words")

    async with migrated_pool(fresh_database) as pool:
        async with pool.acquire() as conn:
            await conn.execute(
                "ALTER TABLE dead_letters ADD CONSTRAINT no_forbidden"
                " CHECK (reason NOT LIKE '%forbidden%')"
            )
        consumer = consumer_of(pool, "ledger", TOPIC, refuse)
        batch = direct.records(TOPIC, grant("m-plain", 5, datetime.now(UTC)))
        with capture_logs() as logs:
            await asyncio.wait_for(consumer.process(batch), timeout=30)
        async with pool.acquire() as conn:
            reason = await conn.fetchval("SELECT reason FROM dead_letters")
            stored = await conn.fetchval("SELECT next_offset FROM consumer_offsets")
    assert reason == "processing_error (its reason could not be stored: CheckViolationError)"
    assert stored == batch[-1].offset + 1
    assert [e["event"] for e in logs if e["event"] == "dead_letter_unwritable"] == [
        "dead_letter_unwritable"
    ]


async def test_a_plainer_dead_letter_is_counted_once(fresh_database: str) -> None:
    async def refuse(conn: asyncpg.Connection, records: object, work: object) -> None:
        raise ValueError("forbidden words")

    async with migrated_pool(fresh_database) as pool:
        async with pool.acquire() as conn:
            await conn.execute("ALTER TABLE dead_letters ADD CONSTRAINT no_forbidden"
                               " CHECK (reason NOT LIKE '%forbidden%')")  # fmt: skip
        consumer = consumer_of(pool, "ledger", TOPIC, refuse)
        metric = DEAD_LETTERS.labels(consumer.name, "processing_error")
        before = metric._value.get()
        batch = direct.records(TOPIC, grant("m-plain", 5, datetime.now(UTC)))
        await asyncio.wait_for(consumer.process(batch), timeout=30)
        async with pool.acquire() as conn:
            letters = await conn.fetchval("SELECT count(*) FROM dead_letters")
    assert letters == 1
    assert metric._value.get() - before == 1  # loyalty_dlq_messages_total
