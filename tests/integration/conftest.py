from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.ledger.rebuild import verify
from tests.integration.harness import Stack, make_stack


@pytest.fixture
def fast_tier_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    """The services inherit the environment: the rules' tier sweep every second, and each
    expiry or spend change reported as soon as it is due."""
    monkeypatch.setenv("TIER_SWEEP_SECONDS", "1")
    monkeypatch.setenv("TIER_SWEEP_GRACE_SECONDS", "0")


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
            return "kafka" if on_kafka(nodeid) else nodeid

    return OneKafkaWorker(config, log)


_KAFKA_WORKERS: set[str] = set()
# Tests of the local Kafka's SASL and TLS listeners (`local_kafka`): the same broker.
_KAFKA_MODULES = ("test_secured_broker.py",)


def on_kafka(nodeid: str) -> bool:
    return "[kafka" in nodeid or nodeid.partition("::")[0].endswith(_KAFKA_MODULES)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """On the xdist controller, note which workers ran Apache Kafka tests."""
    node = getattr(report, "node", None)  # the worker that sent the report (xdist)
    if node is not None and report.when == "call" and on_kafka(report.nodeid):
        _KAFKA_WORKERS.add(str(node.gateway.id))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if the Kafka tests were spread over workers (each would start its own
    JVM broker): `pytest_xdist_make_scheduler` above no longer groups them."""
    if len(_KAFKA_WORKERS) > 1:
        writer = session.config.get_terminal_writer()
        writer.line()
        writer.line(
            f"Apache Kafka tests ran on {sorted(_KAFKA_WORKERS)}: the scheduler that keeps"
            " them on one worker no longer works (tests/integration/conftest.py)",
            red=True,
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
