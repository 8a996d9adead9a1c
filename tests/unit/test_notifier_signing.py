"""The webhook signature covers the timestamp and the body; a receiver refuses a post
whose timestamp is stale (a captured post replayed later), altered, or missing."""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

import pytest

from services.common.config import ConfigError, Settings
from services.notifier.app import check_webhook, create_app
from services.notifier.signing import TOLERANCE_S, sign, verify

SECRET = "s3cret"
BODY = b'{"notification_id": "n-1"}'


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    mac = hmac.new(SECRET.encode(), b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, 1700000000, BODY) == "sha256=" + mac


def test_a_fresh_post_signed_with_the_secret_is_accepted() -> None:
    sig = sign(SECRET, 1700000000, BODY)
    assert verify(SECRET, "1700000000", BODY, sig, now=1700000000 + TOLERANCE_S)


def test_a_replayed_altered_or_unsigned_post_is_refused() -> None:
    sig = sign(SECRET, 1700000000, BODY)
    assert not verify(SECRET, "1700000000", BODY, sig, now=1700000000 + TOLERANCE_S + 1)
    assert not verify(SECRET, "1700000001", BODY, sig, now=1700000000)  # moved timestamp
    assert not verify(SECRET, "1700000000", BODY + b" ", sig, now=1700000000)
    assert not verify("other", "1700000000", BODY, sig, now=1700000000)
    assert not verify(SECRET, None, BODY, sig, now=1700000000)
    assert not verify(SECRET, "²", BODY, sig, now=1700000000)  # a digit, but not ASCII
    assert not verify(SECRET, "1700000000", BODY, None, now=1700000000)
    assert not verify(SECRET, "-5", BODY, sig, now=1700000000)


def test_malformed_headers_are_refused_not_raised() -> None:
    """The reference receiver answers False to anything a sender (or an attacker) can put
    in the headers; it raised on these, a 500 in a receiver built on it."""
    now = 1700000000
    sig = sign(SECRET, now, BODY)
    for timestamp, signature in [
        (str(now), "sha256=\u00e9"),  # a latin-1 header byte: compare_digest refused str
        (str(now), sig[:-1] + "\u00e9"),
        ("9" * 5000, sig),  # int() refuses more than 4,300 digits
        ("1" + "0" * 400, sig),  # too large for a float
        ("1" + "0" * 12, sig),  # more digits than any Unix time in seconds needs
        ("", sig),
    ]:
        assert verify(SECRET, timestamp, BODY, signature, now=now) is False, timestamp[:20]
    assert verify(SECRET, str(now), BODY, sig, now=float("nan")) is False
    assert verify(SECRET, str(now), BODY, sig, now=now) is True


def test_the_notifier_refuses_to_post_unsigned() -> None:
    import pytest

    from services.common.config import Settings
    from services.notifier.app import create_app

    settings = Settings(database_url="", bootstrap_servers="127.0.0.1:1",
                        webhook_url="http://clinic.example/hook", webhook_secret="")  # fmt: skip
    with pytest.raises(SystemExit, match="NOTIFIER_WEBHOOK_SECRET must be set"):
        create_app(settings)


def test_receivers_are_told_to_dedupe_on_the_signed_notification_id() -> None:
    """Only the timestamp and the body are signed: a header is whatever the sender put
    there, so a replay with another `X-Loyalty-Notification-Id` verifies all the same. The
    README must name the body's `notification_id`, which the signature covers."""
    sig = sign(SECRET, 1700000000, BODY)
    assert verify(SECRET, "1700000000", BODY, sig, now=1700000000)  # whatever the headers
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    advice = re.findall(r"receivers\s+dedupe on ([^.]*)", readme)
    assert advice, "README no longer tells webhook receivers what to dedupe on"
    assert all("notification_id" in a and "Notification-Id" not in a for a in advice), advice


@pytest.mark.parametrize(
    "url",
    ["htps://clinic.example/hook", "https://", "https:///hook", "clinic.example/hook",
     "ftp://clinic.example/hook", "http://clinic.example:port/hook", "http://[::1/hook"],
)  # fmt: skip
def test_the_notifier_refuses_a_webhook_url_no_post_can_reach(url: str) -> None:
    """Taken, a mistyped URL failed every post, each retried until given up, silently."""
    settings = Settings(database_url="", bootstrap_servers="127.0.0.1:1",
                        webhook_url=url, webhook_secret="s3cret")  # fmt: skip
    with pytest.raises(ConfigError, match=r"NOTIFIER_WEBHOOK_URL=.*must be an http"):
        create_app(settings)


def test_a_refused_webhook_url_is_shown_without_its_query_or_password() -> None:
    with pytest.raises(ConfigError) as refused:
        check_webhook("htps://ops:hunter2@clinic.example/hook?token=abc")
    assert str(refused.value.code) == (
        "NOTIFIER_WEBHOOK_URL=htps://ops:***@clinic.example/hook:"
        " must be an http:// or https:// URL with a host"
    )


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "https://clinic.example/hook?t=1"])
def test_a_webhook_url_with_a_scheme_and_host_is_taken(url: str) -> None:
    check_webhook(url)
