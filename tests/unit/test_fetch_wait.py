"""How long consumers let the broker hold an empty fetch, per broker (deploy/brokers.py).

Measured on this machine (bench/README.md, step 18): on Apache Kafka a 500 ms hold gave
the same one-hop latency as 5 ms (p50 3.2 against 3.1 ms at 1,000 events/s), while an
idle stack's CPU fell from ~90 % of a core to ~19 %; on Tansu a 500 ms hold put p50 at
130 ms, so stacks on Tansu keep 5 ms.
"""

from __future__ import annotations

import pytest

from deploy import local
from deploy.stack import build_env
from services.common.config import load_settings


def test_services_default_to_kafkas_own_fetch_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONSUMER_FETCH_WAIT_MS", raising=False)
    assert load_settings().fetch_wait_ms == 500
    monkeypatch.setenv("CONSUMER_FETCH_WAIT_MS", "40")
    assert load_settings().fetch_wait_ms == 40


def test_stacks_on_tansu_hold_fetches_briefly_and_a_hand_set_value_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CONSUMER_FETCH_WAIT_MS", raising=False)
    assert local.consumer_env("tansu") == {"CONSUMER_FETCH_WAIT_MS": "5"}
    assert local.consumer_env("kafka") == {"CONSUMER_FETCH_WAIT_MS": "500"}
    # A broker `make up` did not start: nothing is known of it, Kafka's default applies.
    assert local.consumer_env("external") == {"CONSUMER_FETCH_WAIT_MS": "500"}
    monkeypatch.setenv("CONSUMER_FETCH_WAIT_MS", "50")
    assert local.consumer_env("tansu") == {"CONSUMER_FETCH_WAIT_MS": "50"}


def test_make_up_writes_the_fetch_wait_into_stack_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONSUMER_FETCH_WAIT_MS", raising=False)
    dsn = "postgresql://loyalty:loyalty@127.0.0.1:55432/loyalty"
    tansu = build_env({}, dsn, "tansu", "127.0.0.1:19092")
    kafka = build_env({}, dsn, "kafka", "127.0.0.1:19092")
    assert tansu["CONSUMER_FETCH_WAIT_MS"] == "5"
    assert kafka["CONSUMER_FETCH_WAIT_MS"] == "500"


def test_a_plain_make_up_keeps_the_fetch_wait_the_last_one_wrote(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """README: settings stick. `CONSUMER_FETCH_WAIT_MS=50 make up`, then a plain `make up`
    (a service died) wrote 5 again, and every service was restarted for the change."""
    monkeypatch.delenv("CONSUMER_FETCH_WAIT_MS", raising=False)
    previous = {"BROKER": "tansu", "CONSUMER_FETCH_WAIT_MS": "50"}
    assert local.consumer_env("tansu", previous) == {"CONSUMER_FETCH_WAIT_MS": "50"}
    # Set by hand, it follows a switch of broker too; a kind's default does not.
    assert local.consumer_env("kafka", previous) == {"CONSUMER_FETCH_WAIT_MS": "50"}
    tansu_default = {"BROKER": "tansu", "CONSUMER_FETCH_WAIT_MS": "5"}
    assert local.consumer_env("kafka", tansu_default) == {"CONSUMER_FETCH_WAIT_MS": "500"}
    assert local.consumer_env("tansu", tansu_default) == {"CONSUMER_FETCH_WAIT_MS": "5"}
    # `make demo` wrote its own stack.env: nothing of it sticks.
    demo = {**previous, "STACK_WRITER": "demo"}
    assert local.consumer_env("tansu", demo) == {"CONSUMER_FETCH_WAIT_MS": "5"}
    # Given again it changes; given empty it goes back to the broker's default.
    monkeypatch.setenv("CONSUMER_FETCH_WAIT_MS", "80")
    assert local.consumer_env("tansu", previous) == {"CONSUMER_FETCH_WAIT_MS": "80"}
    monkeypatch.setenv("CONSUMER_FETCH_WAIT_MS", "")
    assert local.consumer_env("tansu", previous) == {"CONSUMER_FETCH_WAIT_MS": "5"}


def test_make_up_writes_the_kept_fetch_wait_into_stack_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("CONSUMER_FETCH_WAIT_MS", "DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS"):
        monkeypatch.delenv(var, raising=False)
    dsn = "postgresql://loyalty:loyalty@127.0.0.1:55432/loyalty"
    first = build_env({"BROKER": "tansu", "CONSUMER_FETCH_WAIT_MS": "50"}, dsn, "tansu", "h:1")
    assert first["CONSUMER_FETCH_WAIT_MS"] == "50"
    assert build_env(first, dsn, "tansu", "h:1")["CONSUMER_FETCH_WAIT_MS"] == "50"
