"""Activity events as upstream systems send them: plain JSON dicts of the contract."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

CST = timezone(timedelta(hours=8))


def purchase(
    member: str,
    amount: str,
    at: datetime,
    project: str = "facial-package",
    event_id: str | None = None,
    order_id: str | None = None,
    store: str = "sh-jingan",
) -> dict[str, Any]:
    return {
        "event_id": event_id or str(uuid.uuid4()),
        "type": "purchase",
        "schema_version": 1,
        "occurred_at": at.isoformat(),
        "member_id": member,
        "store_id": store,
        "source": "pos",
        "data": {
            "order_id": order_id or f"o-{uuid.uuid4().hex[:12]}",
            "amount": amount,
            "items": [{"project_code": project, "category": "treatment", "amount": amount}],
        },
    }


def sign_in(member: str, at: datetime) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "type": "check_in",
        "occurred_at": at.isoformat(),
        "member_id": member,
        "store_id": None,
        "source": "app",
        "data": {"kind": "sign_in"},
    }


def refund(member: str, order_id: str, amount: str, at: datetime) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "type": "refund",
        "occurred_at": at.isoformat(),
        "member_id": member,
        "store_id": "sh-jingan",
        "source": "pos",
        "data": {"order_id": order_id, "amount": amount},
    }


def registered(member: str, at: datetime, referrer: str | None = None) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "type": "member_registered",
        "occurred_at": at.isoformat(),
        "member_id": member,
        "store_id": "sh-jingan",
        "source": "crm",
        "data": {"referrer_id": referrer},
    }


def referral(member: str, referrer: str, at: datetime) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "type": "referral",
        "occurred_at": at.isoformat(),
        "member_id": member,
        "store_id": None,
        "source": "app",
        "data": {"referrer_id": referrer},
    }
