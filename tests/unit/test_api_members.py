"""The ledger API's member routes in process, on a stub database that records what it is
asked: which member a path reaches, and what an unknown member is answered."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi.testclient import TestClient

from services.ledger.reads import encode_cursor
from tests.unit.test_api_problems import READER, client, problem


class RecordingPool:
    """No rows for any query; `known` answers whether the member has a ledger record."""

    def __init__(self, known: bool = False) -> None:
        self.known, self.asked = known, []

    @contextlib.asynccontextmanager
    async def acquire(self, timeout: float | None = None) -> AsyncIterator[Any]:
        pool = self

        class Conn:
            async def fetch(self, query: str, *args: Any) -> list[Any]:
                pool.asked.append(args[0])
                return []

            async def fetchval(self, query: str, *args: Any) -> Any:
                pool.asked.append(args[0])
                return pool.known

        yield Conn()


def recording(known: bool = False) -> tuple[TestClient, RecordingPool]:
    api = client()
    pool = RecordingPool(known)
    api.app.state.ledger._pool = pool  # type: ignore[attr-defined]
    return api, pool


def test_the_first_entries_page_of_an_unknown_member_is_a_404() -> None:
    """As the member view: it was a 200 with an empty page, an unknown id and a member
    without entries alike."""
    api, pool = recording(known=False)
    body = problem(api.get("/v1/members/ghost/entries", headers=READER), 404)
    assert body["title"] == "Member not found"
    assert set(pool.asked) == {"ghost"}


def test_a_known_member_without_entries_has_an_empty_page() -> None:
    """Known from a tier report alone, say: the member view answers 200 too."""
    api, _ = recording(known=True)
    resp = api.get("/v1/members/m-1/entries", headers=READER)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"entries": [], "next_cursor": None}


def test_a_page_past_the_last_is_empty_whoever_the_member() -> None:
    """A cursor's page is read as before: the record is looked up for a first page only."""
    api, pool = recording(known=False)
    resp = api.get(f"/v1/members/ghost/entries?cursor={encode_cursor(5)}", headers=READER)
    assert resp.json() == {"entries": [], "next_cursor": None}
    assert pool.asked == ["ghost"]
