"""The relay's cached partitioner must put every key where the producer's own would."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given
from hypothesis import strategies as st

from services.common.outbox import key_hash, partition_for


@given(
    key=st.binary(min_size=0, max_size=40) | st.text(max_size=20).map(str.encode),
    count=st.integers(min_value=1, max_value=64),
)
def test_same_partition_as_the_producers_default(key: bytes, count: int) -> None:
    partitions = list(range(count))
    expected = DefaultPartitioner()(key, partitions, partitions)
    assert partition_for(key, partitions) == expected
    assert partition_for(key, partitions) == expected  # again, from the cache


def test_member_ids_are_spread_over_every_partition() -> None:
    partitions = list(range(6))
    keys = [f"m-{i:07d}".encode() for i in range(1000)]
    got = [partition_for(k, partitions) for k in keys]
    assert got == [DefaultPartitioner()(k, partitions, partitions) for k in keys]
    assert set(got) == set(partitions)
    assert all(key_hash(k) >= 0 for k in keys)


def test_a_keyless_row_goes_to_some_partition() -> None:
    assert partition_for(None, [0, 1, 2]) in (0, 1, 2)
