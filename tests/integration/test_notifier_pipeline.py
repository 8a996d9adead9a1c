"""The ledger's events, as its real consumer publishes them, fed to the notifier's real
handler and delivered to a local webhook: what members are told about grants that arrive
late or come from a refund."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import orjson
import pytest
import yaml
from starlette.requests import Request
from starlette.responses import Response

from services.common.config import Settings
from services.ledger import projector
from services.ledger.rulebook import LedgerRules
from services.ledger.sweeper import ExpirySweeper, warning_id
from services.notifier.app import make_handler as notifier_handler
from services.notifier.delivery import DELIVERED, Deliverer
from services.rules.rulebook_store import DEFAULT_RULESET, publish
from tests.integration import direct
from tests.integration.direct import consumer_of, migrated_pool, webhook
from tests.integration.ledger_helpers import grant

pytestmark = pytest.mark.integration
LEDGER_TOPIC = "loyalty.ledger.v1"


class Env:
    def __init__(self, pool: asyncpg.Pool, ledger: Any, notifier: Any, deliverer: Deliverer,
                 received: list[dict[str, Any]]) -> None:  # fmt: skip
        self.pool, self.ledger, self.notifier = pool, ledger, notifier
        self.deliverer, self.received = deliverer, received

    async def grants(self, *events: dict[str, Any]) -> list[dict[str, Any]]:
        """The grants through the ledger, its published events through the notifier."""
        await self.ledger.process(direct.records("loyalty.grants.v1", *events))
        rows = await self.pool.fetch(
            "DELETE FROM outbox WHERE service = 'ledger' RETURNING id, payload")  # fmt: skip
        published = [orjson.loads(r["payload"]) for r in sorted(rows, key=lambda r: r["id"])]
        await self.notifier.process(direct.records(LEDGER_TOPIC, *published))
        return published

    async def sweep(self, now: datetime) -> None:
        """The expiry sweep at `now`, its warnings through the notifier."""
        await ExpirySweeper(self.pool, LEDGER_TOPIC, 60, lambda: None).sweep_once(now)
        rows = await self.pool.fetch(
            "DELETE FROM outbox WHERE service = 'ledger' RETURNING id, payload")  # fmt: skip
        published = [orjson.loads(r["payload"]) for r in sorted(rows, key=lambda r: r["id"])]
        await self.notifier.process(direct.records(LEDGER_TOPIC, *published))

    async def messages(self) -> list[str]:
        async with httpx.AsyncClient(timeout=10.0) as client:
            await self.deliverer.deliver_once(client)
        return [b["message"] for b in self.received]


@pytest.fixture
async def env(fresh_database: str) -> AsyncIterator[Env]:
    received: list[dict[str, Any]] = []

    async def hook(request: Request) -> Response:
        received.append(json.loads(await request.body()))
        return Response(status_code=204)

    async with migrated_pool(fresh_database, max_size=4) as pool, webhook(hook) as url:
        settings = Settings(database_url=fresh_database, bootstrap_servers="",
                            webhook_url=url, webhook_secret="s")  # fmt: skip
        ledger = consumer_of(pool, "ledger", "loyalty.grants.v1",
                             projector.make_handler(settings, "ledger", LedgerRules()))  # fmt: skip
        notifier = consumer_of(pool, "notifier", LEDGER_TOPIC,
                               notifier_handler(settings, "notifier"))  # fmt: skip
        yield Env(pool, ledger, notifier, Deliverer(pool, url, "s"), received)


def _count(outcome: str) -> float:
    return DELIVERED.labels(outcome)._value.get()


async def test_a_grant_already_expired_when_it_arrives_is_not_announced(env: Env) -> None:
    # A grant dated 13 months ago (a till syncing very late): the ledger journals its lot
    # and, in the same batch, its expiry. The member was told "1000 points, 1000 now
    # available" for points gone 35 days before.
    skipped = _count("expired_on_arrival")
    published = await env.grants(grant("m-late", 1000, datetime.now(UTC) - timedelta(days=400)))
    assert [e["type"] for e in published] == ["points_earned", "points_expired"]
    assert await env.messages() == []
    assert await env.pool.fetchval("SELECT count(*) FROM notifications") == 0
    assert _count("expired_on_arrival") == skipped + 1


async def test_a_grant_days_late_dates_the_balance_it_reports(env: Env) -> None:
    # Its balance_after is the balance ten days ago, not the member's current one.
    late = datetime.now(UTC) - timedelta(days=10)
    await env.grants(grant("m-days", 300, late))
    day = late.astimezone(ZoneInfo("Asia/Shanghai"))
    assert await env.messages() == [
        f"您获得300积分（消费积分），截至{day.year}年{day.month}月{day.day}日可用积分300。"
    ]


async def test_a_bonus_a_refund_grants_is_published_as_such_and_not_announced(
    env: Env,
) -> None:
    # Bonuses do not stack: a partial refund of a big-ticket order takes back base and
    # big-ticket points (not messaged) and grants the first-purchase bonus instead. The
    # member was told "您获得200积分（首次消费奖励）" about their refund.
    skipped = _count("caused_by_refund")
    at = datetime.now(UTC) - timedelta(hours=1)
    await env.grants(grant("m-r", 3000, at), grant("m-r", 600, at, rule="big_ticket"))
    swap = grant("m-r", 200, at + timedelta(minutes=30), rule="first_purchase")
    swap["data"]["source_type"] = "refund"
    published = await env.grants(swap)
    assert [(e["type"], e["data"]["source_type"]) for e in published] == [
        ("points_earned", "refund")
    ]
    messages = await env.messages()
    assert len(messages) == 2  # the purchase's two grants, as rewards
    assert not any("首次消费奖励" in m for m in messages)
    assert _count("caused_by_refund") == skipped + 1


def _day(at: datetime, zone: ZoneInfo) -> str:
    local = at.astimezone(zone)
    return f"{local.year}年{local.month}月{local.day}日"


async def test_dates_are_days_of_the_calendar_the_ledger_counts_on(env: Env) -> None:
    # A clinic whose rule set is zoned in Tokyo: the ledger counts a lot's months there,
    # and the notifier printed Shanghai's day, an hour behind: a lot lapsing at 00:30 in
    # Tokyo was announced for the day before.
    tokyo, shanghai = ZoneInfo("Asia/Tokyo"), ZoneInfo("Asia/Shanghai")
    now = datetime.now(UTC)
    rules = yaml.safe_load(DEFAULT_RULESET.read_text(encoding="utf-8"))
    rules.update(version="clinic-tokyo", timezone="Asia/Tokyo",
                 effective_from=now - timedelta(days=1))  # fmt: skip
    async with env.pool.acquire() as conn:
        await publish(conn, yaml.safe_dump(rules), "test")
    at = (now - timedelta(days=360)).astimezone(tokyo).replace(hour=0, minute=30)
    priced = grant("m-tokyo", 1000, at)
    priced["data"]["ruleset_version"] = "clinic-tokyo"
    await env.grants(priced)
    lapse = await env.pool.fetchval(
        "SELECT expires_at FROM ledger_lots WHERE lot_id = $1", priced["event_id"])  # fmt: skip
    assert _day(lapse, tokyo) != _day(lapse, shanghai)
    await env.sweep(now)  # the lot lapses in about 5 days: its 7-day warning
    # A positive adjustment's lot carries no version: the one in force counts its months.
    adjusted = {"event_id": "adj-warning", "type": "points_expiring", "schema_version": 1,
                "occurred_at": now.isoformat(), "member_id": "m-adj",
                "data": {"points": 50, "balance_after": 50,
                         "expires_at": lapse.isoformat()}}  # fmt: skip
    await env.notifier.process(direct.records(LEDGER_TOPIC, adjusted))
    await env.messages()
    warned = warning_id(priced["event_id"], 7)
    assert {b["notification_id"]: b["message"] for b in env.received} == {
        priced["event_id"]: f"您获得1000积分（消费积分），截至{_day(at, tokyo)}可用积分1000。",
        warned: f"您有1000积分将于{_day(lapse, tokyo)}过期，请尽快使用。",
        "adj-warning": f"您有50积分将于{_day(lapse, tokyo)}过期，请尽快使用。",
    }
