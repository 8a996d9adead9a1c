"""The ledger API's error answers, in process: the database is never reached (or is a stub
that fails on purpose), so these are about the HTTP layer, not the ledger's behaviour."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiokafka.errors import KafkaConnectionError
from fastapi.testclient import TestClient

from services.common.config import Settings
from services.ledger.api import Problem, create_app, parse_instant

KEYS = "ops-key:ops,reader-key:reader,redeemer-key:redeemer"
OPS = {"Authorization": "Bearer ops-key"}
READER = {"Authorization": "Bearer reader-key"}
REDEEMER = {"Authorization": "Bearer redeemer-key"}


class FailingPool:
    """Hands out a connection whose every query raises `error`."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    @contextlib.asynccontextmanager
    async def acquire(self, timeout: float | None = None) -> AsyncIterator[Any]:
        error = self.error

        class Conn:
            async def fetch(self, *args: Any) -> Any:
                raise error

            async def fetchrow(self, *args: Any) -> Any:
                raise error

        yield Conn()


def client(error: BaseException | None = None) -> TestClient:
    """No `with`: the lifespan (Postgres, Kafka) never starts."""
    app = create_app(
        Settings(database_url="postgresql://nobody@127.0.0.1:1/none",
                 bootstrap_servers="127.0.0.1:1", api_keys=KEYS)
    )  # fmt: skip
    if error is not None:
        app.state.ledger._pool = FailingPool(error)
    return TestClient(app, raise_server_exceptions=False)


def problem(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = dict(resp.json())
    assert body["status"] == status
    return body


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "headers", "status"),
    [
        ("get", "/v1/members/m-1/entries?limit=0", {}, {}, 401),
        ("get", "/v1/members/m-1?as_of=yesterday", {}, {}, 401),
        ("post", "/v1/members/m-1/redemptions", {"json": {}}, {}, 401),
        ("post", "/v1/members/m-1/redemptions",
         {"content": b"not json", "headers": {"content-type": "application/json"}}, {}, 401),
        ("post", "/v1/adjustments", {"json": {}}, READER, 403),
        ("post", "/v1/adjustments", {"content": b"{", "headers": {
            "content-type": "application/json", **READER}}, {}, 403),
        ("get", "/v1/reports/summary?from=never", {}, READER, 403),
        ("get", "/v1/reports/daily", {}, {}, 401),
        ("get", "/v1/reports/daily?from=never", {}, READER, 403),
        ("get", "/v1/reports/daily", {}, REDEEMER, 403),
    ],
)  # fmt: skip
def test_the_key_is_checked_before_the_request_is_validated(
    method: str, path: str, kwargs: dict[str, Any], headers: dict[str, str], status: int
) -> None:
    """A caller without the right key learns that, not what a valid request looks like."""
    if headers:
        kwargs = {**kwargs, "headers": {**kwargs.get("headers", {}), **headers}}
    body = problem(getattr(client(), method)(path, **kwargs), status)
    assert "errors" not in body
    if status == 401:
        assert getattr(client(), method)(path, **kwargs).headers["WWW-Authenticate"] == "Bearer"


def test_with_the_right_key_an_invalid_request_is_a_422_naming_the_fields() -> None:
    body = problem(client().post("/v1/adjustments", json={"points": 10**10}, headers=OPS), 422)
    fields = {e["field"] for e in body["errors"]}
    assert {"body.points", "body.adjustment_id", "body.reason"} <= fields
    problem(client().get("/v1/members/m-1?as_of=yesterday", headers=READER), 422)


@pytest.mark.parametrize("cash", ["1" * 27, "1" * 13, "9" * 40 + ".99"])
def test_an_oversized_cash_amount_is_a_422_naming_the_field(cash: str) -> None:
    """Any number of digits used to pass and fail in quantize (a 500)."""
    resp = client(ConnectionResetError()).post(
        "/v1/members/m-1/redemptions",
        json={"redemption_id": "r-1", "cash": cash},
        headers=REDEEMER,
    )
    body = problem(resp, 422)
    assert [e["field"] for e in body["errors"]] == ["body.cash"]


@pytest.mark.parametrize(
    ("path", "body", "headers", "field"),
    [
        ("/v1/members/m-1/redemptions", {"redemption_id": "r-1", "points": True}, REDEEMER,
         "body.points"),
        ("/v1/members/m-1/redemptions", {"redemption_id": "r-1", "points": "7"}, REDEEMER,
         "body.points"),
        ("/v1/members/m-1/redemptions", {"redemption_id": "r-1", "points": 500.0}, REDEEMER,
         "body.points"),
        ("/v1/adjustments", {"adjustment_id": "a-1", "member_id": "m-1", "points": True,
                             "reason": "r", "operator": "o"}, OPS, "body.points"),
        ("/v1/adjustments", {"adjustment_id": "a-1", "member_id": "m-1", "points": -5,
                             "reason": "r", "operator": "o", "allow_debt": "yes"}, OPS,
         "body.allow_debt"),
    ],
)  # fmt: skip
def test_points_and_flags_must_be_json_numbers_and_booleans(
    path: str, body: dict[str, Any], headers: dict[str, str], field: str
) -> None:
    """A client's `true` or `"7"` used to move 1 or 7 points (pydantic's lax mode)."""
    resp = client(ConnectionResetError()).post(path, json=body, headers=headers)
    assert [e["field"] for e in problem(resp, 422)["errors"]] == [field]


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.CannotConnectNowError("the database system is shutting down"),
        asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout"),
        # A DBA's lock_timeout, a server (or role) out of connections, a disk full, a
        # server read-only after a failover: the database's state, not the request's.
        asyncpg.exceptions.LockNotAvailableError("canceling statement due to lock timeout"),
        asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"),
        asyncpg.exceptions.DiskFullError("could not extend file"),
        asyncpg.exceptions.ReadOnlySQLTransactionError("cannot execute UPDATE in a read-only"),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        asyncpg.PostgresConnectionError("connection failure"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError(),
    ],
    ids=type,
)
def test_database_trouble_is_a_503_to_retry(error: BaseException) -> None:
    body = problem(client(error).get("/v1/members/m-1", headers=READER), 503)
    assert body["title"] == "Database unavailable"


def test_any_other_failure_is_a_500_problem_without_internals() -> None:
    body = problem(client(KeyError("secret-internal-name")).get("/v1/members/m-1",
                                                                  headers=READER), 500)  # fmt: skip
    assert "secret-internal-name" not in str(body)


class _Client:
    def __init__(self, error: BaseException | None) -> None:
        self.error = error

    async def fetch_all_metadata(self) -> object:
        if self.error is not None:
            raise self.error
        return object()


class _Producer:
    def __init__(self, error: BaseException | None = None) -> None:
        self.client = _Client(error)


class _ReadyPool:
    @contextlib.asynccontextmanager
    async def acquire(self, timeout: float | None = None) -> AsyncIterator[Any]:
        class Conn:
            async def fetchval(self, *args: Any) -> Any:
                return True

        yield Conn()


@pytest.mark.parametrize(
    ("producer", "ready"),
    [
        (_Producer(), True),
        (_Producer(KafkaConnectionError("no broker")), False),
        (_Producer(ConnectionRefusedError(111, "refused")), False),
        (None, False),
    ],
    ids=["reachable", "kafka error", "refused", "not started"],
)
def test_readyz_needs_the_broker_reachable(producer: Any, ready: bool) -> None:
    """CONTRACT.md: readiness is broker and database reachable, consumers assigned. The
    consumer's assignment outlives a broker outage, so the broker is asked each time."""
    c = client()
    ledger = c.app.state.ledger  # type: ignore[attr-defined]
    ledger._pool = _ReadyPool()
    ledger._producer = producer
    ledger.consumer.assigned = {("loyalty.grants.v1", 0)}
    resp = c.get("/readyz")
    assert resp.json()["checks"] == {"database": True, "broker": ready, "consumer_assigned": True}
    assert resp.status_code == (200 if ready else 503)


@pytest.mark.parametrize(
    ("raw", "moment"),
    [
        ("2026-11-20T15:04:05+08:00", datetime(2026, 11, 20, 7, 4, 5, tzinfo=UTC)),
        ("2026-11-20t07:04:05z", datetime(2026, 11, 20, 7, 4, 5, tzinfo=UTC)),
        ("2026-11-20 07:04:05.250Z", datetime(2026, 11, 20, 7, 4, 5, 250000, tzinfo=UTC)),
    ],
)
def test_rfc3339_instants_in_any_of_its_forms_are_read(raw: str, moment: datetime) -> None:
    assert parse_instant(raw) == moment


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("2026-11-20T15:04:05", "needs a UTC offset"),
        ("20261120T150405+0800", "is not an RFC 3339 timestamp"),
        ("2026-W47-5T15:04:05+08:00", "is not an RFC 3339 timestamp"),
        ("2026-13-20T15:04:05Z", "is not an RFC 3339 timestamp"),
        ("2026-11-20T15:04:05+08:60", "is not an RFC 3339 timestamp"),
        ("yesterday", "is not an RFC 3339 timestamp"),
        # Real moments of their offset, but not in UTC, where the database takes them
        # (the driver converts): they were a 500.
        ("0001-01-01T00:00:00+08:00", "outside the years 1 to 9999 in UTC"),
        ("9999-12-31T23:59:59-08:00", "outside the years 1 to 9999 in UTC"),
    ],
)
def test_other_instants_are_refused_with_a_reason(raw: str, says: str) -> None:
    with pytest.raises(Problem) as refused:
        parse_instant(raw)
    assert refused.value.status == 422
    assert says in refused.value.detail


@pytest.mark.parametrize(
    ("path", "field", "says"),
    [
        ("/v1/members/m-1?as_of=yesterday", "query.as_of", "is not an RFC 3339 timestamp"),
        ("/v1/members/m-1?as_of=2026-11-20T15:04:05", "query.as_of", "needs a UTC offset"),
        ("/v1/members/m-1?as_of=2026-13-20T15:04:05Z", "query.as_of", "not an RFC 3339"),
        ("/v1/members/m-1?as_of=0001-01-01T00:00:00%2B08:00", "query.as_of", "years 1 to"),
        ("/v1/reports/summary?to=9999-12-31T23:59:59-08:00", "query.to", "years 1 to 9999"),
        ("/v1/members/m-1/entries?cursor=nope", "query.cursor", "not issued by this API"),
        # A well-formed cursor past bigint reached the database (a 500).
        ("/v1/members/m-1/entries?cursor=OTk5OTk5OTk5OTk5OTk5OTk5OTk5", "query.cursor",
         "not issued by this API"),
        ("/v1/members/m-1/entries?limit=0", "query.limit", "greater than or equal to 1"),
        ("/v1/members/m-1/entries?limit=ten", "query.limit", "valid integer"),
        ("/v1/reports/summary?from=never", "query.from", "is not an RFC 3339 timestamp"),
        ("/v1/reports/summary?to=2026-11-20", "query.to", "is not an RFC 3339 timestamp"),
        ("/v1/reports/summary?from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z",
         "query.to", "`to` is before `from`"),
        # The daily report parses its period as the summary does, and needs a start.
        ("/v1/reports/daily", "query.from", "Field required"),
        ("/v1/reports/daily?from=never", "query.from", "is not an RFC 3339 timestamp"),
        ("/v1/reports/daily?from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z",
         "query.to", "`to` is before `from`"),
    ],
)  # fmt: skip
def test_a_bad_query_parameter_is_a_422_with_errors_naming_it(
    path: str, field: str, says: str
) -> None:
    """The same `errors` list as a bad body: [{field, message}], the field as query.<name>."""
    headers = OPS if "reports" in path else READER
    body = problem(client(KeyError("never reached")).get(path, headers=headers), 422)
    assert [e["field"] for e in body["errors"]] == [field], body
    assert says in body["errors"][0]["message"]
    assert says in body["detail"]


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("/v1/members/m-1?as_of=2026-11-20T15:04:05+08:00", "as_of"),
        ("/v1/members/m-1?as_of=2026-11-20 15:04:05.5+08:00", "as_of"),
        ("/v1/reports/summary?from=2026-11-20T00:00:00+08:00", "from"),
    ],
)
def test_an_unencoded_plus_in_an_offset_is_named_as_such(query: str, name: str) -> None:
    """httpx sends the '+' as is; the server reads it as a space, as browsers and curl do."""
    headers = OPS if "summary" in query else READER
    body = problem(client(KeyError("never reached")).get(query, headers=headers), 422)
    assert body["errors"][0]["field"] == f"query.{name}"
    assert "a '+' in a query string must be sent as %2B" in body["detail"]
    assert "%2B08:00" in body["detail"]


def test_an_encoded_plus_is_read() -> None:
    assert parse_instant("2026-11-20T15:04:05+08:00") == datetime(2026, 11, 20, 7, 4, 5, tzinfo=UTC)
    with pytest.raises(Problem) as refused:
        parse_instant("2026-11-20T15:04:05 08:00", "from")
    assert refused.value.extra["errors"] == [
        {"field": "query.from", "message": refused.value.detail}
    ]


@pytest.mark.parametrize(
    "path", ["/v1/members/a%00b", "/v1/members/a%00b/entries", "/v1/members/%00"]
)
def test_a_member_id_with_a_nul_is_an_unknown_member(path: str) -> None:
    """Postgres cannot hold a NUL, so no such member was ever recorded: it was a 500."""
    body = problem(client(KeyError("never reached")).get(path, headers=READER), 404)
    assert body["title"] == "Member not found"
    resp = client(KeyError("never reached")).post(
        "/v1/members/a%00b/redemptions", json={"redemption_id": "r-1", "points": 500},
        headers=REDEEMER,
    )  # fmt: skip
    assert problem(resp, 404)["title"] == "Member not found"
    problem(client().get(path), 401)  # the key still comes first


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "field"),
    [
        ("get", "/v1/reports/summary?store_id=a%00b", None, OPS, "query.store_id"),
        ("post", "/v1/members/m-1/redemptions", {"redemption_id": "a\u0000b", "points": 500},
         REDEEMER, "body.redemption_id"),
        ("post", "/v1/members/m-1/redemptions",
         {"redemption_id": "r-1", "points": 500, "store_id": "s\u0000"}, REDEEMER,
         "body.store_id"),
        ("post", "/v1/members/m-1/redemptions", {"redemption_id": "r-1", "reward": "\u0000"},
         REDEEMER, "body.reward"),
        *(("post", "/v1/adjustments",
           {"adjustment_id": "a-1", "member_id": "m-1", "points": 5, "reason": "r",
            "operator": "o", name: "x\u0000"}, OPS, f"body.{name}")
          for name in ("adjustment_id", "member_id", "reason", "operator")),
    ],
)  # fmt: skip
def test_a_nul_in_a_body_string_or_query_value_is_a_422_naming_it(
    method: str, path: str, body: dict[str, Any] | None, headers: dict[str, str], field: str
) -> None:
    """Each reached Postgres, which refused it (CharacterNotInRepertoireError): a 500."""
    kwargs: dict[str, Any] = (
        {"headers": headers} if body is None else {"headers": headers, "json": body}
    )
    resp = getattr(client(KeyError("never reached")), method)(path, **kwargs)
    errors = problem(resp, 422)["errors"]
    assert [e["field"] for e in errors] == [field]
    assert "NUL" in errors[0]["message"]


UNREADABLE = [
    (b"[" * 50_000, "nested too deeply"),  # json.loads: RecursionError (50 KB, under the cap)
    (b'{"redemption_id": "\xff", "points": 500}', "not valid UTF-8"),
    (b'{"redemption_id": "a", "points": ' + b"9" * 5000 + b"}", "4,300 digits"),
    # json.loads detects these from the BOM and read them: a redemption made.
    *(
        pytest.param('{"redemption_id": "r-1", "points": 500}'.encode(e), "not valid UTF-8", id=e)
        for e in ("utf-16", "utf-32")
    ),
]


@pytest.mark.parametrize(("raw", "says"), UNREADABLE)
def test_a_body_json_cannot_read_is_checked_for_the_key_then_a_422(raw: bytes, says: str) -> None:
    """FastAPI answered these 400 "There was an error parsing the body", key or none."""

    def post(headers: dict[str, str]) -> Any:
        return client(KeyError("never reached")).post(
            "/v1/members/m-1/redemptions", content=raw,
            headers={"content-type": "application/json", **headers},
        )  # fmt: skip

    problem(post({}), 401)
    problem(post(READER), 403)
    body = problem(post(REDEEMER), 422)
    assert body["errors"] == [{"field": "body", "message": body["errors"][0]["message"]}]
    assert says in body["errors"][0]["message"]


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_a_json_body_in_utf16_or_utf32_without_a_bom_is_a_422(encoding: str) -> None:
    """json.loads detected these from their NUL bytes and read them (a redemption made);
    read as the UTF-8 the README asks for they are no JSON."""
    resp = client(KeyError("never reached")).post(
        "/v1/members/m-1/redemptions",
        content='{"redemption_id": "r-1", "points": 500}'.encode(encoding),
        headers={"content-type": "application/json", **REDEEMER},
    )
    assert [e["field"].split(".")[0] for e in problem(resp, 422)["errors"]] == ["body"]


def test_a_utf8_body_may_start_with_a_bom() -> None:
    """RFC 8259 lets a parser ignore it, and json.loads did: it is still UTF-8."""
    resp = client(KeyError("never reached")).post(
        "/v1/members/m-1/redemptions",
        content=b'\xef\xbb\xbf{"redemption_id": "r-1", "points": 500}',
        headers={"content-type": "application/json", **REDEEMER},
    )
    problem(resp, 500)  # read, and on to the (failing) database


def test_a_malformed_key_entry_is_refused_without_printing_the_key() -> None:
    """The message goes to the service's log: it names the entry, never its text."""
    from services.ledger.auth import KeyRing

    for spec in ("good-key:ops,s3cret-no-role", "good-key:ops,s3cr:et"):
        with pytest.raises(ValueError, match="entry 2 is not KEY") as refused:
            KeyRing.parse(spec)
        assert str(refused.value) == "LEDGER_API_KEYS entry 2 is not KEY:reader|redeemer|ops"


def test_the_openapi_document_needs_a_reader_key() -> None:
    """CONTRACT.md: every call but /healthz, /readyz and /metrics needs a key. FastAPI's
    /openapi.json, /docs and /redoc answered anyone."""
    api = client()
    problem(api.get("/openapi.json"), 401)
    problem(api.get("/openapi.json", headers={"Authorization": "Bearer wrong"}), 401)
    doc = api.get("/openapi.json", headers=READER)
    assert doc.status_code == 200, doc.text
    assert "/v1/members/{member_id}/redemptions" in doc.json()["paths"]
    assert "/openapi.json" not in doc.json()["paths"]
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        problem(api.get(path), 404)


def test_the_daily_report_is_described_in_the_openapi_document() -> None:
    daily = client().get("/openapi.json", headers=READER).json()["paths"]["/v1/reports/daily"]
    assert "`stores`" in daily["get"]["description"]
    assert "at most 366" in daily["get"]["description"]
    query = [p["name"] for p in daily["get"]["parameters"] if p["in"] == "query"]
    assert query == ["from", "to", "store_id"]


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("delete", "/v1/members/m-1", "GET"),
        ("put", "/v1/adjustments", "POST"),
        ("get", "/v1/members/m-1/redemptions", "POST"),
    ],
)
def test_a_method_the_path_does_not_take_is_a_405_naming_those_it_does(
    method: str, path: str, allow: str
) -> None:
    """RFC 9110: a 405 must carry Allow; the problem answer was built without it."""
    resp = getattr(client(), method)(path, headers=OPS)
    problem(resp, 405)
    assert resp.headers["Allow"] == allow


def test_the_openapi_document_describes_the_errors_as_they_are_answered() -> None:
    """It gave a 422 as FastAPI's HTTPValidationError in application/json and no other
    error; every error is problem+json, a 422's with `errors`."""
    doc = client().get("/openapi.json", headers=READER).json()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    problem_schema = doc["components"]["schemas"]["Problem"]
    assert set(problem_schema["required"]) == {"title", "status", "detail", "instance"}
    errors = problem_schema["properties"]["errors"]["items"]
    assert errors == {"$ref": "#/components/schemas/FieldError"}
    assert set(doc["components"]["schemas"]["FieldError"]["properties"]) == {"field", "message"}
    documented = {}
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            failures = {int(s): r for s, r in operation["responses"].items() if int(s) >= 400}
            for answer in failures.values():
                assert answer["content"] == {
                    "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
                }
            documented[f"{method.upper()} {path}"] = sorted(failures)
    member, reports, writes = [401, 404, 422, 500, 503], [401, 403, 422, 500, 503], [
        401, 403, 404, 409, 413, 422, 500, 503
    ]  # fmt: skip
    assert documented == {
        "GET /v1/members/{member_id}": member,
        "GET /v1/members/{member_id}/entries": member,
        "POST /v1/members/{member_id}/redemptions": writes,
        "POST /v1/adjustments": writes,
        "GET /v1/reports/summary": reports,
        "GET /v1/reports/daily": reports,
        "GET /healthz": [],
        "GET /readyz": [],
        "GET /metrics": [],
    }
