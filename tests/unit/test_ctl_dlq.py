"""`ledgerctl dlq list`'s pure parts: --since, the original's preview and JSON form; and
`dlq replay`'s: which letters, each judged by its consumer's model, what is sent."""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from schemas.grants import GrantData, PointsGranted, TierData, TierEvaluated
from schemas.ledger import MovementData, PointsEarned
from services.ctl import dlq_cmds
from services.ctl.dlq_cmds import (
    Letter,
    Verdict,
    judge,
    original_text,
    parse_since,
    preview,
    selection,
    send_order,
)
from tests.integration.events import purchase

NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)
DAY = 86_400
_judge = functools.partial(judge, now=NOW, max_ahead_s=DAY)


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


def _grant(member: str = "m-1", points: int = 40) -> bytes:
    data = GrantData(rule_id="base", ruleset_version="2026.1", points=1, source_event_id="a-1",
                     source_type="purchase")  # fmt: skip
    grant = PointsGranted(event_id="g-1", occurred_at=NOW, member_id=member, data=data)
    doc = grant.model_dump(mode="json")
    doc["data"]["points"] = points  # a negative one as a buggy producer would write it
    return json.dumps(doc).encode()


def _tier_report() -> bytes:
    data = TierData(tier="gold", previous_tier="silver", qualifying_spend="30000.00",
                    tier_valid_until=None, ruleset_version="2026.1", source_event_id="a-2")  # type: ignore[arg-type]  # fmt: skip
    return TierEvaluated(event_id="t-1", occurred_at=NOW, member_id="m-2", data=data)\
        .model_dump_json().encode()  # fmt: skip


def _earned() -> bytes:
    data = MovementData(points=40, balance_after=40)
    return PointsEarned(event_id="e-1", occurred_at=NOW, member_id="m-3", data=data)\
        .model_dump_json().encode()  # fmt: skip


GRANTS, ACTIVITY, LEDGER = "t1.loyalty.grants.v1", "t1.loyalty.activity.v1", "loyalty.ledger.v1"


@pytest.mark.parametrize(
    ("topic", "original", "key"),
    [
        (GRANTS, _grant("m-1"), b"m-1"),
        (ACTIVITY, json.dumps(purchase("m-9", "300.00", NOW)).encode(), b"m-9"),
        (LEDGER, _earned(), b"m-3"),
    ],
)
def test_a_letter_its_consumer_now_takes_is_sent_keyed_by_its_member(
    topic: str, original: bytes, key: bytes
) -> None:
    assert _judge(Letter("d-1", topic, original)) == Verdict(Letter("d-1", topic, original), key)


def test_a_letter_checked_by_the_wrong_topics_model_is_still_bad() -> None:
    """The model is its source topic's: a grant on the activity topic is refused there."""
    verdict = _judge(Letter("d-1", ACTIVITY, _grant()))
    assert verdict.key is None
    assert verdict.still_bad is not None
    assert "unknown event type" in verdict.still_bad


@pytest.mark.parametrize(
    ("original", "says"),
    [
        (_grant(points=-5), "schema violation: points_granted.data.points"),
        (b"{not json", "malformed JSON"),
        (b"\xff\xfe", "malformed JSON"),
    ],
)
def test_a_letter_that_still_fails_is_not_sent_and_says_why(original: bytes, says: str) -> None:
    verdict = _judge(Letter("d-1", GRANTS, original))
    assert (verdict.key, verdict.skipped) == (None, None)
    assert verdict.still_bad is not None
    assert verdict.still_bad.startswith(says)


def test_force_sends_a_still_bad_letter_that_names_its_member_only() -> None:
    forced = _judge(Letter("d-1", GRANTS, _grant("m-7", points=-5)), force=True)
    assert forced.key == b"m-7"
    assert forced.forced
    assert forced.still_bad is not None
    assert "data.points" in forced.still_bad
    keyless = _judge(Letter("d-2", GRANTS, b"{not json"), force=True)
    assert keyless.key is None
    assert keyless.skipped is not None
    assert keyless.skipped.startswith("no member_id to key it by")


def test_a_tier_report_is_skipped_unless_forced_and_a_topic_nobody_reads_always() -> None:
    """A tier report re-sent late would become the member's tier over newer ones."""
    tier = Letter("d-1", GRANTS, _tier_report())
    assert _judge(tier).key is None
    assert "tier report" in (_judge(tier).skipped or "")
    assert _judge(tier, force=True).key == b"m-2"
    dlq = _judge(Letter("d-2", "t1.loyalty.dlq.v1", _grant()), force=True)
    assert dlq.key is None
    assert dlq.skipped == "no service reads t1.loyalty.dlq.v1"


def test_activity_dated_ahead_of_now_is_still_bad_as_the_rules_service_would_refuse_it() -> None:
    """The rules service dead-letters activity dated more than ACTIVITY_MAX_AHEAD_SECONDS
    after the broker received it; sent now, it is received now."""
    ahead = Letter(
        "d-1", ACTIVITY, json.dumps(purchase("m-5", "700", NOW + timedelta(days=3))).encode()
    )
    verdict = _judge(ahead)
    assert (verdict.key, verdict.skipped) == (None, None)
    assert (verdict.still_bad or "").startswith("dated_ahead: occurred_at ")
    assert "72.0 h after now" in (verdict.still_bad or "")
    forced = _judge(ahead, force=True)
    assert (forced.key, forced.forced) == (b"m-5", True)
    within = json.dumps(purchase("m-5", "700", NOW + timedelta(hours=23))).encode()
    assert _judge(Letter("d-2", ACTIVITY, within)).key == b"m-5"
    assert judge(ahead, now=NOW, max_ahead_s=0).key == b"m-5"  # 0: no limit, as for the service


def test_letters_are_named_or_filtered_never_neither_nor_both() -> None:
    assert selection(["d-1", "d-2"], None, None, None) is None
    assert selection([], "ledger", None, None) is None
    assert selection([], None, "24h", None) is None
    assert selection([], None, None, 5) is None
    assert "which letters?" in (selection([], None, None, None) or "")
    assert "--id names the letters" in (selection(["d-1"], "ledger", None, None) or "")
    assert "--id names the letters" in (selection(["d-1"], None, None, 3) or "")


def _row(dlq_id: str, original: bytes, minutes: int, topic: str = GRANTS, offset: int = 0
         ) -> dict[str, Any]:  # fmt: skip
    return {"dlq_id": dlq_id, "consumer": "ledger", "topic": topic, "partition": 0,
            "offset": offset, "reason": "ValueError: bug", "original": original,
            "received_at": NOW + timedelta(minutes=minutes)}  # fmt: skip


def test_letters_go_back_oldest_first() -> None:
    rows = [_row("c", b"", 2), _row("a", b"", 0, offset=9), _row("b", b"", 0, offset=10)]
    assert [r["dlq_id"] for r in send_order(rows)] == ["a", "b", "c"]  # type: ignore[arg-type]


ROWS = [_row("d-new", _grant(points=-5), 5), _row("d-old", _grant("m-1"), 1)]


def _replay(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[Any, list[list[Verdict]]]:
    """The command with the letters above for a database and a recording broker."""
    sent: list[list[Verdict]] = []
    asked: list[Any] = []

    async def send(bootstrap: str, verdicts: list[Verdict]) -> dict[str, str]:
        sent.append(verdicts)
        return {}

    def with_connection(dsn: str, work: Any) -> list[dict[str, Any]]:
        asked.append(work)
        return list(ROWS)

    monkeypatch.setattr(dlq_cmds, "send", send)
    monkeypatch.setattr(dlq_cmds, "with_connection", with_connection)
    from services.ctl.cli import app

    ran = CliRunner().invoke(app, ["dlq", "replay", *args], env={"COLUMNS": "200"})
    assert asked, ran.output
    return ran, sent


def test_replay_sends_the_good_reports_the_bad_and_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    ran, sent = _replay(monkeypatch, "--consumer", "ledger")
    assert ran.exit_code == 1, ran.output
    assert [[(v.letter.dlq_id, v.key) for v in batch] for batch in sent] == [[("d-old", b"m-1")]]
    assert ran.stdout.splitlines() == [
        f"sent d-old to {GRANTS}, key m-1",
        "sent 1, still bad 1, skipped 0",
    ]
    assert ran.stderr.startswith("still bad d-new: schema violation: points_granted.data.points"), (
        ran.stderr
    )


def test_dry_run_sends_nothing_and_says_what_it_would(monkeypatch: pytest.MonkeyPatch) -> None:
    ran, sent = _replay(monkeypatch, "--since", "1h", "--dry-run")
    assert (ran.exit_code, sent) == (1, [])
    assert ran.stdout.splitlines()[-1] == "would send 1, still bad 1, skipped 0"


def test_forced_all_sent_exits_0(monkeypatch: pytest.MonkeyPatch) -> None:
    ran, sent = _replay(monkeypatch, "--id", "d-new", "--id", "d-old", "--force")
    assert ran.exit_code == 0, ran.output
    assert [v.letter.dlq_id for v in sent[0]] == ["d-old", "d-new"]  # oldest first
    assert ran.stdout.splitlines()[-1] == "sent 2 (1 forced), still bad 0, skipped 0"


def test_an_id_not_found_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    ran, _sent = _replay(monkeypatch, "--id", "d-old", "--id", "d-gone", "--id", "d-new")
    assert ran.exit_code == 1
    assert "skipped d-gone: no such dead letter" in ran.stderr
    assert ran.stdout.splitlines()[-1] == "sent 1, still bad 1, skipped 1"


@pytest.mark.parametrize("args", [[], ["--id", "d-1", "--since", "1h"]], ids=str)
def test_no_selection_or_both_kinds_is_refused_input(args: list[str]) -> None:
    from services.ctl.cli import app

    ran = CliRunner().invoke(app, ["dlq", "replay", *args], env={"COLUMNS": "200"})
    assert ran.exit_code == 2
    assert ran.stderr.startswith("error: ")
    assert len(ran.stderr.strip().splitlines()) == 1


def test_an_unreachable_broker_ends_in_one_error_line_and_exit_code_2(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dlq_cmds, "with_connection", lambda dsn, work: list(ROWS))
    from services.ctl.cli import app

    env = {"COLUMNS": "200", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    ran = CliRunner().invoke(app, ["dlq", "replay", "--limit", "5"], env=env)
    assert ran.exit_code == 2, ran.output
    assert ran.stderr.splitlines()[-1].startswith("error: broker: 127.0.0.1:1: "), ran.stderr


@pytest.mark.parametrize("columns", ["250", "100"])
def test_list_shows_the_dlq_id_replay_takes(monkeypatch: pytest.MonkeyPatch, columns: str) -> None:
    dlq_id = "0b4f2d6e-9a51-5c3e-8f7a-2d1e6c9b4a70"  # as letter_id makes them
    rows = [{**_row(dlq_id, _grant(), 1), "original": b"x" * 200}]
    monkeypatch.setattr(dlq_cmds, "with_connection", lambda dsn, work: rows)
    from services.ctl.cli import app

    ran = CliRunner().invoke(app, ["dlq", "list"], env={"COLUMNS": columns})
    assert ran.exit_code == 0, ran.output
    assert "dlq_id" in ran.stdout
    assert dlq_id in ran.stdout  # whole, on one line: copied into `dlq replay --id`
