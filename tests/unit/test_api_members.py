"""The ledger API's member routes in process, on a stub database that records what it is
asked: which member a path reaches, and what an unknown member is answered."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from services.ledger import redemptions
from services.ledger.member_paths import member_of, routed_path
from services.ledger.reads import encode_cursor
from tests.unit.test_api_problems import READER, REDEEMER, client, problem


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


# Ids the activity schema takes that a path must encode; those holding a '/' were misrouted.
ODD_IDS = ["wx/oAbC+9", "m-1/entries", "a%b", "a%2Fb", "会员/张三", "ü ?#\\", "/", "%"]


def path_of(member: str, rest: str = "") -> str:
    return f"/v1/members/{quote(member, safe='')}{rest}"


@pytest.mark.parametrize("member", ODD_IDS)
def test_a_member_id_is_read_back_whole_from_its_encoded_path(member: str) -> None:
    path = routed_path(path_of(member, "/entries").encode() + b"?limit=5")
    prefix, segment, rest = path.rsplit("/", 2)
    assert (prefix, member_of(segment), rest) == ("/v1/members", member, "entries")


@pytest.mark.parametrize("member", ODD_IDS)
def test_the_member_routes_reach_an_id_holding_a_slash_or_percent(
    member: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server decodes %2F before routing: `wx%2FoAbC` was a 404 and `m-1%2Fentries`
    m-1's entries."""
    api, pool = recording(known=True)
    body = problem(api.get(path_of(member), headers=READER), 404)
    assert body["detail"] == f"no ledger record for member {member!r}"
    assert member_of(body["instance"].rsplit("/", 1)[1]) == member
    resp = api.get(path_of(member, "/entries"), headers=READER)
    assert resp.json() == {"entries": [], "next_cursor": None}
    assert pool.asked == [member, member, member]

    redeemed: list[str] = []

    async def redeem(conn: Any, topic: str, member_id: str, *args: Any, **kw: Any) -> Any:
        redeemed.append(member_id)
        return redemptions.Outcome(201, {"redemption_id": "r-1"}, fresh=False)

    async def policy_at(conn: Any, now: Any) -> None:
        return None

    monkeypatch.setattr(redemptions, "redeem", redeem)
    monkeypatch.setattr(api.app.state.ledger.rules, "policy_at", policy_at)  # type: ignore[attr-defined]
    sent = {"redemption_id": "r-1", "points": 500}
    resp = api.post(path_of(member, "/redemptions"), json=sent, headers=REDEEMER)
    assert resp.status_code == 201, resp.text
    assert redeemed == [member]


def test_a_slash_sent_as_is_still_separates_the_path() -> None:
    """`m-1/entries` is m-1's entries; `m-1%2Fentries` the member of that name; an
    unencoded '+' is a '+' (paths are not query strings)."""
    api, pool = recording(known=True)
    assert api.get("/v1/members/m-1/entries", headers=READER).status_code == 200
    problem(api.get("/v1/members/m-1%2Fentries", headers=READER), 404)
    problem(api.get("/v1/members/wx%2FoAbC+9", headers=READER), 404)
    problem(api.get("/v1/members/m-1/entries/more", headers=READER), 404)
    assert pool.asked == ["m-1", "m-1", "m-1/entries", "wx/oAbC+9"]


@pytest.mark.parametrize(("error", "status"), [(OSError("refused"), 503), (KeyError("x"), 500)])
def test_a_failure_on_a_member_route_names_the_path_as_the_routes_read_it(
    error: BaseException, status: int
) -> None:
    """A 500 or 503 is answered outside the raw-path middleware: the member `m-1/entries`
    was named as m-1's entries resource (`/v1/members/m-1/entries`), as a 404 is not."""
    from tests.unit.test_api_problems import client as failing

    api = failing(error)
    body = problem(api.get("/v1/members/m-1%2Fentries", headers=READER), status)
    assert body["instance"] == "/v1/members/m-1%2Fentries"
    body = problem(api.get("/v1/members/m-1/entries", headers=READER), status)
    assert body["instance"] == "/v1/members/m-1/entries"
