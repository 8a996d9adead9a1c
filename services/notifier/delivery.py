"""Delivers recorded notifications to the clinic's webhook, signed, retried with back-off.

The table is the source of truth: a notification is recorded once (in the consumer's
transaction) and delivered at least once; the receiver dedupes on the body's
`notification_id`, which the signature covers (the header of the same id is not signed).
Without a webhook configured, notifications are recorded and marked `skipped`. So is a
points_expiring warning whose points lapsed while it waited (`_lapsed`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

import asyncpg
import httpx
import orjson
import structlog
from prometheus_client import Counter

from schemas.ledger import PointsExpiring
from services.notifier.render import EXPIRED_BEFORE_WARNING, SKIP_REASONS, skip_reason
from services.notifier.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

DELIVERY_BATCH: Final = 50  # members posted to at once: polite to one receiver
PER_MEMBER: Final = 10  # a member's notifications taken at a time: a backlog takes one turn
MAX_BACKOFF_S: Final = 300
# A post's whole time, connection to last byte: httpx's timeout bounds each read, so a
# receiver that trickled its answer a byte at a time held the post forever.
POST_TIMEOUT_S: Final = 10.0
# How long a member taken is this process's alone: what a crashed process's members wait
# before another takes them. A post starts only while it can end, and its outcome be
# written (RECORD_S), within it; the member's rest are let go for a later turn.
LEASE_S: Final = 60.0
RECORD_S: Final = 10.0
POLL_S: Final = 1.0  # an idle deliverer looks this often for retries come due

DELIVERED = Counter("loyalty_notifications_total", "Notifications by outcome", ["outcome"])
# Each outcome exported from the start, at zero, as the consumers' series (`BatchConsumer`).
OUTCOMES: Final = ("delivered", "failed", "given_up", "skipped", *SKIP_REASONS, "unknown_type")
for _outcome in OUTCOMES:
    DELIVERED.labels(_outcome)
log = structlog.get_logger()


@dataclass(frozen=True)
class Failure:
    error: str
    at: float  # time.monotonic() of the failed attempt: its back-off counts from here


@dataclass
class _Outcome:
    """What became of a member's notifications so far (kept when stopped midway)."""

    delivered: list[str] = field(default_factory=list)
    lapsed: list[str] = field(default_factory=list)
    failed: tuple[asyncpg.Record, Failure] | None = None


class Deliverer:
    def __init__(
        self, pool: asyncpg.Pool, url: str, secret: str, give_up_s: float = 24 * 3600
    ) -> None:
        self._pool = pool
        self._give_up_s = give_up_s
        self._url = url
        self._secret = secret
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Keeps up to DELIVERY_BATCH members in flight, taking the next due member as soon
        as one is done, so a slow receiver's member holds only its own turn."""
        in_flight: set[asyncio.Task[int]] = set()
        async with httpx.AsyncClient(timeout=POST_TIMEOUT_S) as client:
            try:
                while True:
                    self._wake.clear()  # before looking: a wake meanwhile is kept
                    room = DELIVERY_BATCH - len(in_flight)
                    if room and self._url:
                        post_until, taken = await self._take_or_log(room)
                        in_flight |= {
                            asyncio.create_task(self._deliver(client, rows, post_until))
                            for rows in taken
                        }
                    elif room and await self._skip_or_log(room):
                        continue  # no webhook: the next ones at once
                    woken = asyncio.create_task(self._wake.wait())
                    try:
                        done, _ = await asyncio.wait(
                            {*in_flight, woken}, timeout=POLL_S, return_when=asyncio.FIRST_COMPLETED
                        )
                    finally:
                        woken.cancel()
                    in_flight.difference_update(done)
            finally:
                # Stopping: each member's task records what it delivered and lets the rest
                # go at once (`_deliver`), rather than leaving them to the lease's end.
                for task in in_flight:
                    task.cancel()
                await asyncio.gather(*in_flight, return_exceptions=True)

    async def _take_or_log(self, members: int) -> tuple[float, list[list[asyncpg.Record]]]:
        try:
            return await self._take(members)
        except Exception as exc:
            # Policy: delivery never dies; pending rows wait in the table.
            log.warning("delivery_retry", error=repr(exc))
            return 0.0, []

    async def _skip_or_log(self, members: int) -> int:
        try:
            return await self._skip((await self._take(members))[1])
        except Exception as exc:
            log.warning("delivery_retry", error=repr(exc))
            return 0

    async def deliver_once(self, client: httpx.AsyncClient) -> int:
        """One round: up to DELIVERY_BATCH members' due notifications, each member's in
        their order; how many were delivered, dropped or failed.

        Members are posted to concurrently, one member's notifications one after another
        (PER_MEMBER at most), stopping at the first that fails: it waits out its
        back-off, and the member's later ones wait behind it (`_LEASE`), so a member never
        reads an older balance after a newer one. They wait with their due time moved to
        the failed one's (`_FAILED`, `hold_behind_retries`), so a round that has nothing
        due reads nothing, however many members' backlogs wait. A warning whose points
        lapsed meanwhile is not posted but marked `skipped`, and the member's next ones go
        on. No transaction is open during a post (`_take`), and each member's outcome is
        written as soon as that member is done.
        """
        post_until, taken = await self._take(DELIVERY_BATCH)
        if not self._url:
            return await self._skip(taken)
        delivering = (self._deliver(client, rows, post_until) for rows in taken)
        return sum(await asyncio.gather(*delivering))

    async def _take(self, members: int) -> tuple[float, list[list[asyncpg.Record]]]:
        """Up to `members` members' due notifications, each member's in order, leased to
        this process (`_LEASE`) in a transaction of its own, and until when (monotonic)
        a post may start on the lease: counted from before the lease began, so it is
        never later than the lease allows.

        A member is taken by one notifier process at a time: an advisory lock while it is
        taken, and its lease until the outcome is written, so a second process cannot
        post their next one meanwhile."""
        post_until = time.monotonic() + LEASE_S - POST_TIMEOUT_S - RECORD_S
        async with self._pool.acquire() as conn, conn.transaction():
            candidates = await conn.fetch(_CANDIDATES, members)
            if not candidates:
                return post_until, []
            ours = [
                r["m"]
                for r in await conn.fetch(_TAKE_MEMBERS, [r["member_id"] for r in candidates])
            ]
            rows = await conn.fetch(_LEASE, ours, LEASE_S) if ours else []
        by_member: dict[str, list[asyncpg.Record]] = {}
        for r in sorted(rows, key=lambda r: r["seq"]):
            by_member.setdefault(r["member_id"], []).append(r)
        return post_until, list(by_member.values())

    async def _skip(self, taken: list[list[asyncpg.Record]]) -> int:
        ids = [r["notification_id"] for rows in taken for r in rows]
        if ids:
            await self._pool.execute(_SKIPPED, ids)
            DELIVERED.labels("skipped").inc(len(ids))
        return len(ids)

    async def _deliver(
        self, client: httpx.AsyncClient, rows: list[asyncpg.Record], post_until: float
    ) -> int:
        """Posts one member's taken notifications in order and records what became of them
        in a transaction of its own; how many were delivered, dropped or failed."""
        outcome = _Outcome()
        try:
            await self._post_in_order(client, rows, outcome, post_until)
        finally:
            # Also when stopped midway: what was delivered is recorded, the rest let go now
            # rather than at the lease's end (a post cut off goes again: at least once).
            try:
                async with asyncio.timeout(RECORD_S):
                    await self._record(rows, outcome)
            except Exception as exc:  # they go again once the lease runs out
                log.warning("delivery_record_failed", member_id=rows[0]["member_id"],
                            error=repr(exc))  # fmt: skip
        return len(outcome.delivered) + len(outcome.lapsed) + (outcome.failed is not None)

    async def _post_in_order(
        self,
        client: httpx.AsyncClient,
        rows: list[asyncpg.Record],
        outcome: _Outcome,
        post_until: float,
    ) -> None:
        """One member's notifications in order, until the first failure or the lease's
        end (`post_until`, monotonic)."""
        for r in rows:
            if _lapsed(r):
                outcome.lapsed.append(r["notification_id"])
                continue
            if time.monotonic() > post_until:
                return
            failure = await self._post(client, r)
            if failure is not None:
                outcome.failed = (r, failure)
                return
            outcome.delivered.append(r["notification_id"])

    async def _record(self, rows: list[asyncpg.Record], outcome: _Outcome) -> None:
        gave_up = False
        async with self._pool.acquire() as conn, conn.transaction():
            if outcome.lapsed:
                await conn.execute(_SKIPPED, outcome.lapsed)
            if outcome.delivered:
                await conn.execute(_DELIVERED, outcome.delivered)
            if outcome.failed is not None:
                r, failure = outcome.failed
                backoff = min(MAX_BACKOFF_S, 2 ** min(r["attempts"] + 1, 9))  # 2, 4, … 300
                wait = backoff - (time.monotonic() - failure.at)  # from the failed attempt
                status = await conn.fetchval(_FAILED, r["notification_id"], failure.error,
                                             wait, self._give_up_s)  # fmt: skip
                gave_up = status == "failed"
            await conn.execute(_RELEASE, [r["notification_id"] for r in rows])
        DELIVERED.labels("delivered").inc(len(outcome.delivered))
        DELIVERED.labels(_LAPSED).inc(len(outcome.lapsed))
        if outcome.failed is not None:
            r, failure = outcome.failed
            DELIVERED.labels("given_up" if gave_up else "failed").inc()
            if gave_up:
                log.warning("notification_given_up", notification_id=r["notification_id"],
                            member_id=r["member_id"], attempts=r["attempts"] + 1,
                            error=failure.error)  # fmt: skip

    async def _post(self, client: httpx.AsyncClient, row: asyncpg.Record) -> Failure | None:
        """None when delivered, else why not. Any failure is this row's own: it must not
        stop the round (and with it every other member's deliveries)."""
        try:
            body = orjson.dumps(
                {
                    "notification_id": row["notification_id"],
                    "member_id": row["member_id"],
                    "kind": row["kind"],
                    "message": row["message"],
                    # The stored event's text as it is, never decoded: fields a newer
                    # ledger added pass through whatever they hold.
                    "event": orjson.Fragment(row["payload"]),
                }
            )
            now = int(time.time())
            async with asyncio.timeout(POST_TIMEOUT_S):
                resp = await client.post(
                    self._url,
                    content=body,
                    headers={
                        "Content-Type": "application/json; charset=utf-8",
                        "X-Loyalty-Notification-Id": row["notification_id"],
                        TIMESTAMP_HEADER: str(now),
                        SIGNATURE_HEADER: sign(self._secret, now, body),
                    },
                )
        except TimeoutError:
            return Failure(f"timeout: no whole answer in {POST_TIMEOUT_S:g} s", time.monotonic())
        except Exception as exc:
            return Failure(f"{type(exc).__name__}: {exc}", time.monotonic())
        if resp.status_code >= 300:
            return Failure(f"HTTP {resp.status_code}", time.monotonic())
        return None


_LAPSED: Final = EXPIRED_BEFORE_WARNING


def _lapsed(row: asyncpg.Record) -> bool:
    """A warning whose points lapsed since it was recorded (retried for up to a day, or
    held behind its member's retry): posted now it would urge the member to use points
    already gone. Read at each attempt, with the rule the notifier records by."""
    if row["kind"] != "points_expiring":
        return False
    try:
        event = PointsExpiring.model_validate_json(row["payload"])
    except ValueError:  # it passed the model when recorded; if not now, sent as before
        return False
    if skip_reason(event, datetime.now(UTC)) is None:
        return False
    log.info("notification_skipped", notification_id=row["notification_id"],
             member_id=row["member_id"], reason=_LAPSED)  # fmt: skip
    return True


async def hold_behind_retries(
    conn: asyncpg.Connection, members: list[str], notification_ids: list[str]
) -> None:
    """Just-recorded notifications wait with their member's retry (in the recording
    transaction), out of the due part of the index, rather than at the front of it."""
    await conn.execute(_HOLD_NEW, members, notification_ids)


# A failed attempt: retried after the back-off, or given up on once the notification is
# older than the give-up age (then the member's later ones go on).
# The retry is due `$3` seconds from now: what is left of the back-off since the failed
# attempt (`Failure.at`), so neither a slow receiver nor a wait to write it shortens or
# lengthens it; counted on this process's clock, so it need not agree with Postgres's.
# While it is retried, the member's later pending ones are made due no earlier than it
# (`held`): left at their own due times, they stayed at the front of the due index, and
# every round of a webhook outage read (and the guard below discarded) each member's whole
# backlog: with 20,000 members x 10, 180,000 rows and 0.44 s a round that found nothing
# (EXPLAIN ANALYZE), against 0.02 ms and no rows this way. They keep their order (`seq`),
# their attempts and their age, so nothing else about their retries or give-up changes.
_FAILED: Final = """
WITH failed AS (
    UPDATE notifications SET attempts = attempts + 1, last_error = $2,
        next_attempt_at = clock_timestamp() + make_interval(secs => $3),
        status = CASE WHEN created_at < clock_timestamp() - make_interval(secs => $4)
                      THEN 'failed' ELSE status END
    WHERE notification_id = $1
    RETURNING member_id, seq, next_attempt_at, status
), held AS (
    UPDATE notifications AS n SET next_attempt_at = f.next_attempt_at
    FROM failed AS f
    WHERE f.status = 'pending' AND n.member_id = f.member_id AND n.status = 'pending'
      AND n.seq > f.seq AND n.next_attempt_at < f.next_attempt_at
)
SELECT status FROM failed
"""
# Newly recorded notifications of members whose first pending one waits for a retry are
# made due with it, as `_FAILED` does for the ones recorded before (one index probe a
# member of the batch).
_HOLD_NEW: Final = """
UPDATE notifications AS n SET next_attempt_at = h.next_attempt_at
FROM unnest($1::text[]) AS m(member_id)
CROSS JOIN LATERAL (
    SELECT e.next_attempt_at FROM notifications AS e
    WHERE e.member_id = m.member_id AND e.status = 'pending'
    ORDER BY e.seq LIMIT 1) AS h
WHERE h.next_attempt_at > now() AND n.member_id = m.member_id
  AND n.notification_id = ANY($2::text[]) AND n.next_attempt_at < h.next_attempt_at
"""
# Row `n` goes only while no earlier pending row of its member waits for a retry or is
# leased (in flight).
# Row `n` goes only while its member's first pending row, if earlier, neither waits for a
# retry nor is leased (in flight). Retries and leases only ever sit on a member's first
# pending row (a turn is leased from it; `_FAILED` holds the rows behind a failed one), so
# that row alone says. Asked of every earlier pending row instead, a take walked a
# member's whole backlog for each of its rows: quadratic, 20 s for a backlog of 10,000.
_NOTHING_EARLIER_WAITS: Final = """  AND NOT EXISTS (
      SELECT 1 FROM (
          SELECT e.seq, e.next_attempt_at, e.leased_until FROM notifications AS e
          WHERE e.member_id = n.member_id AND e.status = 'pending'
          ORDER BY e.seq LIMIT 1) AS f
      WHERE f.seq < n.seq AND (f.next_attempt_at > now() OR f.leased_until > now()))
"""
# The members with due work (not taken yet): the first DELIVERY_BATCH of them among the
# oldest due rows, by (next_attempt_at, seq), so that one member's backlog (made due at one
# time by `_FAILED`) cannot fill a round meant for many members at once. Only rows no
# earlier one of their member's waits behind, as `_LEASE` takes: `_FAILED` keeps such rows
# out of the due part of the index, but one recorded while its member's retry was failing
# (the two transactions apart) can still be there until that member's next attempt. Rows
# leased to a round in flight, here or in another process, are not due.
_CANDIDATE_ROWS: Final = 10 * DELIVERY_BATCH  # the most due rows a round reads to pick them
_FREE: Final = "  AND (n.leased_until IS NULL OR n.leased_until <= now())\n"
_CANDIDATES: Final = f"""
SELECT member_id FROM (
    SELECT n.member_id, n.next_attempt_at, n.seq FROM notifications AS n
    WHERE n.status = 'pending' AND n.next_attempt_at <= now()
{_FREE}{_NOTHING_EARLIER_WAITS}    ORDER BY n.next_attempt_at, n.seq LIMIT {_CANDIDATE_ROWS}) AS due
GROUP BY member_id ORDER BY min(next_attempt_at), min(seq) LIMIT $1
"""
# The members no other notifier process is taking (held to the end of the taking
# transaction: from then on their lease keeps them).
_TAKE_MEMBERS: Final = """
SELECT m FROM unnest($1::text[]) AS m
WHERE pg_try_advisory_xact_lock(hashtextextended('notifier:' || m, 0))
"""
# Their first PER_MEMBER pending notifications each, as far as they run due and free (a
# row that waits or is leased stops its member's turn there), read again now that the
# members are ours, leased for $2 seconds. Each member's rows come from its own index range,
# so a take costs PER_MEMBER rows a member, whatever the member's backlog.
_LEASE: Final = f"""
WITH due AS (
    SELECT f.notification_id
    FROM unnest($1::text[]) AS m(member_id)
    CROSS JOIN LATERAL (
        SELECT p.notification_id,
               bool_and(p.next_attempt_at <= now()
                        AND (p.leased_until IS NULL OR p.leased_until <= now()))
                   OVER (ORDER BY p.seq) AS go
        FROM (SELECT n.notification_id, n.seq, n.next_attempt_at, n.leased_until
              FROM notifications AS n
              WHERE n.member_id = m.member_id AND n.status = 'pending'
              ORDER BY n.seq LIMIT {PER_MEMBER}) AS p) AS f
    WHERE f.go
)
UPDATE notifications AS n SET leased_until = now() + make_interval(secs => $2)
FROM due WHERE n.notification_id = due.notification_id
RETURNING n.notification_id, n.member_id, n.kind, n.message, n.payload::text AS payload,
          n.attempts, n.seq
"""
_DELIVERED: Final = """
UPDATE notifications SET status = 'delivered', delivered_at = clock_timestamp(),
    attempts = attempts + 1
WHERE notification_id = ANY($1)
"""
_SKIPPED: Final = "UPDATE notifications SET status = 'skipped' WHERE notification_id = ANY($1)"
_RELEASE: Final = "UPDATE notifications SET leased_until = NULL WHERE notification_id = ANY($1)"
