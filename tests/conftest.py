"""Shared fixtures: real Postgres and real brokers (tests/infra.py), never mocks."""

pytest_plugins = ["tests.infra"]


def pytest_report_header() -> str:
    import services.rules
    from services.common.native import stale_reason

    if services.rules.NATIVE:
        return "rules core: compiled (mypyc, .build/native)"
    return f"rules core: pure Python ({stale_reason() or 'LOYALTY_NATIVE=0'})"
