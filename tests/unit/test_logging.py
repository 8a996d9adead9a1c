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


def test_a_database_url_is_redacted_before_it_is_printed() -> None:
    """`database unreachable: <url>` went to the log with the password in it."""
    from services.common.config import redacted

    assert (
        redacted("postgresql://loyalty:s3cret@127.0.0.1:55432/loyalty")
        == "postgresql://loyalty:***@127.0.0.1:55432/loyalty"
    )
    assert redacted("postgresql://loyalty@db/loyalty") == "postgresql://loyalty@db/loyalty"
    assert redacted("postgresql://u:p@[::1]:5432/x") == "postgresql://u:***@[::1]:5432/x"
    assert "p@ss" not in redacted("postgresql://u:p@ss@h:notaport/x")
