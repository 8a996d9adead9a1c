"""The ledger's HTTP API (CONTRACT.md): member views, entries, redemptions, health, metrics.

Roles: member reads need ``reader``; redemptions ``redeemer``; adjustments and the reports
``ops`` (the chain's liability, not member data). A repeated redemption or adjustment (same
id, same body) answers 201 with the first answer's body and the header
``Idempotent-Replayed: true``; the same id with another body is a 409.

Errors are RFC 9457 problem+json. The grants consumer and the outbox relay run inside the
same process, started and stopped by the FastAPI lifespan.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Final, Self

import asyncpg
import orjson
import structlog
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.config import Settings, load_settings
from services.common.runtime import StartupCancelled, StartupError
from services.ledger import redemptions, reports
from services.ledger.auth import AuthError, KeyRing, Role
from services.ledger.body_limit import BodyLimit
from services.ledger.member_paths import MEMBERS, RawMemberPath, member_of, routed_path
from services.ledger.problem_docs import REFUSED_422, problem, problems
from services.ledger.problem_docs import schemas as problem_schemas
from services.ledger.reads import entries_page, lacks_next_tier, member_view, with_next_tier
from services.ledger.service import LedgerService

log = structlog.get_logger()
PROBLEM = "application/problem+json"
# Database trouble a caller should retry (503), as opposed to a bug (500): the server is
# unreachable or restarting, a connection broke mid-call, a statement was cancelled (a
# statement or lock timeout among them), the transaction lost a deadlock or a
# serialization conflict (nothing of it was kept), the server is out of connections, disk
# or memory, or read-only after a failover: what the consumers retry too (`TRANSIENT`).
UNAVAILABLE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.PostgresSystemError,
    OSError,
)
# Far beyond any real movement, well inside bigint sums: a typo, not an adjustment.
MAX_POINTS = 1_000_000_000


def _default(value: Any) -> str:
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class FastJSON(JSONResponse):
    """orjson instead of the standard library: the member view is the hottest response."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, default=_default)


class Problem(Exception):
    def __init__(self, status: int, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.extra = status, title, detail, extra


def instance(request: Request) -> str:
    """The path as the member routes read it (`RawMemberPath`): a 500 or 503 is answered
    outside that middleware, where the member `m-1/entries` read as m-1's entries."""
    path = request.url.path
    raw = request.scope.get("raw_path")
    if raw and b"%" in raw and path.startswith(MEMBERS):
        return routed_path(raw)
    return path


def problem_response(
    request: Request, status: int, title: str, detail: str, **extra: Any
) -> JSONResponse:
    body = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance(request),
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


# RFC 3339's date-time (section 5.6): the separator and the Z in either case, an offset.
# Python's fromisoformat alone also takes ISO 8601 forms RFC 3339 does not (20261120T...,
# week dates) and refuses a lowercase t or z, which RFC 3339 allows.
_RFC3339: Final = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-](?:[01]\d|2[0-3]):[0-5]\d)"
)


# A '+' sent unencoded in a query string arrives as a space: "...T15:04:05 08:00".
_PLUS_AS_SPACE: Final = re.compile(r"(.*\d) ((?:[01]\d|2[0-3]):[0-5]\d)")


def query_problem(name: str, title: str, detail: str) -> Problem:
    """A 422 about one query parameter, with the `errors` list body validation gives."""
    return Problem(422, title, detail, errors=[{"field": f"query.{name}", "message": detail}])


def parse_instant(raw: str, name: str = "as_of") -> datetime:
    if not _RFC3339.fullmatch(raw):
        plus = _PLUS_AS_SPACE.fullmatch(raw)
        if plus and _RFC3339.fullmatch(f"{plus[1]}+{plus[2]}"):
            detail = (
                f"{raw!r} has a space where its UTC offset's '+' belongs: a '+' in a query"
                f" string must be sent as %2B ({name}={plus[1]}%2B{plus[2]})"
            )
        elif _RFC3339.fullmatch(raw + "Z"):
            detail = f"{name} needs a UTC offset, e.g. 2026-11-20T15:04:05+08:00"
        else:
            detail = f"{raw!r} is not an RFC 3339 timestamp, e.g. 2026-11-20T15:04:05+08:00"
        raise query_problem(name, f"Invalid {name}", detail)
    try:
        moment = datetime.fromisoformat(raw.upper())
    except ValueError as exc:  # well formed, but not a real moment (month 13, ...)
        raise query_problem(
            name, f"Invalid {name}", f"{raw!r} is not an RFC 3339 timestamp"
        ) from exc
    try:
        moment.astimezone(UTC)  # what the database driver does with it
    except OverflowError as exc:  # 0001-01-01T00:00:00+08:00 is before year 1 in UTC
        raise query_problem(
            name, f"Invalid {name}", f"{raw!r} is outside the years 1 to 9999 in UTC"
        ) from exc
    return moment


def parse_period(from_: str | None, to: str | None, now: datetime) -> tuple[datetime, datetime]:
    """A report's [from, to): from the journal's beginning, to now, unless given."""
    start = parse_instant(from_, "from") if from_ else datetime(1970, 1, 1, tzinfo=UTC)
    end = parse_instant(to, "to") if to else now
    if end < start:
        raise query_problem("to", "Invalid period", "`to` is before `from`")
    return start, end


DAILY_DESCRIPTION: Final = (
    "The summary's flows per day: `days`, one for each date of the rule set's time zone"
    " (`timezone`) that [from, to) touches, a day without entries included (zeros), at most"
    f" {reports.MAX_DAYS} (a 422 beyond). Each day has the summary's `issued`, `redeemed`,"
    " `expired`, `revoked`, `adjusted` and `by_rule` (points issued per rule), so the days"
    " of a period add up to its summary, and `stores`: {store id: the same fields} for the"
    " entries made at a store, an expiry counting for the store of the lot's earning entry."
    " Adjustments, and refunds or redemptions sent without a store, count in the day's"
    " totals only. An entry's day is its `occurred_at` on the zone's calendar; a period"
    " that does not start or end at midnight there has partial first and last days. With"
    " `store_id`, that store's entries only."
)


def storable(text: str) -> str:
    """Refuses a NUL, which Postgres's `text` and `jsonb` cannot hold: it reached the
    database and came back a 500. (pydantic already refuses a lone surrogate.)"""
    if "\x00" in text:
        raise ValueError("must not contain a NUL character (\\u0000)")
    return text


# Any string the client sends that reaches the database: the body's and the query's.
Text = Annotated[str, AfterValidator(storable)]
_ID = Field(min_length=1, max_length=200)


class RedemptionBody(BaseModel):
    """Exactly one of ``points``, ``reward`` (catalogue code) or ``cash`` (CNY string)."""

    model_config = ConfigDict(extra="forbid")
    redemption_id: Text = _ID
    # Strict: a JSON true or "7" is a client's bug, not a debit of 1 or 7 points.
    points: int | None = Field(default=None, gt=0, le=MAX_POINTS, strict=True)
    reward: Text | None = Field(default=None, min_length=1)
    cash: str | None = Field(
        default=None,
        pattern=rf"^0*[0-9]{{1,{redemptions.MAX_CASH_DIGITS}}}(\.[0-9]{{1,2}})?$",
        description=f"CNY, at most {redemptions.MAX_CASH_DIGITS} digits and 2 decimals",
    )
    store_id: Text | None = None

    @model_validator(mode="after")
    def _one_amount(self) -> Self:
        given = [n for n in ("points", "reward", "cash") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of points, reward or cash")
        return self


class AdjustmentBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adjustment_id: Text = _ID
    member_id: Text = _ID
    points: int = Field(
        ge=-MAX_POINTS,
        le=MAX_POINTS,
        strict=True,
        description="signed: positive grants, negative deducts",
    )
    reason: Text = Field(min_length=1, max_length=500)
    operator: Text = Field(min_length=1, max_length=200)
    allow_debt: bool = Field(default=False, strict=True)
    # A member the ledger has no record of yet (registered, nothing earned) gets one with
    # a grant only when asked: otherwise a mistyped id would be a new member with points.
    new_member: bool = Field(default=False, strict=True)

    @model_validator(mode="after")
    def _moves(self) -> Self:
        if self.points == 0:
            raise ValueError("an adjustment must move points")
        if self.new_member and self.points < 0:
            raise ValueError("new_member goes with a grant: a new member has nothing to deduct")
        if not self.reason.strip() or not self.operator.strip():
            raise ValueError("an adjustment needs a reason and the operator's id")
        return self


def _written(request: Request, outcome: redemptions.Outcome) -> JSONResponse:
    if outcome.status >= 400:  # a refusal kept as the first answer to its id
        body = dict(outcome.body)
        title, detail = str(body.pop("title")), str(body.pop("detail"))
        resp = problem_response(request, outcome.status, title, detail, **body)
    else:
        resp = JSONResponse(outcome.body, status_code=outcome.status)
    if not outcome.fresh:
        resp.headers["Idempotent-Replayed"] = "true"
    return resp


class Needs:
    """The role a route needs, as a route dependency: FastAPI calls it before it validates
    the query and body, so a caller without the right key learns that (401/403), not what
    the request should have looked like (422)."""

    def __init__(self, keys: KeyRing, role: Role) -> None:
        self.keys, self.role = keys, role

    def __call__(self, authorization: str | None = Header(default=None)) -> None:
        self.keys.require(authorization, self.role)


class Utf8Request(Request):
    """json.loads given bytes also reads UTF-16 and UTF-32 (it guesses from the first
    bytes); the API's bodies are UTF-8 (README), so they are decoded as that first. A
    UTF-8 byte order mark is still skipped, as json.loads did (RFC 8259 allows it)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads((await self.body()).decode("utf-8-sig"))
        return self._json


class Utf8Route(APIRoute):
    """Routes whose handlers read the body as `Utf8Request`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def utf8(request: Request) -> Response:
            return await handler(Utf8Request(request.scope, request.receive))

        return utf8


def unreadable(cause: Exception) -> str:
    """Why a body that is JSON in form could not be read (FastAPI says only that it could
    not be parsed, and answered 400 before the key was checked)."""
    if isinstance(cause, RecursionError):
        return "JSON nested too deeply"
    if isinstance(cause, UnicodeDecodeError):
        return "the body is not valid UTF-8"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "a number of more than 4,300 digits"
    return "the body could not be read as JSON"


def unknown_member(member_id: str) -> Problem:
    return Problem(404, "Member not found", f"no ledger record for member {member_id!r}")


def member_path(member_id: str) -> str:
    """The path's member id, a '/' or '%' of it read back (`RawMemberPath`); one Postgres
    could not hold was never recorded: a 404 like any unknown member's, before the database
    is asked (it refused the id, a 500)."""
    member_id = member_of(member_id)
    try:
        return storable(member_id)
    except ValueError:
        raise unknown_member(member_id) from None


MemberId = Annotated[str, Depends(member_path)]


def needed_role(request: Request) -> Needs | None:
    """The `Needs` of the route a request matched (None: an open route, or none matched)."""
    for dep in getattr(request.scope.get("route"), "dependencies", ()):
        if isinstance(dep.dependency, Needs):
            return dep.dependency
    return None


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    keys = KeyRing.parse(settings.api_keys)
    ledger = LedgerService(settings)

    def needs(role: Role) -> list[Any]:
        return [Depends(Needs(keys, role))]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await ledger.start()
        except StartupCancelled:
            # Stopped while waiting for Postgres, before anything started: uvicorn, whose
            # stop flag is set, shuts down at once (a failed start-up would exit 3).
            log.info("startup_cancelled", reason="asked to stop while waiting for Postgres")
            yield
            return
        except StartupError as exc:
            # Said plainly first: uvicorn then logs the traceback and exits 3.
            log.error("startup_failed", error=str(exc))
            raise
        try:
            yield
        finally:
            await ledger.stop()

    # FastAPI's /openapi.json, /docs and /redoc answer anyone; the contract opens only
    # /healthz, /readyz and /metrics. The document is served below with a reader key; the
    # interactive pages are not (a browser would fetch the document without one).
    app = FastAPI(
        title="Loyalty ledger API",
        version="1",
        lifespan=lifespan,
        description="Balances, tiers, expiring lots and redemptions of clinic members.",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.router.route_class = Utf8Route  # before any route is added
    app.state.ledger = ledger
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RawMemberPath)

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(request, exc.status, exc.title, exc.detail, **exc.extra)

    @app.exception_handler(redemptions.Refused)
    async def _refused(request: Request, exc: redemptions.Refused) -> JSONResponse:
        return problem_response(request, exc.status, exc.title, exc.detail, **exc.extra)

    @app.exception_handler(AuthError)
    async def _auth(request: Request, exc: AuthError) -> JSONResponse:
        resp = problem_response(request, exc.status, exc.title, exc.detail)
        if exc.status == 401:
            resp.headers["WWW-Authenticate"] = "Bearer"
        return resp

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # A body that is not JSON fails before any dependency runs: the key is checked here.
        route = needed_role(request)
        if route is not None:
            try:
                route(request.headers.get("authorization"))
            except AuthError as refused:
                return await _auth(request, refused)
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()
        ]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return problem_response(request, 422, "Invalid request", detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and isinstance(exc.__cause__, Exception):
            # FastAPI's "There was an error parsing the body", for JSON that json.loads
            # refuses other than as a decode error: one more invalid request, after the key.
            error = {"type": "json_invalid", "loc": ("body",), "msg": unreadable(exc.__cause__)}
            return await _invalid(request, RequestValidationError([error]))
        resp = problem_response(request, exc.status_code, str(exc.detail), str(exc.detail))
        resp.headers.update(exc.headers or {})  # a 405's Allow, which RFC 9110 requires
        return resp

    @app.exception_handler(Exception)
    async def _failed(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, UNAVAILABLE):
            log.warning("api_database_unavailable", path=request.url.path, error=repr(exc))
            return problem_response(request, 503, "Database unavailable", "retry shortly")
        log.exception("api_failed", path=request.url.path)
        return problem_response(
            request, 500, "Internal error", "the ledger could not answer; this was logged"
        )

    def pool() -> asyncpg.Pool:
        return ledger.pool

    @app.get(
        "/v1/members/{member_id}",
        dependencies=needs("reader"),
        responses=problems(401, 404, 422, 503),
    )
    async def get_member(
        member_id: MemberId,
        as_of: str | None = Query(default=None, description="RFC 3339 instant"),
    ) -> JSONResponse:
        at = parse_instant(as_of) if as_of is not None else datetime.now(UTC)
        async with pool().acquire() as conn:
            if as_of is not None:
                doc = await ledger.member_as_of(conn, member_id, at)
            else:
                doc = await member_view(conn, member_id, at)
            if doc is not None and lacks_next_tier(doc):  # no tier report yet: the book's
                book = await ledger.rules.recent(conn)
                with_next_tier(doc, book.at(at).tiers)
        if doc is None:
            raise unknown_member(member_id)
        return FastJSON(doc)

    @app.get(
        "/v1/members/{member_id}/entries",
        dependencies=needs("reader"),
        responses=problems(401, 404, 422, 503),
    )
    async def get_entries(
        member_id: MemberId,
        limit: int = Query(default=50, ge=1, le=500),
        cursor: str | None = None,
    ) -> JSONResponse:
        try:
            async with pool().acquire() as conn:
                page = await entries_page(conn, member_id, limit, cursor)
        except ValueError as exc:
            raise query_problem(
                "cursor", "Invalid cursor", "cursor was not issued by this API"
            ) from exc
        if page is None:
            raise unknown_member(member_id)
        return FastJSON(page)

    @app.post(
        "/v1/members/{member_id}/redemptions",
        status_code=201,
        dependencies=needs("redeemer"),
        responses={**problems(401, 403, 404, 409, 413, 503), 422: problem(422, REFUSED_422)},
    )
    async def post_redemption(
        request: Request, member_id: MemberId, body: RedemptionBody
    ) -> JSONResponse:
        now = datetime.now(UTC)
        async with pool().acquire() as conn:
            outcome = await redemptions.redeem(
                conn,
                settings.topics.ledger,
                member_id,
                body.redemption_id,
                points=body.points,
                reward=body.reward,
                cash=body.cash,
                store_id=body.store_id,
                now=now,
                policy=await ledger.rules.policy_at(conn, now),
            )
        if outcome.fresh:
            ledger.wake_relay()
        return _written(request, outcome)

    @app.post(
        "/v1/adjustments",
        status_code=201,
        dependencies=needs("ops"),
        responses={**problems(401, 403, 404, 409, 413, 503), 422: problem(422, REFUSED_422)},
    )
    async def post_adjustment(request: Request, body: AdjustmentBody) -> JSONResponse:
        now = datetime.now(UTC)
        async with pool().acquire() as conn:
            lifetime, zone = await ledger.rules.lifetime_at(conn, now)
            outcome = await redemptions.adjust(
                conn,
                settings.topics.ledger,
                body.adjustment_id,
                member_id=body.member_id,
                points=body.points,
                reason=body.reason.strip(),
                operator=body.operator.strip(),
                allow_debt=body.allow_debt,
                new_member=body.new_member,
                now=now,
                lifetime_months=lifetime,
                zone=zone,
            )
        if outcome.fresh:
            ledger.wake_relay()
        return _written(request, outcome)

    @app.get(
        "/v1/reports/summary",
        dependencies=needs("ops"),
        responses=problems(401, 403, 422, 503),
        description="The owner's figures for [from, to), and a snapshot of now:\n\n"
        + reports.SUMMARY_DEFINITIONS,
    )
    async def get_summary(
        from_: str | None = Query(default=None, alias="from", description="RFC 3339, inclusive"),
        to: str | None = Query(default=None, description="RFC 3339, exclusive; default now"),
        store_id: Text | None = None,
    ) -> JSONResponse:
        now = datetime.now(UTC)
        start, end = parse_period(from_, to, now)
        async with pool().acquire() as conn:
            policy = await ledger.rules.policy_at(conn, now)
            zone = (await ledger.rules.refresh(conn)).at(now).zone
            doc = await reports.summary(conn, start, end, store_id, now, policy, zone)
        return FastJSON(doc)

    @app.get(
        "/v1/reports/daily",
        dependencies=needs("ops"),
        responses=problems(401, 403, 422, 503),
        description=DAILY_DESCRIPTION,
    )
    async def get_daily(
        from_: str = Query(alias="from", description="RFC 3339, inclusive"),
        to: str | None = Query(default=None, description="RFC 3339, exclusive; default now"),
        store_id: Text | None = None,
    ) -> JSONResponse:
        now = datetime.now(UTC)
        start, end = parse_period(from_, to, now)
        async with pool().acquire() as conn:
            zone = (await ledger.rules.refresh(conn)).at(now).zone
            try:
                days = reports.local_days(start, end, zone)
            except ValueError as exc:
                raise query_problem("from", "Invalid period", str(exc)) from None
            doc = await reports.daily(conn, start, end, store_id, days, zone)
        return FastJSON(doc)

    @app.get("/openapi.json", dependencies=needs("reader"), include_in_schema=False)
    async def openapi() -> JSONResponse:
        doc = app.openapi()
        doc["components"]["schemas"].update(problem_schemas())  # the routes' `responses` name
        return JSONResponse(doc)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        checks = await ledger.readiness()
        ok = all(checks.values())
        body = {"status": "ready" if ok else "not ready", "checks": checks}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
