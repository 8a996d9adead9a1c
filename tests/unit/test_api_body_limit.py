"""The ledger API's cap on request bodies: refused 413 before the key, without buffering."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi.testclient import TestClient

from services.common.config import Settings
from services.ledger.api import create_app
from services.ledger.body_limit import BodyLimit
from tests.unit.test_api_problems import OPS, problem

LIMIT = 4096


def client(limit: int = LIMIT) -> TestClient:
    app = create_app(
        Settings(database_url="postgresql://nobody@127.0.0.1:1/none",
                 bootstrap_servers="127.0.0.1:1", api_keys="ops-key:ops", max_body_bytes=limit)
    )  # fmt: skip
    return TestClient(app, raise_server_exceptions=False)


def test_a_declared_body_over_the_cap_is_a_413_before_the_key() -> None:
    """It was read whole (30 MB, say) and then refused 401."""
    resp = client().post(
        "/v1/members/m-1/redemptions",
        content=b"x" * (LIMIT + 1),
        headers={"content-type": "application/json"},
    )
    body = problem(resp, 413)
    assert str(LIMIT) in body["detail"]
    assert body["instance"] == "/v1/members/m-1/redemptions"


def test_a_body_at_the_cap_is_read_as_before() -> None:
    padded = b'{"redemption_id": "r-1", "points": 500}'.ljust(LIMIT)
    resp = client().post(
        "/v1/members/m-1/redemptions",
        content=padded[:-1] + b"x",  # not JSON: reached the parser, so it was let in
        headers={"content-type": "application/json", **OPS},
    )
    assert problem(resp, 422)["errors"][0]["field"].startswith("body")


class Inner:
    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        self.bodies.append(message["body"])
        assert not message["more_body"]


def run(limit: int, chunks: int, size: int) -> tuple[Inner, list[dict[str, Any]], int]:
    """A chunked body (no Content-Length) of `chunks` pieces of `size` bytes through it."""
    inner, sent, reads = Inner(), [], 0

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"x" * size, "more_body": reads < chunks}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/adjustments",
             "headers": [(b"transfer-encoding", b"chunked")]}  # fmt: skip
    asyncio.run(BodyLimit(inner, limit)(scope, receive, send))
    return inner, sent, reads


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_cap() -> None:
    inner, sent, reads = run(LIMIT, chunks=10_000, size=1024)
    assert reads == LIMIT // 1024 + 1  # not the 10,000 chunks of the whole body
    assert inner.bodies == []  # the application never ran
    assert sent[0]["status"] == 413
    assert (b"content-type", b"application/problem+json") in sent[0]["headers"]


def test_a_chunked_body_under_the_cap_reaches_the_application_whole() -> None:
    inner, sent, reads = run(LIMIT, chunks=4, size=1024)
    assert (reads, inner.bodies, sent) == (4, [b"x" * 4096], [])


def test_a_request_without_a_chunked_body_passes_through_unread() -> None:
    """A GET (no body) or a body of declared length under the cap: the server delivers no
    more than declared, so the middleware neither reads nor copies it."""
    received: list[Any] = []
    for headers in ([], [(b"content-length", b"10")]):
        received.clear()

        async def receive() -> dict[str, Any]:
            raise AssertionError("the middleware read the body")

        async def app(scope: Any, receive_: Any, send: Any) -> None:
            received.append(receive_)

        async def send(message: dict[str, Any]) -> None:
            raise AssertionError("the middleware answered")

        scope = {"type": "http", "method": "GET", "path": "/v1/members/m-1", "headers": headers}
        asyncio.run(BodyLimit(app, LIMIT)(scope, receive, send))
        assert received == [receive]
