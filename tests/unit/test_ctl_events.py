"""`ledgerctl events publish`: each line validated as an activity event before sending."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from services.ctl.events_cmds import read_events, topic_name
from tests.integration.events import purchase
from tests.unit.test_ctl_errors import run

AT = datetime(2026, 11, 20, 10, tzinfo=timezone(timedelta(hours=8)))


def test_valid_lines_are_keyed_by_member_and_bad_ones_named_by_line_number() -> None:
    good = json.dumps(purchase("m-1", "300.00", AT))
    other = json.dumps(purchase("m-2", "100.00", AT))
    negative = json.dumps(purchase("m-3", "-5", AT))
    batch = read_events([good, "{not json", "", negative, other])
    assert batch.events == [(b"m-1", good.encode()), (b"m-2", other.encode())]
    assert [p.split(":")[0] for p in batch.refused] == ["line 2", "line 4"]
    assert "malformed JSON" in batch.refused[0]
    assert "schema violation" in batch.refused[1]
    assert "amount" in batch.refused[1]


def test_the_topic_prefix_is_added_once() -> None:
    assert topic_name("loyalty.activity.v1", "") == "loyalty.activity.v1"
    assert topic_name("loyalty.activity.v1", "t1.") == "t1.loyalty.activity.v1"
    assert topic_name("t1.loyalty.activity.v1", "t1.") == "t1.loyalty.activity.v1"


def test_an_unreachable_broker_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps(purchase("m-1", "300.00", AT)) + "\n", encoding="utf-8")
    ran = run("events", "publish", str(events), env={"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert ran.stderr.startswith("error: broker: 127.0.0.1:1: ")
    assert len(ran.stderr.strip().splitlines()) == 1, ran.stderr
    help_text = run("events", "publish", "--help").stdout
    assert "Exit codes: 0 every event sent; 1 some lines refused" in " ".join(help_text.split())


def test_dry_run_validates_only(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps(purchase("m-1", "300.00", AT)) + "\n{\n", encoding="utf-8")
    ran = run("events", "publish", str(events), "--dry-run",
              env={"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})  # fmt: skip
    assert ran.returncode == 1
    assert "would send 1 event(s) to loyalty.activity.v1; 1 line(s) refused" in ran.stdout
    assert "refused line 2: malformed JSON" in ran.stderr
