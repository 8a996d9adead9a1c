"""A held event released on a connection with the services' codecs (`init_connection`:
json values through orjson) stores the member's state as a JSON object, as `ledgerctl`'s
plain connection does. Before, the state went in as a JSON *string* there, and every
later event of that member was dead-lettered as poison."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from services.common.config import Settings
from services.common.migrations import apply_migrations
from services.common.runtime import init_connection
from services.rules.held import release_held
from services.rules.state import load_state

pytestmark = pytest.mark.integration


async def test_a_release_stores_the_state_as_an_object_with_the_services_codecs(
    fresh_database: str,
) -> None:
    apply_migrations(fresh_database)
    event = {"event_id": "ev-held", "type": "review", "schema_version": 1,
             "occurred_at": (datetime.now(UTC) - timedelta(hours=1)).isoformat(),
             "member_id": "m-h", "store_id": "sh-jingan", "source": "app",
             "data": {"review_id": "rv-1", "rating": 5, "featured": False,
                      "suggestion_adopted": False}}  # fmt: skip
    conn = await asyncpg.connect(fresh_database)
    try:
        await init_connection(conn)
        await conn.execute(
            "INSERT INTO rules_held (event_id, member_id, type, occurred_at, payload, reason)"
            " VALUES ($1, 'm-h', 'review', $2, $3, 'burst')",
            event["event_id"], datetime.fromisoformat(event["occurred_at"]),
            json.dumps(event).encode(),
        )  # fmt: skip
        settings = Settings(database_url=fresh_database, bootstrap_servers="")
        decision = await release_held(conn, settings, "ev-held", "ops-test")
        assert decision.grants >= 1
        kind = await conn.fetchval(
            "SELECT json_typeof(state) FROM rules_member_state WHERE member_id = 'm-h'"
        )
        assert kind == "object"
        state = load_state(await conn.fetchval(
            "SELECT state::text FROM rules_member_state WHERE member_id = 'm-h'"
        ))  # fmt: skip
        assert state.member_id == "m-h"
    finally:
        await conn.close()
