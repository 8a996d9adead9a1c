"""Tier expiries, and spend leaving the 12-month window, of members who have gone quiet.

A reached tier is kept 12 months, then re-decided on the rolling spend at that moment
(DOMAIN.md, Tiers). The evaluator applies a due expiry when the member's next event
arrives (`tiers.catch_up`), but a member who stops coming may never send one: the ledger
would show the lapsed tier, and redeem cash at its rate, for as long as they stay away.
This sweep, in the rules service every ``TIER_SWEEP_SECONDS`` (default 60), applies each
expiry at its own moment exactly as that next event would (`engine.expire_tier`), and
reports it like any tier change: the ledger updates the tier, the notifier tells the
member. The report's id comes from the member and the moment, so a sweep repeated after a
crash, or a second instance, reports it under the same id and the ledger keeps it once.

The spend the ledger shows for a member is the spend of their last tier report, which a
purchase, a refund or an expiry makes; an order leaving the 12-month window makes none.
So the sweep also reports the spend at the moment it changes by time alone
(`engine.report_spend`), the tier unchanged: the member view's qualifying spend and the
spend still needed for the next tier would otherwise stay as they were for as long as the
member stays away. Each state's column `tier_due_at` says when to look next: the tier's
end or that moment, whichever comes first (`engine.tier_due`), set with every tier report.

It decides by event time, so it waits for the events that could still change the answer:
it sweeps only the members of the partitions this instance consumes (recorded with each
state), only while its consumer is within a batch of their end (a replay or a backlog
may hold a purchase from before the expiry that qualifies again), and only expiries at
least ``TIER_SWEEP_GRACE_SECONDS`` old (default 3600) to let late deliveries land first.
Rows are taken ``FOR UPDATE SKIP LOCKED``: a member whose batch holds its lock is left to
that batch (its event applies the same expiry) or to the next sweep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Final

import asyncpg
import msgspec
import structlog
from prometheus_client import Counter

from services.common.outbox import OutboxRow, write_outbox
from services.rules.emit import grant_json
from services.rules.engine import sweep_due
from services.rules.ruleset import RuleBook
from services.rules.state import dump_state, load_state

SERVICE: Final = "rules"
PER_PAGE: Final = 500

# Members of this instance's partitions (and those whose partition is not known: rows
# from before migration 0015, members only a held release wrote).
DUE: Final = """
SELECT member_id, tier_due_at, state::text AS state FROM rules_member_state
WHERE tier_due_at <= $1
  AND (activity_partition = ANY($3::int[]) OR activity_partition IS NULL)
ORDER BY tier_due_at, member_id LIMIT $2
FOR UPDATE SKIP LOCKED
"""
UPDATE_STATES: Final = """
UPDATE rules_member_state AS s
SET state = u.st::json, tier_valid_until = u.tu, tier_due_at = u.d, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[]) AS u(m, st, tu, d)
WHERE s.member_id = u.m
"""

EXPIRED: Final = Counter("loyalty_tier_expiries_total", "Tier expiries applied by the sweep")
SPEND_REPORTS: Final = Counter(
    "loyalty_tier_spend_reports_total", "Spend changes by time alone reported by the sweep"
)
log = structlog.get_logger()


class TierSweeper:
    def __init__(
        self,
        pool: asyncpg.Pool,
        topic: str,
        book: Callable[[], RuleBook | None],
        caught_up: Callable[[], bool],
        partitions: Callable[[], list[int]],
        wake: Callable[[], None],
        *,
        interval_s: float,
        grace_s: float,
        per_page: int = PER_PAGE,
    ) -> None:
        self._pool = pool
        self._topic = topic
        self._book = book
        self._caught_up = caught_up
        self._partitions = partitions
        self._wake = wake
        self._interval = interval_s
        self._grace = timedelta(seconds=grace_s)
        self._per_page = per_page

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                if self._caught_up():
                    await self.sweep_once(datetime.now(UTC))
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("tier_sweep_retry", error=str(exc))
            except Exception:  # a bug must not end the sweeps for the process's lifetime
                log.exception("tier_sweep_failed")

    async def sweep_once(self, now: datetime) -> int:
        """Report every tier expiry and spend change due by `now` less the grace; returns
        how many reports.

        Page by page, each its own short transaction. Each report moves the member's due
        moment past it (`tier_due`), so no member comes back in one sweep unless more than
        one is due (several orders leaving the window, or away for years).
        """
        book = self._book()
        if book is None:
            return 0
        cutoff, partitions = now - self._grace, self._partitions()
        expiries = spends = 0  # committed
        while True:
            page_expiries = page_spends = 0
            async with self._pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(DUE, cutoff, self._per_page, partitions)
                members: list[str] = []
                states: list[str] = []
                untils: list[datetime | None] = []
                dues: list[datetime | None] = []
                outbox: list[OutboxRow] = []
                for row in rows:
                    members.append(row["member_id"])
                    try:
                        state = load_state(row["state"])
                    except (msgspec.ValidationError, msgspec.DecodeError):
                        # Left for the consumer to meet (it fails the same way there, loudly);
                        # its column is cleared so this sweep does not pick it up forever.
                        log.error("tier_sweep_unreadable_state", member_id=row["member_id"])
                        states.append(row["state"])
                        untils.append(None)
                        dues.append(None)
                        continue
                    new, report, due = sweep_due(state, row["tier_due_at"], book.at)
                    if new is state:  # the spend changed by time alone
                        states.append(row["state"])
                        page_spends += 1
                    else:  # the tier expired
                        states.append(dump_state(new).decode())
                        page_expiries += 1
                    untils.append(new.tier_valid_until)
                    dues.append(due)
                    outbox.append(OutboxRow(self._topic, report.member_id, grant_json(report)))
                if members:
                    await conn.execute(UPDATE_STATES, members, states, untils, dues)
                    await write_outbox(conn, SERVICE, outbox)
            if not rows:
                break
            expiries, spends = expiries + page_expiries, spends + page_spends
            EXPIRED.inc(page_expiries)
            SPEND_REPORTS.inc(page_spends)
            self._wake()
            if len(rows) < self._per_page:
                break
        if expiries or spends:
            log.info("tier_sweep", expiries=expiries, spend_reports=spends)
        return expiries + spends
