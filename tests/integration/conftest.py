from collections.abc import AsyncIterator

import pytest

from services.ledger.rebuild import verify
from tests.integration.harness import Stack, make_stack


@pytest.fixture
async def stack(broker: str, broker_name: str, fresh_database: str) -> AsyncIterator[Stack]:
    """The three services as real processes on a real broker and a fresh database.

    Whatever a test did, the read models must still equal a fold of the journal at the
    end: `ledger verify` runs after every test that used a stack.
    """
    s = await make_stack(broker, fresh_database, broker_name)
    try:
        await s.wait_ready()
        yield s
        report = await verify(fresh_database)
        assert not report.differences, "ledger verify:\n" + "\n".join(report.differences)
    finally:
        s.stop_all()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`--dist loadgroup`), every Apache Kafka test runs on one worker,
    so one JVM broker serves them all; the rest spread over the workers."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("broker") == "kafka":
            item.add_marker(pytest.mark.xdist_group("kafka"))
