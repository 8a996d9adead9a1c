"""Delivers recorded notifications to the clinic's webhook, signed, retried with back-off.

The table is the source of truth: a notification is recorded once (in the consumer's
transaction) and delivered at least once; the receiver dedupes on the notification id
header. Without a webhook configured, notifications are recorded and marked `skipped`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from typing import Final

import asyncpg
import httpx
import orjson
import structlog
from prometheus_client import Counter

DELIVERY_BATCH: Final = 50  # concurrent webhook posts per round: polite to one receiver
MAX_BACKOFF_S: Final = 300

DELIVERED = Counter("loyalty_notifications_total", "Notifications by outcome", ["outcome"])
log = structlog.get_logger()


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Deliverer:
    def __init__(self, pool: asyncpg.Pool, url: str, secret: str) -> None:
        self._pool = pool
        self._url = url
        self._secret = secret
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=10.0) as client:
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
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT notification_id, member_id, kind, message, payload, attempts"
                " FROM notifications WHERE status = 'pending' AND next_attempt_at <= now()"
                " ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED",
                DELIVERY_BATCH,
            )
            if not rows:
                return 0
            if not self._url:
                await conn.execute(
                    "UPDATE notifications SET status = 'skipped' WHERE notification_id = ANY($1)",
                    [r["notification_id"] for r in rows],
                )
                DELIVERED.labels("skipped").inc(len(rows))
                return len(rows)
            results = await asyncio.gather(*(self._post(client, r) for r in rows))
            ok = [r["notification_id"] for r, err in zip(rows, results, strict=True) if err is None]
            failed = [(r, err) for r, err in zip(rows, results, strict=True) if err is not None]
            if ok:
                await conn.execute(
                    "UPDATE notifications SET status = 'delivered', delivered_at = now(),"
                    " attempts = attempts + 1 WHERE notification_id = ANY($1)",
                    ok,
                )
            for r, err in failed:
                backoff = min(MAX_BACKOFF_S, 2 ** min(r["attempts"], 8))
                await conn.execute(
                    "UPDATE notifications SET attempts = attempts + 1, last_error = $2,"
                    " next_attempt_at = now() + make_interval(secs => $3)"
                    " WHERE notification_id = $1",
                    r["notification_id"],
                    err,
                    float(backoff),
                )
            DELIVERED.labels("delivered").inc(len(ok))
            DELIVERED.labels("failed").inc(len(failed))
            return len(rows)

    async def _post(self, client: httpx.AsyncClient, row: asyncpg.Record) -> str | None:
        body = orjson.dumps(
            {
                "notification_id": row["notification_id"],
                "member_id": row["member_id"],
                "kind": row["kind"],
                "message": row["message"],
                "event": row["payload"],
            }
        )
        try:
            resp = await client.post(
                self._url,
                content=body,
                headers={
                    "Content-Type": "application/json; charset=utf-8",
                    "X-Loyalty-Notification-Id": row["notification_id"],
                    "X-Loyalty-Signature": sign(self._secret, body),
                },
            )
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if resp.status_code >= 300:
            return f"HTTP {resp.status_code}"
        return None
