"""`free_port` hands a port out once per process, even when the OS offers it again."""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType

import pytest

from deploy import processes


class _OfferedPorts:
    """Stands in for `socket.socket`: each probe socket 'binds' to the next offered port."""

    def __init__(self, offers: Iterator[int]) -> None:
        self._offers = offers

    def __call__(self, *args: object) -> _OfferedPorts:
        self._port = next(self._offers)
        return self

    def __enter__(self) -> _OfferedPorts:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        return None

    def bind(self, address: tuple[str, int]) -> None:
        return None

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self._port)


def test_a_port_offered_again_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # the OS's offers, not a block
    monkeypatch.setattr(processes, "_HANDED_OUT", set())
    fake = _OfferedPorts(iter([41000, 41000, 41000, 41001, 41000, 41002]))
    monkeypatch.setattr(processes.socket, "socket", fake)
    assert [processes.free_port() for _ in range(3)] == [41000, 41001, 41002]


def test_real_ports_are_distinct() -> None:
    ports = [processes.free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)


def test_each_xdist_worker_picks_from_its_own_block_below_the_ephemeral_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blocks = {}
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        blocks[worker] = {processes.free_port() for _ in range(5)}
    start = processes.WORKER_PORTS_FROM
    assert all(start <= p < start + processes.WORKER_BLOCK for p in blocks["gw0"])
    assert all(
        start + processes.WORKER_BLOCK <= p < start + 2 * processes.WORKER_BLOCK
        for p in blocks["gw1"]
    )
    assert len(blocks["gw0"]) == len(blocks["gw1"]) == 5
