"""The envelope every topic shares: id, type, version, event time, member."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, PlainSerializer


def _non_negative(v: Decimal) -> Decimal:
    if v < 0:
        raise ValueError("amount must not be negative")
    return v


# Amounts travel as decimal strings ("2500.00"): floats would lose fen.
Money = Annotated[
    Decimal,
    AfterValidator(_non_negative),
    PlainSerializer(lambda v: format(v, "f"), return_type=str, when_used="json"),
]


class Inbound(BaseModel):
    """Tolerant: extra fields from upstream are kept, never fatal."""

    model_config = ConfigDict(frozen=True, extra="allow")


class Internal(BaseModel):
    """Our own events (grants, ledger events). Read tolerantly: CONTRACT.md lets a producer
    add fields, so a consumer ignores one it does not know rather than dead-lettering the
    event, and the published JSON schemas do not forbid them. A typo in our own code that
    builds one is caught by mypy instead (pydantic plugin, `init_forbid_extra`)."""

    model_config = ConfigDict(frozen=True, extra="ignore")


EventTime = AwareDatetime
