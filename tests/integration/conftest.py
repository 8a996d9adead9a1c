from collections.abc import AsyncIterator

import pytest

from tests.integration.harness import Stack, make_stack


@pytest.fixture
async def stack(broker: str, fresh_database: str) -> AsyncIterator[Stack]:
    """The three services as real processes on a real broker and a fresh database."""
    s = await make_stack(broker, fresh_database)
    try:
        await s.wait_ready()
        yield s
    finally:
        s.stop_all()
