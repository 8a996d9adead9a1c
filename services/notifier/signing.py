"""How a webhook post is signed, and how a receiver checks it (the demo's receiver and
the tests use `verify`; a clinic's receiver does the same in its own language).

The signature covers the timestamp and the body: `sha256=<hex HMAC-SHA256(secret,
"<timestamp>." + body)>`, with the timestamp (Unix seconds) in its own header. A receiver
refuses a post whose timestamp is too far from its clock, so a captured post cannot be
replayed later; within that window it dedupes on the body's `notification_id` (signed;
the `X-Loyalty-Notification-Id` header is not), as it must anyway for at-least-once
delivery.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

SIGNATURE_HEADER: Final = "X-Loyalty-Signature"
TIMESTAMP_HEADER: Final = "X-Loyalty-Timestamp"
TOLERANCE_S: Final = 300
# Unix seconds until the year 33658: a longer timestamp is garbage, not a far future.
MAX_TIMESTAMP_DIGITS: Final = 12


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    secret: str, timestamp: str | None, body: bytes, signature: str | None, now: float,
    tolerance_s: float = TOLERANCE_S,
) -> bool:  # fmt: skip
    """True for a post signed with `secret` whose timestamp is within `tolerance_s` of now.

    False, never an exception, for whatever else the headers hold: this is the receivers'
    reference, and a header is the sender's (or an attacker's) text. The timestamp is at
    most `MAX_TIMESTAMP_DIGITS` ASCII digits (a longer one overflowed a float or int());
    the signature is compared as bytes (compare_digest refuses a non-ASCII str)."""
    if timestamp is None or signature is None or not signature.isascii():
        return False
    if len(timestamp) > MAX_TIMESTAMP_DIGITS or not (timestamp.isascii() and timestamp.isdigit()):
        return False
    if not abs(now - int(timestamp)) <= tolerance_s:  # `not <=`: a NaN clock refuses too
        return False
    expected = sign(secret, int(timestamp), body)
    return hmac.compare_digest(expected.encode(), signature.encode())
