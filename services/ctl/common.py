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
from rich.console import Console
from rich.markup import escape

T = TypeVar("T")
err = Console(stderr=True)

TWO: Final = "refused input, or a database error (unreachable, failing: 'error: database: ...')"
# Connection refused or reset, DNS, timeouts (all OSError), and the server's own errors.
DATABASE_ERRORS: Final = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


def exit_codes(ok: str = "done", one: str | None = None) -> str:
    """The epilog of each command's --help."""
    codes = [f"0 {ok}", *([f"1 {one}"] if one else []), f"2 {TWO}"]
    return "Exit codes: " + "; ".join(codes) + "."


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code)


def database_error(exc: BaseException) -> typer.Exit:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return fail(f"database: {text}", code=2)


def run_db(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, with a database failure turned into a one-line error and exit code 2."""
    try:
        return asyncio.run(coro)
    except DATABASE_ERRORS as exc:
        raise database_error(exc) from exc


def with_connection(dsn: str, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Run ``work`` on one connection to ``dsn``; database failures as in `run_db`."""

    async def run() -> T:
        conn = await asyncpg.connect(dsn)
        try:
            return await work(conn)
        finally:
            await conn.close()

    return run_db(run())
