"""Rule-set versions kept in Postgres: every published version stays, none is edited.

The rules service loads the whole book at start and re-reads it when a new version is
published (`ledgerctl rules publish`), so running instances pick changes up without a
restart. An empty table is seeded with the repository's default rule set.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Final

import asyncpg

from services.rules.ruleset import (
    RuleBook,
    RuleSet,
    RuleSetError,
    load_ruleset,
    publish_problems,
)

RULESETS_DIR: Final = Path(__file__).resolve().parent / "rulesets"
DEFAULT_RULESET: Final = RULESETS_DIR / "default.yaml"

# Ties cannot be published (`publish`); the tie-break keeps any older pair of rows in one
# order for every reader.
SELECT_VERSIONS: Final = (
    "SELECT version, body FROM rules_rulesets ORDER BY effective_from, published_at, version"
)
LIST_VERSIONS: Final = """
SELECT version, effective_from, published_at, published_by FROM rules_rulesets
ORDER BY effective_from, published_at
"""
BOOK_STAMP: Final = "SELECT count(*), max(published_at) FROM rules_rulesets"
PUBLISH_LOCK: Final = "SELECT pg_advisory_xact_lock(hashtextextended('rules_rulesets:publish', 0))"
INSERT_VERSION: Final = """
INSERT INTO rules_rulesets (version, effective_from, body, published_by)
VALUES ($1, $2, $3, $4)
ON CONFLICT (version) DO NOTHING
"""


class VersionExists(RuleSetError):
    pass


async def publish(conn: asyncpg.Connection, body: str, by: str) -> RuleSet:
    """Validate, then store a new version; the same version twice is refused, not replaced.

    Publishes are serialized (an advisory lock for the transaction), so two at once cannot
    both find a version or a starting moment free and both be told they were published.
    """
    ruleset = load_ruleset(body)
    problems = publish_problems(ruleset)
    if problems:
        raise RuleSetError("; ".join(problems))
    async with conn.transaction():
        await conn.execute(PUBLISH_LOCK)
        exists = await conn.fetchval(
            "SELECT body FROM rules_rulesets WHERE version = $1", ruleset.version
        )
        if exists is not None:
            if exists == body:
                return ruleset
            raise VersionExists(
                f"rule set version {ruleset.version!r} is already published with other"
                " content; publish changes under a new version"
            )
        # Two versions from one moment: which is in force would depend on row order.
        tied = await conn.fetchval(
            "SELECT version FROM rules_rulesets WHERE effective_from = $1",
            ruleset.effective_from,
        )
        if tied is not None:
            raise RuleSetError(
                f"version {tied!r} already takes effect at {ruleset.effective_from.isoformat()};"
                " give this one another effective_from"
            )
        await conn.execute(INSERT_VERSION, ruleset.version, ruleset.effective_from, body, by)
    return ruleset


async def load_book(
    conn: asyncpg.Connection, seed: Path = DEFAULT_RULESET, *, seed_if_empty: bool = True
) -> RuleBook:
    rows = await conn.fetch(SELECT_VERSIONS)
    if not rows:
        if not seed_if_empty:
            raise RuleSetError("no rule set is published yet (ledgerctl rules publish FILE)")
        await publish(conn, await asyncio.to_thread(seed.read_text, encoding="utf-8"), "seed")
        rows = await conn.fetch(SELECT_VERSIONS)
    return RuleBook(_stored(r["body"]) for r in rows)


async def read_book(conn: asyncpg.Connection, seed: Path = DEFAULT_RULESET) -> RuleBook:
    """The book without writing anything (read-only callers): the seed file when empty."""
    rows = await conn.fetch(SELECT_VERSIONS)
    if not rows:
        return RuleBook([load_ruleset(await asyncio.to_thread(seed.read_text, encoding="utf-8"))])
    return RuleBook(_stored(r["body"]) for r in rows)


def _stored(body: str) -> RuleSet:
    """A published body loads as it was accepted: one stored before keys given twice were
    refused must not stop the services (its last key counts, as it did then)."""
    return load_ruleset(body, allow_duplicate_keys=True)


async def list_versions(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(await conn.fetch(LIST_VERSIONS))


async def book_stamp(conn: asyncpg.Connection) -> tuple[int, object]:
    row = await conn.fetchrow(BOOK_STAMP)
    return (row[0], row[1])
