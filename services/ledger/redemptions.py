"""Redemptions and manual adjustments: the two writes the HTTP API makes to the journal.

Both follow one recipe, in one transaction: look the request id up (idempotency), lock the
member row (``FOR UPDATE``; the grants consumer and the sweeper lock members too, sorted,
so every writer of a member is serialised and nothing can overspend), fold the command
through the pure core (`accounting.decide`), journal the entries, keep the request and
its answer under the caller's id, and put the ledger event in the outbox.

Idempotency: the stored request is the *normalised* body (``cash`` "10" and "10.00" are
the same request). The same id with the same body gets the first answer again, with the
first status; the same id with another body is a 409, which shows the first request only
when it was for the same member (ids are global: another member's is a bare "already
used", and an unknown member is a 404 whatever the id). A redemption refused for the
member's balance or the catalogue (409, 422) is kept as its first answer too (CONTRACT.md:
"the same redemption_id again returns the first answer"), so a retry is refused again
rather than redeemed later. A request refused before the member is locked (a malformed
cash amount, an unknown member) is not kept. An adjustment's refusal is not kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Any, Final

import asyncpg

from schemas.grants import TIERS, Tier
from services.common.outbox import write_outbox
from services.ledger import accounting as acc
from services.ledger.journal import (
    ENSURE_MEMBERS,
    ledger_event,
    load_books,
    outbox_rows,
    write_journal,
)
from services.ledger.redemption import DEFAULT_POLICY, RedemptionPolicy, UnknownReward

SERVICE: Final = "ledger"

LOCK_MEMBER: Final = "SELECT tier FROM ledger_members WHERE member_id = $1 FOR UPDATE"
PRIOR_REDEMPTION: Final = """
SELECT member_id, request, response, status FROM ledger_redemptions WHERE redemption_id = $1
"""
INSERT_REDEMPTION: Final = """
INSERT INTO ledger_redemptions (redemption_id, member_id, request, response, status)
VALUES ($1, $2, $3, $4, $5)
"""
PRIOR_ADJUSTMENT: Final = """
SELECT member_id, request, response, 201 AS status FROM ledger_adjustments
WHERE adjustment_id = $1
"""
INSERT_ADJUSTMENT: Final = """
INSERT INTO ledger_adjustments (adjustment_id, member_id, request, response)
VALUES ($1, $2, $3, $4)
"""
_CENT: Final = Decimal("0.01")


MAX_CASH_DIGITS: Final = 12  # CNY digits before the point, as numeric(14,2)


class Refused(Exception):
    """A request the ledger answers with a problem: ``status`` is the HTTP status."""

    def __init__(self, status: int, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.extra = status, title, detail, extra


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer: 201 and the body, or a refusal kept as the first answer to its id
    (status 409/422, `body` the problem's title, detail and extra members)."""

    status: int
    body: dict[str, Any]
    fresh: bool  # False when this is the stored answer to an earlier identical request


def refusal(exc: Refused) -> dict[str, Any]:
    """What is kept of a refusal to answer it again: the problem without its envelope."""
    return {"title": exc.title, "detail": exc.detail, **exc.extra}


def _bad_cash(detail: str) -> Refused:
    return Refused(
        422, "Invalid cash amount", detail, errors=[{"field": "body.cash", "message": detail}]
    )


def normalise_cash(raw: str) -> Decimal:
    """A CNY amount as the decimal string of the contract, to the fen; at most
    `MAX_CASH_DIGITS` digits before the point (a longer one cannot even be quantized in
    the default decimal context, and no balance could pay it)."""
    try:
        value = Decimal(raw)
    except InvalidOperation as exc:
        raise _bad_cash(f"{raw!r} is not a decimal CNY amount") from exc
    if not value.is_finite() or value <= 0:
        raise _bad_cash("cash must be positive CNY with at most 2 dp")
    if value.adjusted() >= MAX_CASH_DIGITS:
        raise _bad_cash(f"cash must be under 10^{MAX_CASH_DIGITS} CNY")
    if value != value.quantize(_CENT):
        raise _bad_cash("cash must be positive CNY with at most 2 dp")
    return value.quantize(_CENT)


def tier_of(raw: str) -> Tier:
    """The member row's tier as the policy's type; an unknown value counts as member."""
    for tier in TIERS:
        if tier == raw:
            return tier
    return "member"


def _replay(
    prior: asyncpg.Record, member_id: str, request: dict[str, Any], what: str, key: str
) -> Outcome:
    """The stored answer to a repeated request. Ids are global across members: an id kept
    for another member is a bare 409, not that member's request (a redeemer key could
    otherwise collect other members' redemptions by trying ids)."""
    if prior["member_id"] != member_id:
        raise Refused(409, f"{what} id already used", f"this {key} is already used; send a new one")
    if prior["request"] != request:
        raise Refused(
            409,
            f"{what} id already used",
            f"this {key} was already used for this member with a different request",
            first_request=prior["request"],
        )
    return Outcome(prior["status"], prior["response"], fresh=False)


async def _claim(
    conn: asyncpg.Connection,
    prior_sql: str,
    request_id: str,
    request: dict[str, Any],
    what: str,
    key: str,
    member_id: str,
) -> tuple[Outcome | None, str]:
    """Idempotency and the member lock: (the stored answer, or None to go on; the tier).

    A repeat for the same member is answered before the lock; anything else waits for the
    member, so an unknown member is a 404 whether or not its id is in use."""
    prior = await conn.fetchrow(prior_sql, request_id)
    if prior is not None and prior["member_id"] == member_id:
        return _replay(prior, member_id, request, what, key), ""
    member = await conn.fetchrow(LOCK_MEMBER, member_id)
    if member is None:
        detail = f"no ledger record for member {member_id!r}"
        if what == "Adjustment":
            detail += ' (nothing earned yet); to grant to a new member, send "new_member": true'
        raise Refused(404, "Member not found", detail)
    # Re-read under the lock: a twin request may have committed while we waited.
    prior = await conn.fetchrow(prior_sql, request_id)
    if prior is not None:
        return _replay(prior, member_id, request, what, key), ""
    return None, member["tier"]


async def _journal(
    conn: asyncpg.Connection, topic: str, before: dict[str, acc.Book], entries: list[acc.Entry]
) -> acc.Book:
    """Apply the decided entries: journal, lots, totals and the ledger events' outbox rows."""
    (member_id,) = before
    book = before[member_id]
    for entry in entries:
        book = acc.evolve(book, entry)
    await write_journal(conn, entries, before, {member_id: book})
    await write_outbox(conn, SERVICE, outbox_rows(topic, map(ledger_event, entries)))
    return book


async def redeem(
    conn: asyncpg.Connection,
    topic: str,
    member_id: str,
    redemption_id: str,
    *,
    points: int | None,
    reward: str | None,
    cash: str | None,
    store_id: str | None,
    now: datetime,
    policy: RedemptionPolicy = DEFAULT_POLICY,
) -> Outcome:
    """Spend points all-or-nothing, FIFO by expiry; see the module docstring."""
    cash_value = normalise_cash(cash) if cash is not None else None
    request = {
        "member_id": member_id,
        "points": points,
        "reward": reward,
        "cash": format(cash_value, "f") if cash_value is not None else None,
        "store_id": store_id,
    }
    try:
        async with conn.transaction():
            replayed, raw_tier = await _claim(
                conn,
                PRIOR_REDEMPTION,
                redemption_id,
                request,
                "Redemption",
                "redemption_id",
                member_id,
            )
            if replayed is not None:
                return replayed
            try:
                tier = tier_of(raw_tier)
                if reward is not None:
                    try:
                        points = policy.reward(reward).points
                    except UnknownReward:
                        raise Refused(
                            422,
                            "Unknown reward",
                            f"{reward!r} is not in the catalogue",
                            catalogue=sorted(policy.rewards),
                        ) from None
                elif cash_value is not None:
                    points = policy.points_for_cash(tier, cash_value)
                assert points is not None
                if cash_value is None:
                    cash_value = policy.cash_value(tier, points)
                before = await load_books(conn, [member_id])
                command = acc.Redeem(
                    entry_id=acc.derived_entry_id("redeem", redemption_id),
                    points=points,
                    at=now,
                    redemption_id=redemption_id,
                    min_balance=policy.min_balance,
                    store_id=store_id,
                )
                try:
                    entries = acc.decide(before[member_id], command)
                except acc.BelowMinimum as exc:
                    raise Refused(
                        422,
                        "Below the redemption minimum",
                        str(exc),
                        available=exc.available,
                        minimum=exc.minimum,
                    ) from None
                except acc.InsufficientPoints as exc:
                    raise Refused(
                        409,
                        "Insufficient points",
                        str(exc),
                        available=exc.available,
                        requested=exc.requested,
                    ) from None
            except Refused as refused:
                # Refused for this member's balance or the catalogue: the first answer to
                # this id, kept and given again (CONTRACT.md), not redeemed on a retry.
                kept = refusal(refused)
                await conn.execute(
                    INSERT_REDEMPTION, redemption_id, member_id, request, kept, refused.status
                )
                return Outcome(refused.status, kept, fresh=True)
            await _journal(conn, topic, before, entries)
            body = {
                "redemption_id": redemption_id,
                "member_id": member_id,
                "points": points,
                "reward": reward,
                "cash_value": format(cash_value, "f"),
                "available_after": entries[-1].balance_after,
                "store_id": store_id,
                "entry_id": entries[-1].entry_id,
                "redeemed_at": now.isoformat(),
            }
            await conn.execute(INSERT_REDEMPTION, redemption_id, member_id, request, body, 201)
            return Outcome(201, body, fresh=True)
    except asyncpg.UniqueViolationError:
        # The same id was committed concurrently (for another member: the entry id or the
        # redemption row collided). Answer from what was stored.
        prior = await conn.fetchrow(PRIOR_REDEMPTION, redemption_id)
        if prior is None:
            raise
        return _replay(prior, member_id, request, "Redemption", "redemption_id")


async def adjust(
    conn: asyncpg.Connection,
    topic: str,
    adjustment_id: str,
    *,
    member_id: str,
    points: int,
    reason: str,
    operator: str,
    allow_debt: bool,
    now: datetime,
    new_member: bool = False,
    lifetime_months: int = acc.DEFAULT_LIFETIME_MONTHS,
    zone: tzinfo | None = None,
) -> Outcome:
    """A manual grant or deduction by ops: journaled with its reason and operator.

    A grant's points live `lifetime_months` on `zone`'s calendar (the rule set in force
    now: `LedgerRules`). `new_member`: create the member's record if the ledger has none
    (rolled back with the rest if the adjustment is refused)."""
    request: dict[str, Any] = {
        "member_id": member_id,
        "points": points,
        "reason": reason,
        "operator": operator,
        "allow_debt": allow_debt,
    }
    if new_member:  # absent otherwise, so requests stored before the flag replay equal
        request["new_member"] = True
    try:
        async with conn.transaction():
            if new_member:
                await conn.execute(ENSURE_MEMBERS, [member_id])
            replayed, _tier = await _claim(
                conn,
                PRIOR_ADJUSTMENT,
                adjustment_id,
                request,
                "Adjustment",
                "adjustment_id",
                member_id,
            )
            if replayed is not None:
                return replayed
            before = await load_books(conn, [member_id])
            try:
                command = acc.Adjust(
                    entry_id=acc.derived_entry_id("adjust", adjustment_id),
                    points=points,
                    at=now,
                    reason=reason,
                    operator=operator,
                    adjustment_id=adjustment_id,
                    allow_debt=allow_debt,
                    lifetime_months=lifetime_months,
                    zone=zone,
                )
            except ValueError as exc:
                raise Refused(422, "Invalid adjustment", str(exc)) from None
            try:
                entries = acc.decide(before[member_id], command)
            except acc.InsufficientPoints as exc:
                raise Refused(
                    409,
                    "Insufficient points",
                    f"{exc}; send allow_debt=true to record the shortfall as debt",
                    available=exc.available,
                    requested=exc.requested,
                ) from None
            book = await _journal(conn, topic, before, entries)
            entry = entries[-1]
            body = {
                "adjustment_id": adjustment_id,
                "member_id": member_id,
                "points": points,
                "reason": reason,
                "operator": operator,
                "entry_id": entry.entry_id,
                "available_after": entry.balance_after,
                "debt": book.debt,
                "expires_at": entry.expires_at.isoformat() if entry.expires_at else None,
                "adjusted_at": now.isoformat(),
            }
            await conn.execute(INSERT_ADJUSTMENT, adjustment_id, member_id, request, body)
            return Outcome(201, body, fresh=True)
    except asyncpg.UniqueViolationError:
        prior = await conn.fetchrow(PRIOR_ADJUSTMENT, adjustment_id)
        if prior is None:
            raise
        return _replay(prior, member_id, request, "Adjustment", "adjustment_id")
