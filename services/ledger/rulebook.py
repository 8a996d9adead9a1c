"""The rule book as the ledger needs it: how long a grant's points live, how points redeem.

Rules are data (DOMAIN.md): a clinic's published rule set decides, besides earning, the
lot lifetime (`expiry.lot_lifetime_months`) and redemption (`redemption`: minimum
balance, cash rates per tier, catalogue). The ledger reads the same published versions
the rules service does (`rules_rulesets`), without writing: a grant's points live as
long as the version that priced it says (`ruleset_version` on the grant; a version the
book does not hold, e.g. a grant from another system, gets the default 12 months), and
a redemption or adjustment follows the version in force when it is made.

A new version is picked up by the next batch or call: each looks at the book's stamp
(one tiny query) and re-reads it only when it changed. Refreshes are serialised (one
process's API calls and consumer batches share the cache), and the stamp is stored only
once the book it stamps has been read: a refresh never returns the old book for a stamp
another refresh is still loading.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Final
from zoneinfo import ZoneInfo

import asyncpg
import structlog

from services.ledger.accounting import DEFAULT_LIFETIME_MONTHS
from services.ledger.redemption import DEFAULT_CATALOGUE, RedemptionPolicy, Reward
from services.rules.rulebook_store import DEFAULT_RULESET, book_stamp, read_book
from services.rules.ruleset import (
    RedemptionRules,
    RuleBook,
    RuleSet,
    RuleSetError,
    load_ruleset,
)

log = structlog.get_logger()
# How old a checked book `recent` may hand out without looking at the stamp again.
RECENT_S: Final = 5.0
# The calendar of a grant whose version the book does not hold: a rule set's default zone.
DEFAULT_ZONE: Final = ZoneInfo(RuleSet.model_fields["timezone"].default)
_NAMES = {r.code: (r.name, r.name_zh) for r in DEFAULT_CATALOGUE}


def policy_of(rules: RedemptionRules) -> RedemptionPolicy:
    """A rule set's redemption section as the ledger's policy (known rewards keep their
    display names; a clinic's own codes are named by their code)."""
    return RedemptionPolicy(
        min_balance=rules.min_balance,
        cash_rates=dict(rules.points_per_cny),
        catalogue=tuple(
            Reward(code, points, *_NAMES.get(code, (code, code)))
            for code, points in rules.catalogue.items()
        ),
    )


class LedgerRules:
    """The published rule book, cached until its stamp changes."""

    def __init__(self) -> None:
        self._stamp: tuple[int, object] | None = None
        self._book: RuleBook | None = None
        self._lifetimes: dict[str, int] = {}
        self._zones: dict[str, ZoneInfo] = {}
        self._policies: dict[str, RedemptionPolicy] = {}
        self._lock = asyncio.Lock()
        self._checked = float("-inf")  # monotonic time of the last stamp read

    async def refresh(self, conn: asyncpg.Connection) -> RuleBook:
        """The book, re-read if a version was published since. A book the ledger cannot use
        (a hand-edited row, a version published before `publish_problems` checked it) is
        logged and the last good one kept (the seed file's, if there is none yet): grants
        keep being journaled and redemptions keep answering under known numbers."""
        async with self._lock:
            stamp = await book_stamp(conn)
            self._checked = time.monotonic()
            if self._book is not None and stamp == self._stamp:
                return self._book
            try:
                self._use(await read_book(conn))
            except (RuleSetError, ValueError):
                log.exception("ledger_rulebook_unusable", kept=sorted(self._lifetimes) or "seed")
                if self._book is None:
                    self._use(RuleBook([load_ruleset(DEFAULT_RULESET)]))
            # Only now, with the book read (or found unusable: logged once, not re-read for
            # every batch). Any other failure leaves the stamp as it was: the next call retries.
            self._stamp = stamp
            assert self._book is not None
            return self._book

    async def recent(self, conn: asyncpg.Connection) -> RuleBook:
        """The book as checked within the last `RECENT_S` seconds, else `refresh`: for reads
        that only display from it (the member view's next tier), which would otherwise
        queue every request behind the refresh lock for a stamp query."""
        if self._book is not None and time.monotonic() - self._checked < RECENT_S:
            return self._book
        return await self.refresh(conn)

    def _use(self, book: RuleBook) -> None:
        policies = {r.version: policy_of(r.redemption) for r in book.versions}  # may raise
        self._lifetimes = {r.version: r.expiry.lot_lifetime_months for r in book.versions}
        self._zones = {r.version: r.zone for r in book.versions}
        self._policies, self._book = policies, book
        log.info("ledger_rulebook_loaded", versions=sorted(self._lifetimes))

    def lifetime_months(self, version: str) -> int:
        """Call after `refresh`. A version the book does not hold: the default."""
        return self._lifetimes.get(version, DEFAULT_LIFETIME_MONTHS)

    async def policy_at(self, conn: asyncpg.Connection, at: datetime) -> RedemptionPolicy:
        book = await self.refresh(conn)
        return self._policies[book.at(at).version]

    def zone(self, version: str) -> ZoneInfo:
        """The calendar a version counts a lot's months on. Call after `refresh`."""
        return self._zones.get(version, DEFAULT_ZONE)

    async def lifetime_at(self, conn: asyncpg.Connection, at: datetime) -> tuple[int, ZoneInfo]:
        """Lot lifetime in months, and the calendar they are counted on, in force at `at`."""
        version = (await self.refresh(conn)).at(at).version
        return self._lifetimes[version], self._zones[version]
