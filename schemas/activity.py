"""Activity events on `loyalty.activity.v1`, published by POS, booking and app systems."""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import BeforeValidator, ConfigDict, Field, TypeAdapter, model_validator
from pydantic.config import JsonDict

from schemas.envelope import STORED, Amount, EventTime, Id, Inbound, Label

ACTIVITY_TOPIC = "loyalty.activity.v1"


class PurchaseItem(Inbound):
    project_code: Id
    category: Label = ""
    amount: Amount


class _Activity(Inbound):
    event_id: Id
    # A different version is a breaking change, which the contract puts on a new topic:
    # on this one it is refused (dead-lettered) rather than read as version 1.
    schema_version: Literal[1] = 1
    occurred_at: EventTime
    member_id: Id
    store_id: Label | None = None
    source: Label | None = None


def _blank_is_none(value: object) -> object:
    return None if value == "" else value


class MemberRegisteredData(Inbound):
    # A till sends "" for "nobody": that named a referrer "" and paid a referral bonus.
    referrer_id: Annotated[
        Label | None,
        BeforeValidator(_blank_is_none),
        Field(description="the referring member; empty or absent: none"),
    ] = None
    birthday: str | None = Field(default=None, pattern=r"^(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])$")


class MemberRegistered(_Activity):
    type: Literal["member_registered"]
    data: MemberRegisteredData = MemberRegisteredData()


class PurchaseData(Inbound):
    order_id: Id
    amount: Amount
    items: list[PurchaseItem] = []


class Purchase(_Activity):
    type: Literal["purchase"]
    data: PurchaseData


class RefundData(Inbound):
    order_id: Id
    amount: Amount


class Refund(_Activity):
    type: Literal["refund"]
    data: RefundData


# What `_a_visit_names_its_booking` checks, in the published schema.
_VISIT_NEEDS_ITS_BOOKING: JsonDict = {
    "if": {"properties": {"kind": {"const": "visit"}}, "required": ["kind"]},
    "then": {
        "required": ["booking_id", "booked_at", "slot_start"],
        "properties": {
            "booking_id": {"type": "string"},
            "booked_at": {"type": "string"},
            "slot_start": {"type": "string"},
        },
    },
}


class CheckInData(Inbound):
    model_config = ConfigDict(json_schema_extra=_VISIT_NEEDS_ITS_BOOKING)

    kind: Literal["visit", "sign_in"]
    booking_id: Label | None = None
    booked_at: EventTime | None = None
    slot_start: EventTime | None = None
    arrived_at: EventTime | None = None  # a visit's: None = missed

    @model_validator(mode="after")
    def _a_visit_names_its_booking(self) -> Self:
        """A visit is judged against its booking (lead time, punctuality): without one it
        could only be paid nothing, silently, so it is refused (dead-lettered) instead."""
        if self.kind == "visit":
            missing = [n for n in ("booking_id", "booked_at", "slot_start")
                       if getattr(self, n) is None]  # fmt: skip
            if missing:
                raise ValueError(f"a visit needs {', '.join(missing)}")
        return self


class CheckIn(_Activity):
    type: Literal["check_in"]
    data: CheckInData


class ReviewData(Inbound):
    review_id: Id
    order_id: Label | None = None
    rating: int = Field(ge=1, le=5)
    featured: bool = False
    suggestion_adopted: bool = False


class Review(_Activity):
    type: Literal["review"]
    data: ReviewData


class ShareData(Inbound):
    share_id: Id
    channel: Label = ""
    approved: bool = False
    likes: int = Field(default=0, ge=0)


class Share(_Activity):
    type: Literal["share"]
    data: ShareData


class ReferralData(Inbound):
    referrer_id: Id


class Referral(_Activity):
    type: Literal["referral"]
    data: ReferralData


Activity = Annotated[
    MemberRegistered | Purchase | Refund | CheckIn | Review | Share | Referral,
    Field(discriminator="type"),
]
ACTIVITY_TYPES = (MemberRegistered, Purchase, Refund, CheckIn, Review, Share, Referral)

activity_adapter: TypeAdapter[Activity] = TypeAdapter(Activity)


def parse_activity(raw: bytes | str, *, stored: bool = False) -> Activity:
    """Raises pydantic.ValidationError on malformed JSON, unknown type or bad fields.

    `stored`: an event read back from our own tables, which passed the contract when it
    arrived: bounds added to the contract since do not apply (`envelope.STORED`)."""
    return activity_adapter.validate_json(raw, context=STORED if stored else None)
