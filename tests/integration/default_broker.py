"""For test modules about the command line rather than the broker: importing `broker`
from here overrides the fixture of the same name for that module, so its stack runs on
the default broker only. The broker-compatibility tests run on both; a second stack on
Kafka for a command-line test would only cost time."""

from __future__ import annotations

import pytest


@pytest.fixture
def broker(tansu_bootstrap: str) -> str:
    return tansu_bootstrap
