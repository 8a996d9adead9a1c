"""The services' log configuration: JSON lines, service bound, level from LOG_LEVEL."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from services.common.logging import configure_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield None
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def test_log_level_from_the_environment_filters_lower_lines(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LOG_LEVEL", "warning")
    configure_logging("ledger")
    log = structlog.get_logger()
    log.info("quiet_line", member_id="m-1")
    log.warning("loud_line", member_id="m-2")
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert [x["event"] for x in lines] == ["loud_line"]
    assert lines[0]["service"] == "ledger"
    assert lines[0]["member_id"] == "m-2"
    assert lines[0]["level"] == "warning"


def test_an_unknown_log_level_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_LEVEL", "chatty")
    with pytest.raises(ValueError, match="LOG_LEVEL='CHATTY'"):
        configure_logging("rules")
