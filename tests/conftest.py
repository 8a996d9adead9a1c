"""Shared fixtures: real Postgres and real brokers (tests/infra.py), never mocks."""

import os
import tempfile

pytest_plugins = ["tests.infra"]

# No test reaches a developer's `make up` stack through its .run/stack.env, which
# `ledgerctl` reads for the database, broker and prefix the environment does not set.
os.environ.setdefault(
    "STACK_RUN_DIR", os.path.join(tempfile.gettempdir(), "loyalty-tests-no-stack")
)


def pytest_report_header() -> str:
    import services.rules
    from services.common.native import stale_reason

    if services.rules.NATIVE:
        return "rules core: compiled (mypyc, .build/native)"
    return f"rules core: pure Python ({stale_reason() or 'LOYALTY_NATIVE=0'})"
