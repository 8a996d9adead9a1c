"""`ledgerctl events publish`: each line validated as an activity event before sending."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from aiokafka.errors import MessageSizeTooLargeError
from click.testing import Result
from typer.testing import CliRunner

from services.ctl import events_cmds
from services.ctl.events_cmds import read_events, refused_topic, topic_name
from tests.integration.events import purchase
from tests.unit.test_ctl_errors import run

AT = datetime(2026, 11, 20, 10, tzinfo=timezone(timedelta(hours=8)))
DAY = 86_400


def test_valid_lines_are_keyed_by_member_and_bad_ones_named_by_line_number() -> None:
    good = json.dumps(purchase("m-1", "300.00", AT))
    other = json.dumps(purchase("m-2", "100.00", AT))
    negative = json.dumps(purchase("m-3", "-5", AT))
    batch = read_events([good, "{not json", "", negative, other], AT, DAY)
    assert batch.events == [(1, b"m-1", good.encode()), (5, b"m-2", other.encode())]
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
    dry = run("events", "publish", str(events), "--dry-run",
              env={"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})  # fmt: skip
    assert dry.returncode == 2, dry.stdout + dry.stderr  # it checks the topic, so needs it
    assert dry.stderr.startswith("error: broker: 127.0.0.1:1: ")
    help_text = run("events", "publish", "--help").stdout
    assert "Exit codes: 0 every event sent; 1 some lines refused" in " ".join(help_text.split())


class FakeProducer:
    """Refuses a record over `max_request_size` in `send`, as aiokafka's producer does."""

    def __init__(self, sent: list[tuple[str, bytes, bytes]], max_request_size: int) -> None:
        self.sent, self.max_request_size = sent, max_request_size

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future[None]:
        if len(value) > self.max_request_size:
            raise MessageSizeTooLargeError("larger than the maximum request size")
        self.sent.append((topic, key, value))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def publish(
    monkeypatch: pytest.MonkeyPatch, path: Path, *args: str, topics: set[str] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[Result, list[tuple[str, bytes, bytes]]]:  # fmt: skip
    """The command in this process, against a broker of `topics` (by default the activity
    topic under the prefix in `env`) whose producer takes records up to 10 KB."""
    sent: list[tuple[str, bytes, bytes]] = []
    prefix = (env or {}).get("LOYALTY_TOPIC_PREFIX", "")
    have = {prefix + "loyalty.activity.v1"} if topics is None else topics

    async def missing_topics(bootstrap: str, wanted: set[str]) -> set[str]:
        return wanted - have

    monkeypatch.setattr(events_cmds, "missing_topics", missing_topics)
    monkeypatch.setattr(events_cmds, "make_producer", lambda b: FakeProducer(sent, 10_000))
    monkeypatch.setattr(events_cmds, "MAX_REQUEST_BYTES", 10_000)
    from services.ctl.cli import app

    env = {"COLUMNS": "200", "LOYALTY_TOPIC_PREFIX": "", **(env or {})}
    ran = CliRunner().invoke(app, ["events", "publish", str(path), *args], env=env)
    return ran, sent


def test_a_line_too_big_to_send_is_refused_by_number_and_the_others_sent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    big = purchase("m-2", "100.00", AT)
    big["data"]["items"] = [{"project_code": "p", "category": "c", "amount": "0.01"}] * 250
    lines = [json.dumps(purchase("m-1", "300.00", AT)), json.dumps(big),
             json.dumps(purchase("m-3", "100.00", AT))]  # fmt: skip
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ran, sent = publish(monkeypatch, path)
    assert ran.exit_code == 1, ran.output
    assert [key for _topic, key, _value in sent] == [b"m-1", b"m-3"]
    assert f"refused line 2: too big to send ({len(lines[1])} bytes)" in ran.stderr
    assert ran.stdout.strip() == "sent 2 event(s) to loyalty.activity.v1; 1 line(s) refused"
    # A dry run finds it too (it said "would send 3"): it checks what a real run checks.
    ran, sent = publish(monkeypatch, path, "--dry-run")
    assert (ran.exit_code, sent) == (1, [])
    assert f"refused line 2: too big to send ({len(lines[1])} bytes)" in ran.stderr
    assert ran.stdout.strip() == "would send 2 event(s) to loyalty.activity.v1; 1 line(s) refused"


def test_a_prefix_without_a_dot_names_the_activity_topic_the_services_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(purchase("m-1", "300.00", AT)) + "\n", encoding="utf-8")
    ran, sent = publish(monkeypatch, path, env={"LOYALTY_TOPIC_PREFIX": "stg-"})
    assert ran.exit_code == 0, ran.output
    assert [topic for topic, _key, _value in sent] == ["stg-loyalty.activity.v1"]
    assert refused_topic("stg-loyalty.activity.v1") is None
    assert refused_topic("stg-loyalty.grants.v1") is not None


def test_a_line_dated_ahead_of_now_is_refused_as_the_rules_service_would_dead_letter_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    within = json.dumps(purchase("m-1", "300.00", AT + timedelta(hours=23)))
    ahead = json.dumps(purchase("m-2", "700.00", AT + timedelta(days=3)))
    batch = read_events([within, ahead], AT, DAY)
    assert [key for _line, key, _value in batch.events] == [b"m-1"]
    assert batch.refused[0].startswith("line 2: dated_ahead: occurred_at "), batch.refused
    assert "72.0 h after now" in batch.refused[0]
    assert read_events([ahead], AT, 0).refused == []  # ACTIVITY_MAX_AHEAD_SECONDS=0: no limit

    path = tmp_path / "events.jsonl"
    now = datetime.now(AT.tzinfo)
    lines = [purchase("m-1", "300.00", now), purchase("m-2", "700.00", now + timedelta(days=3))]
    path.write_text("".join(json.dumps(e) + "\n" for e in lines), encoding="utf-8")
    ran, sent = publish(monkeypatch, path)
    assert ran.exit_code == 1, ran.output
    assert [key for _topic, key, _value in sent] == [b"m-1"]
    assert "refused line 2: dated_ahead: " in ran.stderr


def test_dry_run_validates_and_checks_the_topic_and_sends_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(purchase("m-1", "300.00", AT)) + "\n{\n", encoding="utf-8")
    ran, sent = publish(monkeypatch, path, "--dry-run")
    assert (ran.exit_code, sent) == (1, [])
    assert ran.stdout.strip() == "would send 1 event(s) to loyalty.activity.v1; 1 line(s) refused"
    assert "refused line 2: malformed JSON" in ran.stderr


def test_a_topic_the_broker_lacks_is_refused_in_a_dry_run_and_for_an_empty_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """As a real run of lines to send refuses it: nothing would reach the services."""
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(purchase("m-1", "300.00", AT)) + "\n", encoding="utf-8")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    for args in ([str(path), "--dry-run"], [str(empty)], [str(empty), "--dry-run"]):
        ran, sent = publish(monkeypatch, Path(args[0]), *args[1:], topics=set())
        assert (ran.exit_code, sent) == (2, []), (args, ran.output)
        assert "has no topic loyalty.activity.v1; nothing sent" in " ".join(ran.stderr.split())
    ran, _sent = publish(monkeypatch, empty)
    assert (ran.exit_code, ran.stdout.strip()) == (0, "sent 0 event(s) to loyalty.activity.v1")
