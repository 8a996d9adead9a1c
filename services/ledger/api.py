"""The ledger's HTTP API (CONTRACT.md): member views, entries, redemptions, health, metrics.

Errors are RFC 9457 problem+json. The grants consumer and the outbox relay run inside the
same process, started and stopped by the FastAPI lifespan.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog
from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.config import Settings, load_settings
from services.ledger.auth import AuthError, KeyRing
from services.ledger.reads import entries_page, member_view
from services.ledger.service import LedgerService

log = structlog.get_logger()
PROBLEM = "application/problem+json"


class Problem(Exception):
    def __init__(self, status: int, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.extra = status, title, detail, extra


def problem_response(
    request: Request, status: int, title: str, detail: str, **extra: Any
) -> JSONResponse:
    body = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


def parse_instant(raw: str) -> datetime:
    try:
        value = datetime.fromisoformat(raw)
    except ValueError as exc:
        raise Problem(422, "Invalid as_of", f"{raw!r} is not an RFC 3339 timestamp") from exc
    if value.tzinfo is None:
        raise Problem(
            422, "Invalid as_of", "as_of needs a UTC offset, e.g. 2026-11-20T15:04:05+08:00"
        )
    return value


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    keys = KeyRing.parse(settings.api_keys)
    ledger = LedgerService(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await ledger.start()
        try:
            yield
        finally:
            await ledger.stop()

    app = FastAPI(
        title="Loyalty ledger API",
        version="1",
        lifespan=lifespan,
        description="Balances, tiers, expiring lots and redemptions of clinic members.",
    )
    app.state.ledger = ledger

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(request, exc.status, exc.title, exc.detail, **exc.extra)

    @app.exception_handler(AuthError)
    async def _auth(request: Request, exc: AuthError) -> JSONResponse:
        resp = problem_response(request, exc.status, exc.title, exc.detail)
        if exc.status == 401:
            resp.headers["WWW-Authenticate"] = "Bearer"
        return resp

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()
        ]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return problem_response(request, 422, "Invalid request", detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem_response(request, exc.status_code, str(exc.detail), str(exc.detail))

    @app.exception_handler(asyncpg.PostgresConnectionError)
    async def _db_down(request: Request, exc: Exception) -> JSONResponse:
        return problem_response(request, 503, "Database unavailable", "retry shortly")

    def pool() -> asyncpg.Pool:
        return ledger.pool

    @app.get("/v1/members/{member_id}")
    async def get_member(
        member_id: str,
        as_of: str | None = Query(default=None, description="RFC 3339 instant"),
        authorization: str | None = Header(default=None),
    ) -> JSONResponse:
        keys.require(authorization, "reader")
        async with pool().acquire() as conn:
            if as_of is not None:
                doc = await ledger.member_as_of(conn, member_id, parse_instant(as_of))
            else:
                doc = await member_view(conn, member_id, datetime.now(UTC))
        if doc is None:
            raise Problem(404, "Member not found", f"no ledger record for member {member_id!r}")
        return JSONResponse(doc)

    @app.get("/v1/members/{member_id}/entries")
    async def get_entries(
        member_id: str,
        limit: int = Query(default=50, ge=1, le=500),
        cursor: str | None = None,
        authorization: str | None = Header(default=None),
    ) -> JSONResponse:
        keys.require(authorization, "reader")
        try:
            async with pool().acquire() as conn:
                page = await entries_page(conn, member_id, limit, cursor)
        except ValueError as exc:
            raise Problem(422, "Invalid cursor", "cursor was not issued by this API") from exc
        return JSONResponse(page)

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
