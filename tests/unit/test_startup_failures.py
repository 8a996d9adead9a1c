"""A service that fails to start says why in one JSON `startup_failed` line and exits 1:
the rules and notifier ended with a raw traceback, many lines of text among the JSON."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from services.common.config import ConfigError
from services.common.runtime import StartupError, startup_failures


@pytest.mark.parametrize(
    ("failure", "error"),
    [
        (ConfigError("CONSUMER_MAX_BATCH=0: must be at least 1"),
         "CONSUMER_MAX_BATCH=0: must be at least 1"),
        (StartupError("database unreachable: postgresql://db/x"),
         "database unreachable: postgresql://db/x"),
    ],
)  # fmt: skip
def test_a_failure_that_says_all_is_one_line_without_traceback(
    failure: BaseException, error: str
) -> None:
    with capture_logs() as logs, pytest.raises(SystemExit) as stopped, startup_failures():
        raise failure
    assert stopped.value.code == 1
    assert logs == [{"event": "startup_failed", "error": error, "log_level": "error"}]


def test_an_unexpected_failure_keeps_its_traceback_in_the_line() -> None:
    with capture_logs() as logs, pytest.raises(SystemExit) as stopped, startup_failures():
        raise KeyError("rules_rulesets")
    assert stopped.value.code == 1
    [line] = logs
    assert line["event"] == "startup_failed"
    assert line["error"] == "KeyError: 'rules_rulesets'"
    assert line["exc_info"] is True


@pytest.mark.parametrize("code", [0, 3, None])
def test_an_exit_with_a_status_goes_through_untouched(code: int | None) -> None:
    with capture_logs() as logs, pytest.raises(SystemExit) as stopped, startup_failures():
        raise SystemExit(code)
    assert stopped.value.code == code
    assert logs == []
