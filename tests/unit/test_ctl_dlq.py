"""`ledgerctl dlq list`'s pure parts: --since, the original's preview and JSON form."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import typer

from services.ctl.dlq_cmds import original_text, parse_since, preview

NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("given", "start"),
    [
        ("30m", NOW - timedelta(minutes=30)),
        ("24h", NOW - timedelta(hours=24)),
        ("7d", NOW - timedelta(days=7)),
        ("2026-11-20T15:04:05+08:00", datetime(2026, 11, 20, 7, 4, 5, tzinfo=UTC)),
        ("2026-11-20T07:04:05Z", datetime(2026, 11, 20, 7, 4, 5, tzinfo=UTC)),
    ],
)
def test_since_is_a_time_or_a_span_back_from_now(given: str, start: datetime) -> None:
    assert parse_since(given, NOW) == start


@pytest.mark.parametrize("given", ["yesterday", "2026-11-20T15:04:05", "7w"])
def test_since_without_offset_or_unit_is_refused(given: str) -> None:
    with pytest.raises(typer.BadParameter):
        parse_since(given, NOW)


def test_preview_is_one_line_of_the_first_80_bytes() -> None:
    assert preview(b'{"a":\n1}') == '{"a":\\n1}'
    long = b"x" * 100
    assert preview(long) == "x" * 80 + "…"
    # A character cut at byte 80 is dropped, not shown as garbage.
    assert preview(b"x" * 79 + "积分".encode()) == "x" * 79 + "…"
    assert preview(b"\xff\xfe{") == "\\xff\\xfe{"


def test_json_keeps_the_whole_original_as_the_dlq_topic_does() -> None:
    assert original_text(b'{"a": "\xe7\xa7\xaf"}') == ('{"a": "积"}', "utf-8")
    assert original_text(b"\xff\x00") == ("/wA=", "base64")
