"""The API's errors as its OpenAPI document describes them.

FastAPI documents a 422 as its own `HTTPValidationError` in application/json and no other
error, while every error of this API is an RFC 9457 application/problem+json body, a 422's
with `errors` (api.problem_response). A client generated from the document would have read
none of them.
"""

from __future__ import annotations

from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

PROBLEM: Final = "application/problem+json"
MEANING: Final = {
    401: "No key, or one the ledger does not know (with `WWW-Authenticate: Bearer`)",
    403: "The key's role is below the one the route needs",
    404: "A member the ledger has no record of",
    409: "The id was used before with another body, or the balance is short",
    413: "A body longer than LEDGER_MAX_BODY_BYTES, refused before the key is checked",
    422: "An invalid request: `errors` names each field",
    500: "An unexpected failure, logged; nothing of the internals is said",
    503: "The database is unavailable: retry shortly",
}
# A write's 422 is also the ledger's own refusal, which names no field.
REFUSED_422: Final = (
    "An invalid request (`errors` names each field), or one the ledger refuses: a"
    " redemption under the minimum balance (`minimum`) or of a reward not in the catalogue"
    " (`catalogue`), an adjustment its accounting cannot make"
)


class FieldError(BaseModel):
    field: str = Field(
        description="`body.<name>` or `query.<name>`; `body` (or `body.<offset>`) for a body"
        " that could not be read as JSON"
    )
    message: str


class ProblemDetails(BaseModel):
    """Some problems carry more members, e.g. a short redemption's `available`."""

    model_config = ConfigDict(title="Problem", extra="allow")
    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str = Field(description="the request's path")
    errors: list[FieldError] = Field(
        default_factory=list,
        description="a 422 for an invalid request only: what is wrong with each field",
    )


def problem(status: int, meaning: str | None = None) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/Problem"}
    return {"description": meaning or MEANING[status], "content": {PROBLEM: {"schema": schema}}}


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's `responses`: its problems, and the 500 any route may answer."""
    return {status: problem(status) for status in (*statuses, 500)}


def schemas() -> dict[str, Any]:
    """`Problem` and what it refers to, for the document's components."""
    doc = ProblemDetails.model_json_schema(ref_template="#/components/schemas/{model}")
    return {**doc.pop("$defs"), "Problem": doc}
