"""Unit tests of the FSDP2 row-block arithmetic (no processes): torch.chunk semantics, nested
Shard(0) mesh dims, Replicate dims, and the placement classifier."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from flashoptim_dist.distributed.fsdp2 import _placement_kind, chunk_range, dtensor_row_block


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8])
def test_chunk_range_is_torch_chunk_with_empty_tail(k):
    for n in range(0, 41):
        chunks = list(torch.arange(n).chunk(k)) if n else []
        chunks += [torch.arange(0)] * (k - len(chunks))  # FSDP2 / DTensor pad with empty chunks
        for i in range(k):
            start, length = chunk_range(n, k, i)
            assert length == chunks[i].numel(), (n, k, i)
            if length:
                assert start == int(chunks[i][0]), (n, k, i)


class _FakeMesh:
    def __init__(self, shape, coord):
        self.shape, self.coord = shape, coord

    def get_coordinate(self):
        return self.coord

    def size(self, dim):
        return self.shape[dim]


def test_row_block_nested_and_replicated_dims():
    rows = 23
    ar = torch.arange(rows)
    for a in range(2):
        for b in range(3):
            # (Shard(0), Shard(0)): chunk over dim 0 of the mesh, then chunk that block again
            outer = (list(ar.chunk(2)) + [ar[:0]] * 2)[a]
            inner = (list(outer.chunk(3)) + [ar[:0]] * 3)[b] if outer.numel() else ar[:0]
            start, n = dtensor_row_block(rows, _FakeMesh((2, 3), (a, b)), (Shard(0), Shard(0)))
            assert n == inner.numel() and (n == 0 or start == int(inner[0]))
            # HSDP: (Replicate(), Shard(0)) depends only on the shard coordinate
            start, n = dtensor_row_block(rows, _FakeMesh((2, 3), (a, b)), (Replicate(), Shard(0)))
            expect = (list(ar.chunk(3)) + [ar[:0]] * 3)[b]
            assert n == expect.numel() and start == int(expect[0])
    assert dtensor_row_block(rows, _FakeMesh((2,), None), (Shard(0),)) == (0, 0)  # not in the mesh


def test_placement_kinds():
    assert _placement_kind(Shard(0)) == "shard0"
    assert _placement_kind(Replicate()) == "replicate"
    for bad in (Shard(1), Partial(), _StridedShard(0, split_factor=2)):
        assert _placement_kind(bad) == "other", bad
    with pytest.raises(ValueError, match="Shard"):
        dtensor_row_block(8, _FakeMesh((2,), (0,)), (Shard(1),))
