"""What every `ledgerctl` group shares: one-line errors and the database exit code.

Exit codes, the same in every command: 0 done; 1 the command ran and the answer is "no"
(`ledger verify` found differences, a held event is not pending); 2 the command could not
do its work: a refused input, or the database unreachable or failing (`error: database:
...` on stderr, no traceback), so cron can tell "differences" from "could not check".
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, TypeVar

import asyncpg
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from services.common.config import KafkaAccess
from services.common.dlq import Refused, classify
from services.common.ops_session import UNBOUNDED

T = TypeVar("T")
err = Console(stderr=True)

TWO: Final = "refused input, or a database error (unreachable, failing: 'error: database: ...')"
# Connection refused or reset, DNS, timeouts (all OSError), and the server's own errors.
DATABASE_ERRORS: Final = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)

# The most any --limit takes: one more row is asked for (to say "more than shown"), and
# Postgres's bigint stops at 2^63 - 1 (a limit near it was a database error).
MAX_LIMIT: Final = 1_000_000_000


def exit_codes(ok: str = "done", one: str | None = None) -> str:
    """The epilog of each command's --help."""
    codes = [f"0 {ok}", *([f"1 {one}"] if one else []), f"2 {TWO}"]
    return "Exit codes: " + "; ".join(codes) + "."


def refusal(exc: ValidationError | Refused) -> str:
    """Why a consumer would dead-letter a message: a model's reason names its kind
    ("schema violation: ..."), a refusal's needs its label ("dated_ahead: ...")."""
    label, reason = classify(exc)
    return f"{label}: {reason}" if isinstance(exc, Refused) else reason


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code)


def database_error(exc: BaseException) -> typer.Exit:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return fail(f"database: {text}", code=2)


class BadDatabaseUrl(Exception):
    """A database URL asyncpg cannot use at all (a port that is no number or out of range,
    another scheme): the operator's input, not a database failure."""


def run_db(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, with a database failure turned into a one-line error and exit code 2."""
    try:
        return asyncio.run(coro)
    except BadDatabaseUrl as exc:
        raise fail(f"database URL refused: {exc}") from exc
    except DATABASE_ERRORS as exc:
        raise database_error(exc) from exc


async def connect(dsn: str) -> asyncpg.Connection:
    """asyncpg.connect; what it raises for an unusable URL (ValueError, OverflowError) is
    a `BadDatabaseUrl`, so that only the connection attempt is read as such."""
    try:
        return await asyncpg.connect(dsn, server_settings=UNBOUNDED)
    except asyncpg.ClientConfigurationError as exc:
        raise BadDatabaseUrl(str(exc)) from exc
    except asyncpg.InterfaceError:
        raise
    except (ValueError, OverflowError) as exc:
        raise BadDatabaseUrl(str(exc) or type(exc).__name__) from exc


def with_connection(dsn: str, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Run ``work`` on one connection to ``dsn``; database failures as in `run_db`."""

    async def run() -> T:
        conn = await connect(dsn)
        try:
            return await work(conn)
        finally:
            await conn.close()

    return run_db(run())


async def missing_topics(kafka: KafkaAccess, topics: set[str]) -> set[str]:
    """Which of `topics` the broker does not have: the ctl sends to existing topics only,
    since a broker that creates topics on first use would take a misspelt prefix for a
    new topic that nothing reads."""
    # The broker's client, only when sending.
    from aiokafka.admin import AIOKafkaAdminClient

    from services.common.kafka_clients import client_kwargs, start_client

    admin = AIOKafkaAdminClient(**client_kwargs(kafka), request_timeout_ms=10_000)
    try:
        await start_client(admin, kafka)
        return topics - set(await admin.list_topics())
    finally:
        await admin.close()
