"""The micro-batch stream: seeded, resumable by position, and sharded without duplicates or gaps."""

from __future__ import annotations

import pytest

from loraforge.train.sampler import MicroBatchStream


@pytest.mark.parametrize("n,batch,world,group", [(19, 2, 2, False), (24, 4, 2, False), (37, 3, 4, True),
                                                 (5, 4, 2, False)])
def test_ranks_cover_the_epoch_exactly(n, batch, world, group):
    lengths = [(i * 37) % 50 + 1 for i in range(n)]
    streams = [MicroBatchStream(lengths, batch, seed=3, world_size=world, rank=r, group_by_length=group)
               for r in range(world)]
    per_epoch = streams[0].per_epoch
    assert all(s.per_epoch == per_epoch for s in streams)  # DDP needs equal step counts
    for epoch in range(2):
        union = [i for s in streams for i in s.epoch_order(epoch)]
        total = per_epoch * batch * world
        assert len(union) == total
        assert set(union) == set(range(n))  # no gaps
        counts = {i: union.count(i) for i in range(n)}
        # duplicates only from the wrap-around padding: at most total - n extra slots
        assert sum(c - 1 for c in counts.values()) == total - n
        assert max(counts.values()) <= -(-total // n)


def test_stream_is_a_function_of_position():
    s = MicroBatchStream(list(range(1, 12)), 3, seed=5)
    it = s.batches()
    full = [next(it) for _ in range(10)]
    it2 = s.batches(start=6)
    assert [next(it2) for _ in range(4)] == full[6:]
    assert s.epoch_order(0) != s.epoch_order(1)  # reshuffled every epoch


def test_world_of_two_sees_the_same_examples_as_one_process_with_double_batch():
    lengths = [10] * 19
    one = MicroBatchStream(lengths, 4, seed=1)
    two = [MicroBatchStream(lengths, 2, seed=1, world_size=2, rank=r) for r in range(2)]
    a = one.epoch_order(0)
    b0, b1 = two[0].epoch_order(0), two[1].epoch_order(0)
    for k in range(one.per_epoch):
        assert a[4 * k:4 * k + 4] == b0[2 * k:2 * k + 2] + b1[2 * k:2 * k + 2]

