from collections.abc import AsyncIterator
from typing import Any

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


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under pytest-xdist, every Apache Kafka test goes to one worker, so one JVM broker
    serves them all; the rest are handed out one by one.

    The scheduler keys its units of work by node id. xdist's own `--dist loadgroup` marks
    a group by appending `@group` to the id, which pytest 9 no longer lets a plugin do,
    so the Kafka tests are grouped here by the broker in their id instead.
    """
    from xdist.scheduler import LoadScopeScheduling

    class OneKafkaWorker(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return "kafka" if "[kafka" in nodeid else nodeid

    return OneKafkaWorker(config, log)
