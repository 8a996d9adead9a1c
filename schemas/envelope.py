"""The envelope every topic shares: id, type, version, event time, member."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Final

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationInfo,
    WithJsonSchema,
)
from pydantic.config import JsonDict
from pydantic_core import PydanticCustomError


def _non_negative(v: Decimal) -> Decimal:
    if v < 0:
        raise ValueError("amount must not be negative")
    return v


# No clinic takes an order of a trillion CNY: such an amount is a unit or typing error
# upstream, dead-lettered rather than paid (and summed into spend the ledger stores).
MAX_AMOUNT: Final = Decimal(10) ** 12


def _below_a_trillion(v: Decimal) -> Decimal:
    if not v < MAX_AMOUNT:  # NaN and infinity are refused by the Decimal parse already
        raise ValueError("amount must be below 1,000,000,000,000 CNY")
    return v


# The ledger keeps spend to the fen (numeric(20,2)): a finer amount, kept exactly by the
# rules, was rounded there ("9999.995" stored as 10000.00, a silver spend the rules did not
# count). Zeros past the fen change nothing and are taken. An event the rules kept before
# the bound (`STORED`) is read back without it.
CENT: Final = Decimal("0.01")


def _to_the_fen(v: Decimal, info: ValidationInfo) -> Decimal:
    if v == v.quantize(CENT) or _stored(info):
        return v
    raise PydanticCustomError("decimal_max_places", "Amount should have at most two decimals")


# What the ledger's spend columns hold (numeric(20,2), migration 0019). A larger value
# must be refused here: asyncpg encodes a Decimal of a huge exponent (1E+131072) as 0
# without a word, so a tier report of such a spend was stored as 0.00, not dead-lettered.
MAX_MONEY: Final = Decimal(10) ** 18


def _below_a_quintillion(v: Decimal) -> Decimal:
    if not v < MAX_MONEY:
        raise ValueError("amount must be below 10^18 CNY")
    return v


# Amounts travel as decimal strings ("2500.00"): floats would lose fen. The published
# schema says so (a JSON number is read too, but is not what the contract promises), and
# it says non-negative, which the validator enforces and a plain `string` would not.
Money = Annotated[
    Decimal,
    AfterValidator(_non_negative),
    AfterValidator(_below_a_quintillion),
    PlainSerializer(lambda v: format(v, "f"), return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^[0-9]{1,18}(\.[0-9]+)?$",
            "description": 'a non-negative decimal amount in CNY below 10^18, e.g. "2500.00"',
        }
    ),
]

# An amount upstream sends (a purchase, an item, a refund): Money below a trillion CNY.
Amount = Annotated[
    Decimal,
    AfterValidator(_non_negative),
    AfterValidator(_below_a_trillion),
    AfterValidator(_to_the_fen),
    PlainSerializer(lambda v: format(v, "f"), return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^[0-9]{1,12}(\.[0-9]{1,2}0*)?$",
            "description": "a decimal amount in CNY from 0 to below a trillion, at most two"
            ' decimals besides trailing zeros, e.g. "2500.00"',
        }
    ),
]


# Ids and labels upstream sends (member, store, order, booking, project code, ...). The rules
# service copies them into grants, the ledger into its events, with ~170 bytes of fields
# around them: unbounded, an activity just under the broker's record limit (Apache Kafka's
# `message.max.bytes`, ~1 MB) was accepted and its grant refused, holding the relay. No
# upstream id comes near 200 characters; the ledger API takes ids of the same length.
# No NUL either: Postgres's text columns refuse it, so an order or store id holding one
# was paid by the rules (their state is JSON, which takes it) and every grant of it then
# dead-lettered by the ledger, the points lost; an order re-sent without it was a
# duplicate by then. Refused here, by the service that receives it.
MAX_ID_CHARS: Final = 200
NO_NUL: Final = r"^[^\x00]*$"
# Validation context for an event read back from our own tables (`rules_activity`,
# `rules_held`): it passed the contract as it stood when it arrived, and the rules acted
# on it, so a bound added since must not refuse it now (a referral paid late re-reads the
# referee's stored purchase; refused, the referrer's own event was dead-lettered).
STORED: Final = {"stored": True}


def _stored(info: ValidationInfo) -> bool:
    context = info.context
    return isinstance(context, dict) and context.get("stored") is True


def _bounded(v: str, info: ValidationInfo) -> str:
    if len(v) > MAX_ID_CHARS:
        if _stored(info):
            return v
        raise PydanticCustomError(
            "string_too_long",
            "String should have at most {max_length} characters",
            {"max_length": MAX_ID_CHARS},
        )
    if "\x00" in v and not _stored(info):
        raise PydanticCustomError("string_pattern_mismatch", "String should hold no NUL")
    return v


Id = Annotated[
    str,
    Field(min_length=1),
    AfterValidator(_bounded),
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS,
                    "pattern": NO_NUL}),
]  # fmt: skip
# The same bounds where the contract lets the string be empty (a category, a channel).
Label = Annotated[
    str,
    AfterValidator(_bounded),
    WithJsonSchema({"type": "string", "maxLength": MAX_ID_CHARS, "pattern": NO_NUL}),
]


class Inbound(BaseModel):
    """Tolerant: extra fields from upstream are kept, never fatal."""

    model_config = ConfigDict(frozen=True, extra="allow")


# A field added to an event after its v1 schema was published: the events already in the
# topics lack it, so the published schema must not require it (CONTRACT.md: adding fields
# is fine), though we always write it now. Marked in the schema, and left out of
# `required` by `Internal`'s schema hook.
ADDED_LATER: Final[JsonDict] = {"x-added-later": True}


def _added_fields_optional(schema: JsonDict, _model: type[BaseModel]) -> None:
    properties = schema.get("properties")
    required = schema.get("required")
    if not isinstance(properties, dict) or not isinstance(required, list):
        return
    later = {k for k, v in properties.items() if isinstance(v, dict) and v.get("x-added-later")}
    if later:
        schema["required"] = [name for name in required if name not in later]


class Internal(BaseModel):
    """Our own events (grants, ledger events). Read tolerantly: CONTRACT.md lets a producer
    add fields, so a consumer ignores one it does not know rather than dead-lettering the
    event, and the published JSON schemas do not forbid them. A typo in our own code that
    builds one is caught by mypy instead (pydantic plugin, `init_forbid_extra`)."""

    # The published schema of what we write lists the fields we always write (`type`,
    # `schema_version`, ...) as required, though the models give them defaults.
    model_config = ConfigDict(
        frozen=True,
        extra="ignore",
        json_schema_serialization_defaults_required=True,
        json_schema_extra=_added_fields_optional,
    )


# RFC 3339 with its UTC offset: the pattern says "with an offset" to a validator that
# does not check `format` (most do not by default), as the model refuses a time without.
_RFC3339_TAIL: Final = r"-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"
# The times of our own events (grants, ledger events, dead letters): what the services
# wrote, read back as written, so no bound a later release adds refuses one already out.
InternalTime = Annotated[
    AwareDatetime,
    WithJsonSchema(
        {"type": "string", "format": "date-time", "pattern": rf"^\d{{4}}{_RFC3339_TAIL}"}
    ),
]

# Activity's times are bounded, as written (in their own offset): the rules reach 20 years
# back and forth from one (tier windows, kept history, pending days, lot lifetimes) and
# into the shared zone, so year 1 passed the schema and the model and then overflowed
# (OverflowError, dead-lettered as a `processing_error`). Nothing a clinic does happens
# before 1970 or after 2999. An event the rules kept before the bound (`STORED`) is read
# back without it.
MIN_YEAR: Final = 1970
MAX_YEAR: Final = 2999


def _in_years(v: datetime, info: ValidationInfo) -> datetime:
    if MIN_YEAR <= v.year <= MAX_YEAR or _stored(info):
        return v
    raise PydanticCustomError(
        "datetime_out_of_range",
        "Datetime should be within the years {min_year} to {max_year}",
        {"min_year": MIN_YEAR, "max_year": MAX_YEAR},
    )


EventTime = Annotated[
    AwareDatetime,
    AfterValidator(_in_years),
    WithJsonSchema(
        {
            "type": "string",
            "format": "date-time",
            "pattern": rf"^(19[7-9]\d|2\d{{3}}){_RFC3339_TAIL}",
            "description": f"years {MIN_YEAR} to {MAX_YEAR}, with a UTC offset",
        }
    ),
]
