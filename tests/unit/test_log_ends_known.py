"""`log_ends` with the ends a consumer's fetches reported: what the lag gauge asks every
few seconds (`LogEnds`) costs one ListOffsets while the consumer keeps up, and a fetch only
of a partition whose ListOffsets answer is past what was fetched (Tansu answers short of a
last batch of many records, so only a fetch tells its end)."""

from __future__ import annotations

from typing import Any

from aiokafka import TopicPartition

from services.common.log_end import log_ends

UP, BEHIND, EMPTY = (TopicPartition("t", p) for p in range(3))


class FakeClient:
    """Tansu's answers: ListOffsets after the first record of the last batch (41 of a
    batch 40-59), a fetch's high watermark at the log's end."""

    def __init__(self) -> None:
        self.reported = {UP: 31, BEHIND: 41, EMPTY: 0}
        self.high = {UP: 35, BEHIND: 60}
        self.asked: list[str] = []
        self.assigned: list[TopicPartition] = []

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        self.asked.append("end_offsets")
        return {tp: self.reported[tp] for tp in tps}

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        self.asked.append("beginning_offsets")
        return dict.fromkeys(tps, 0)

    def assign(self, tps: list[TopicPartition]) -> None:
        self.assigned = list(tps)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        pass

    async def getmany(self, *tps: TopicPartition, **_: Any) -> dict[Any, Any]:
        self.asked.append("fetch")
        return {}

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.high[tp] if tp in self.assigned else None


async def test_a_partition_fetched_up_to_its_end_is_not_fetched_again() -> None:
    client = FakeClient()
    ends = await log_ends(client, [UP], known={UP: 35})  # type: ignore[arg-type]
    assert ends == {UP: 35}
    assert client.asked == ["end_offsets"]


async def test_a_partition_behind_its_reported_end_is_fetched_for_its_real_end() -> None:
    client = FakeClient()
    tps = [UP, BEHIND, EMPTY]
    ends = await log_ends(client, tps, known={UP: 35, BEHIND: 20})  # type: ignore[arg-type]
    assert ends == {UP: 35, BEHIND: 60, EMPTY: 0}
    assert client.assigned == [BEHIND]
