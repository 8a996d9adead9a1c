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
    """Strict: our own events must match the contract exactly."""

    model_config = ConfigDict(frozen=True, extra="forbid")


EventTime = AwareDatetime
