"""What every service process needs: a Postgres pool, a broker, a relay, a metrics port."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, Final, TypeVar

import asyncpg
import orjson
import structlog
from prometheus_client import start_http_server

from services.common.config import Settings, redacted
from services.common.migrations import migration_ids

if TYPE_CHECKING:
    from faststream.kafka import KafkaBroker

log = structlog.get_logger()
T = TypeVar("T")


async def init_connection(conn: asyncpg.Connection) -> None:
    # jsonb and json in and out as Python objects through orjson. Binary format (for jsonb
    # a version byte, then the JSON text; for json the text alone) so that COPY, which is
    # binary-only in asyncpg, can write them too.
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda v: b"\x01" + orjson.dumps(v),
        decoder=lambda b: orjson.loads(b[1:]),
        schema="pg_catalog",
        format="binary",
    )
    await conn.set_type_codec(
        "json",
        encoder=orjson.dumps,
        decoder=orjson.loads,
        schema="pg_catalog",
        format="binary",
    )


# Young-generation threshold of the cyclic GC on the hot path (CPython's default is 700).
GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for batch processing; idempotent.

    A batch allocates a few hundred thousand short-lived objects (pydantic models, dicts,
    tuples) that are freed by reference counting; with CPython's default thresholds the
    collector still runs every 700 allocations and its older generations re-walk every
    long-lived object (modules, the rule book, pools) each time. Freezing what start-up
    built and raising the threshold halved the rules evaluator's time per event
    (bench/experiments/gc_effect.py: 9.0k -> 18.4k events/s; bench/README.md).
    """
    if gc.get_threshold()[0] >= GC_GEN0_THRESHOLD:
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 100)


class StartupError(RuntimeError):
    """A service cannot start, for a reason its message gives in full."""


@contextmanager
def startup_failures() -> Iterator[None]:
    """A service process that fails to start ends with one JSON `startup_failed` line and
    exit status 1. It ended with a raw traceback: many lines of text among the JSON ones,
    which a log pipeline splits and cannot parse. A refused setting (`ConfigError`) or a
    `StartupError` says all in its message; anything else keeps its traceback, in the line.
    """
    try:
        yield
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            raise
        log.error("startup_failed", error=str(exc.code))
    except StartupError as exc:
        log.error("startup_failed", error=str(exc))
    except Exception as exc:
        log.exception("startup_failed", error=f"{type(exc).__name__}: {exc}")
    else:
        return
    raise SystemExit(1)


class StartupCancelled(Exception):
    """The process was asked to stop while it waited to start."""


# How often a wait at start-up looks whether the process was asked to stop.
STOP_POLL_S: Final = 0.1


async def create_pool(
    settings: Settings, min_size: int = 2, stopping: Callable[[], bool] = lambda: False
) -> asyncpg.Pool:
    """Retries while Postgres is still starting, so service start order does not matter,
    until `stopping()` (then `StartupCancelled`); then refuses a database not migrated.

    Every service creates its pool once at start-up, after its imports: the moment to
    tune the garbage collector for the hot path (`tune_gc`).
    """
    tune_gc()
    delay = 0.2
    for attempt in range(40):
        try:
            pool = await _unless_stopping(
                asyncpg.create_pool(
                    settings.database_url,
                    min_size=min_size,
                    max_size=settings.pool_size,
                    init=init_connection,
                    command_timeout=60,
                ),
                stopping,
            )
            break
        # Starting, or out of connections for now (every instance reconnecting at once
        # after a database restart): waited for, as the consumers wait mid-run.
        except (OSError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError) as exc:
            log.warning("database_unavailable", attempt=attempt, error=str(exc))
            await _unless_stopping(asyncio.sleep(delay), stopping)
            delay = min(delay * 2, 3.0)
    else:
        raise StartupError(f"database unreachable: {redacted(settings.database_url)}")
    assert pool is not None
    await _require_migrated(pool)
    return pool


# yoyo's record of the migrations applied (services/common/migrations.py).
SELECT_MIGRATED: Final = "SELECT migration_id FROM _yoyo_migration"
MIGRATE: Final = "python -m services.common.migrations"


async def _require_migrated(pool: asyncpg.Pool) -> None:
    """Refuses a database missing a migration this code needs: the services do not apply
    them (`make up` does, or MIGRATE), and one started on a database never migrated
    crashed on UndefinedTableError, on one a migration behind on whatever it lacked."""
    try:
        applied = {r["migration_id"] for r in await pool.fetch(SELECT_MIGRATED)}
    except asyncpg.UndefinedTableError:
        applied = set()
    wanted = migration_ids()
    missing = sorted(wanted - applied)
    if missing:
        await pool.close()
        raise StartupError(
            f"database not migrated: run {MIGRATE}"
            f" ({len(missing)} of {len(wanted)} migrations missing, the first {missing[0]})"
        )


async def _unless_stopping(aw: Awaitable[T], stopping: Callable[[], bool]) -> T:
    """`aw`, given up as soon as `stopping()` says so. uvicorn's SIGTERM only sets a flag
    that its start-up never reads: the ledger, waiting here for Postgres, went on for its
    40 attempts (~110 s) after a SIGTERM, past `make down`'s SIGKILL."""
    task = asyncio.ensure_future(aw)
    while not task.done():
        if stopping():
            task.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await task
            raise StartupCancelled
        await asyncio.wait({task}, timeout=STOP_POLL_S)
    return task.result()


def create_broker(settings: Settings, service: str) -> KafkaBroker:
    # Imported here: faststream is most of the import time of `ledgerctl`, which needs
    # only the pool and the GC tuning from this module.
    from faststream.kafka import KafkaBroker

    from services.common.kafka_clients import broker_security

    return KafkaBroker(
        settings.bootstrap_servers,
        security=broker_security(settings.kafka),
        client_id=service,
        enable_idempotence=False,
        # Its consumers' too (FastStream passes it to every subscriber's AIOKafkaConsumer).
        metadata_max_age_ms=settings.metadata_max_age_ms,
        logger=structlog.get_logger(),
        # Per-message "Received/Processed" lines would drown the logs at 20k events/s.
        log_level=logging.DEBUG,
        # No dependency injection: the batch handlers take the records as their body.
        # With it, resolving `msg: KafkaMessage` (a sync custom field) sent every batch
        # through a worker thread and back (bench/README.md, step 17).
        apply_types=False,
    )


def start_metrics_server(port: int) -> None:
    if port:
        start_http_server(port, addr="127.0.0.1")
        log.info("metrics_listening", port=port)


class Background:
    """Named background tasks whose crash is logged and takes the process down loudly."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[Any]] = []

    def spawn(self, name: str, factory: Callable[[], Awaitable[Any]]) -> None:
        async def guarded() -> None:
            try:
                await factory()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background_task_crashed", task=name)
                raise

        self._tasks.append(asyncio.create_task(guarded(), name=name))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
