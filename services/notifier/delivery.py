"""Delivers recorded notifications to the clinic's webhook, signed, retried with back-off.

The table is the source of truth: a notification is recorded once (in the consumer's
transaction) and delivered at least once; the receiver dedupes on the body's
`notification_id`, which the signature covers (the header of the same id is not signed).
Without a webhook configured, notifications are recorded and marked `skipped`. So is a
points_expiring warning whose points lapsed while it waited (`_lapsed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import asyncpg
import httpx
import orjson
import structlog
from prometheus_client import Counter

from schemas.ledger import PointsExpiring
from services.notifier.render import skip_reason
from services.notifier.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

DELIVERY_BATCH: Final = 50  # concurrent webhook posts per round: polite to one receiver
MAX_BACKOFF_S: Final = 300
# A post's whole time, connection to last byte: httpx's timeout bounds each read, so a
# receiver that trickled its answer a byte at a time held the post forever.
POST_TIMEOUT_S: Final = 10.0

DELIVERED = Counter("loyalty_notifications_total", "Notifications by outcome", ["outcome"])
log = structlog.get_logger()


@dataclass(frozen=True)
class Failure:
    error: str
    at: float  # time.monotonic() of the failed attempt: its back-off counts from here


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
        async with httpx.AsyncClient(timeout=POST_TIMEOUT_S) as client:
            while True:
                try:
                    done = await self.deliver_once(client)
                except Exception as exc:
                    # Policy: delivery never dies; pending rows wait in the table.
                    log.warning("delivery_retry", error=repr(exc))
                    done = 0
                if done < DELIVERY_BATCH:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), 1.0)

    async def deliver_once(self, client: httpx.AsyncClient) -> int:
        """One round: up to DELIVERY_BATCH due notifications, each member's in their order.

        Members are posted to concurrently, one member's notifications one after another,
        stopping at the first that fails: it waits out its back-off, and the member's later
        ones wait behind it (`_DUE`), so a member never reads an older balance after a newer
        one. They wait with their due time moved to the failed one's (`_FAILED`,
        `hold_behind_retries`), so a round that has nothing due reads nothing, however
        many members' backlogs wait. A warning whose points lapsed meanwhile is not posted
        but marked `skipped`, and the member's next ones go on. A member is taken by one
        notifier process at a time (an advisory lock for the round), so a second process
        cannot post their next one meanwhile.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            candidates = await conn.fetch(_CANDIDATES, DELIVERY_BATCH)
            if not candidates:
                return 0
            members = sorted({r["member_id"] for r in candidates})
            ours = [r["m"] for r in await conn.fetch(_TAKE_MEMBERS, members)]
            rows = await conn.fetch(_DUE, ours, DELIVERY_BATCH) if ours else []
            if not rows:
                return 0
            if not self._url:
                await conn.execute(
                    "UPDATE notifications SET status = 'skipped' WHERE notification_id = ANY($1)",
                    [r["notification_id"] for r in rows],
                )
                DELIVERED.labels("skipped").inc(len(rows))
                return len(rows)
            by_member: dict[str, list[asyncpg.Record]] = {}
            for r in rows:  # in seq order
                by_member.setdefault(r["member_id"], []).append(r)
            outcomes = await asyncio.gather(
                *(self._post_in_order(client, mine) for mine in by_member.values())
            )
            ok = [i for delivered, _, _ in outcomes for i in delivered]
            lapsed = [i for _, dropped, _ in outcomes for i in dropped]
            failed = [f for _, _, f in outcomes if f is not None]
            if lapsed:
                await conn.execute(
                    "UPDATE notifications SET status = 'skipped' WHERE notification_id = ANY($1)",
                    lapsed,
                )
            if ok:
                await conn.execute(
                    "UPDATE notifications SET status = 'delivered',"
                    " delivered_at = clock_timestamp(),"
                    " attempts = attempts + 1 WHERE notification_id = ANY($1)",
                    ok,
                )
            gave_up = 0
            for r, failure in failed:
                backoff = min(MAX_BACKOFF_S, 2 ** min(r["attempts"] + 1, 9))  # 2, 4, … 300
                wait = backoff - (time.monotonic() - failure.at)  # from the failed attempt
                status = await conn.fetchval(_FAILED, r["notification_id"], failure.error,
                                             wait, self._give_up_s)  # fmt: skip
                if status == "failed":
                    gave_up += 1
                    log.warning("notification_given_up", notification_id=r["notification_id"],
                                member_id=r["member_id"], attempts=r["attempts"] + 1,
                                error=failure.error)  # fmt: skip
            DELIVERED.labels("delivered").inc(len(ok))
            DELIVERED.labels("failed").inc(len(failed) - gave_up)
            DELIVERED.labels("given_up").inc(gave_up)
            DELIVERED.labels(_LAPSED).inc(len(lapsed))
            return len(ok) + len(lapsed) + len(failed)

    async def _post_in_order(
        self, client: httpx.AsyncClient, rows: list[asyncpg.Record]
    ) -> tuple[list[str], list[str], tuple[asyncpg.Record, Failure] | None]:
        """One member's notifications in order: (delivered ids, lapsed ids, the first
        failure)."""
        delivered: list[str] = []
        lapsed: list[str] = []
        for r in rows:
            if _lapsed(r):
                lapsed.append(r["notification_id"])
                continue
            failure = await self._post(client, r)
            if failure is not None:
                return delivered, lapsed, (r, failure)
            delivered.append(r["notification_id"])
        return delivered, lapsed, None

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


_LAPSED: Final = "expired_before_warning"


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
# Row `n` goes only while no earlier pending row of its member waits for a retry.
_NOTHING_EARLIER_WAITS: Final = """  AND NOT EXISTS (
      SELECT 1 FROM notifications AS e
      WHERE e.member_id = n.member_id AND e.status = 'pending' AND e.seq < n.seq
        AND e.next_attempt_at > now())
"""
# The members with due work this round (not locked yet): the first DELIVERY_BATCH of them
# among the oldest due rows, so that one member's backlog (made due at one time by
# `_FAILED`) cannot fill a round meant for many members at once. Only rows no earlier one
# of their member's waits behind, as `_DUE` delivers: `_FAILED` keeps such rows out of the
# due part of the index, but one recorded while its member's retry was failing (the two
# transactions apart) can still be there until that member's next attempt.
_CANDIDATE_ROWS: Final = 10 * DELIVERY_BATCH  # the most due rows a round reads to pick them
_CANDIDATES: Final = f"""
SELECT member_id FROM (
    SELECT n.member_id, n.next_attempt_at FROM notifications AS n
    WHERE n.status = 'pending' AND n.next_attempt_at <= now()
{_NOTHING_EARLIER_WAITS}    ORDER BY n.next_attempt_at, n.seq LIMIT {_CANDIDATE_ROWS}) AS due
GROUP BY member_id ORDER BY min(next_attempt_at) LIMIT $1
"""
# The members no other notifier process is delivering to (held to the transaction's end).
_TAKE_MEMBERS: Final = """
SELECT m FROM unnest($1::text[]) AS m
WHERE pg_try_advisory_xact_lock(hashtextextended('notifier:' || m, 0))
"""
# Their due notifications in order, each only while no earlier one of the member's waits
# for a retry (read again now that the members are ours).
_DUE: Final = f"""
SELECT n.notification_id, n.member_id, n.kind, n.message, n.payload::text AS payload,
       n.attempts
FROM notifications AS n
WHERE n.member_id = ANY($1::text[]) AND n.status = 'pending' AND n.next_attempt_at <= now()
{_NOTHING_EARLIER_WAITS}ORDER BY n.seq LIMIT $2 FOR UPDATE OF n
"""
