"""DCP plumbing: 1-D runs of a flattened global tensor as DCP chunks, and the planners.

DCP describes a tensor on disk as boxes (``ChunkStorageMetadata``: offsets + sizes in the
tensor's global shape) and computes, at load time, which parts of which saved boxes each rank
needs. Engines that shard by flat ranges (FSDP1, DeepSpeed ZeRO) hold runs of the *flattened*
parameter that are not boxes. A run ``[start, end)`` of a row-major tensor is however always a
union of at most ``2·ndim − 1`` boxes, each contiguous in memory (first partial row of the
innermost dims, then whole rows, then the last partial row). :func:`flat_range_boxes` computes
them; every rank then writes and reads plain DCP boxes, so DCP's own resharding does the
rest, and the files stay readable by plain ``torch.distributed.checkpoint``.

The planners only add these boxes to the default planners (no DTensor, no ShardedTensor):
``create_read_items_for_chunk_list`` does the overlap computation. The APIs used are the same in
torch 2.11 and 2.13.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Sequence, Tuple

import torch
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    create_default_local_save_plan,
)
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

Box = Tuple[Tuple[int, ...], Tuple[int, ...], int]  # (offsets, sizes, flat offset of its first element)


def flat_range_boxes(shape: Sequence[int], start: int, end: int) -> List[Box]:
    """Boxes covering elements ``[start, end)`` of a row-major tensor of ``shape``, in order.

    Each box is contiguous in the flattened tensor and starts at the returned flat offset.
    """
    shape = tuple(int(s) for s in shape)
    if start >= end:
        return []
    if len(shape) == 0:
        return [((), (), 0)]
    inner = math.prod(shape[1:])
    out: List[Box] = []
    pos = start
    # first, partial row (recurse into the inner dims)
    if pos % inner:
        r = pos // inner
        e = min(end, (r + 1) * inner)
        for o, s, f in flat_range_boxes(shape[1:], pos - r * inner, e - r * inner):
            out.append(((r,) + o, (1,) + s, f + r * inner))
        pos = e
    # whole rows
    nfull = (end - pos) // inner
    if nfull > 0:
        r = pos // inner
        out.append(((r,) + (0,) * (len(shape) - 1), (nfull,) + shape[1:], pos))
        pos += nfull * inner
    # last, partial row
    if pos < end:
        r = pos // inner
        for o, s, f in flat_range_boxes(shape[1:], 0, end - r * inner):
            out.append(((r,) + o, (1,) + s, f + r * inner))
    return out


@dataclasses.dataclass
class Chunked:
    """A rank's pieces of one global tensor: ``pieces`` are (offsets, sizes, local tensor)."""

    size: Tuple[int, ...]
    dtype: torch.dtype
    pieces: List[Tuple[Tuple[int, ...], Tuple[int, ...], torch.Tensor]] = dataclasses.field(default_factory=list)

    def add_run(self, start: int, tensor_1d: torch.Tensor) -> None:
        """Add the run ``[start, start + len)`` of the flattened global tensor.

        A box that continues the previous piece downwards (next rows, same columns) and whose
        local data follows the previous piece's in memory is merged into it: a tensor-parallel
        column shard adds one run per row, and merged they are one box per block of rows — one
        DCP chunk instead of one per row (metadata, planning and reads stay per shard)."""
        n = tensor_1d.numel()
        for o, s, f in flat_range_boxes(self.size, start, start + n):
            piece = tensor_1d[f - start : f - start + math.prod(s)].view(s)
            if not self._merge(o, s, piece):
                self.pieces.append((o, s, piece))

    def _merge(self, o, s, piece: torch.Tensor) -> bool:
        if not self.pieces or not o:
            return False
        lo, ls, lt = self.pieces[-1]
        if lo[1:] != o[1:] or ls[1:] != s[1:] or lo[0] + ls[0] != o[0]:
            return False
        if not (lt.is_contiguous() and piece.is_contiguous()) or lt.device != piece.device or lt.dtype != piece.dtype:
            return False
        if lt.untyped_storage().data_ptr() != piece.untyped_storage().data_ptr():
            return False
        if piece.storage_offset() != lt.storage_offset() + lt.numel():
            return False
        size = (ls[0] + s[0],) + tuple(s[1:])
        stride = tuple(math.prod(size[i + 1 :]) for i in range(len(size)))
        self.pieces[-1] = (lo, size, lt.as_strided(size, stride, lt.storage_offset()))
        return True

    def add_whole(self, tensor: torch.Tensor) -> None:
        self.pieces.append(((0,) * len(self.size), tuple(self.size), tensor.view(self.size)))


class FlashSavePlanner(DefaultSavePlanner):
    """The default planner plus :class:`Chunked` entries written as DCP ``SHARD`` items.

    Replicated pieces (same key and offsets on several ranks, e.g. DDP) are de-duplicated by
    DCP like any replicated tensor. Empty pieces are never written.
    """

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def create_local_plan(self) -> SavePlan:
        plain = {k: v for k, v in self.state_dict.items() if not isinstance(v, Chunked)}
        plan = create_default_local_save_plan(plain, self.is_coordinator)
        items = list(plan.items)
        self._lookup: Dict[Tuple[str, Tuple[int, ...]], torch.Tensor] = {}
        for fqn, ch in self.state_dict.items():
            if not isinstance(ch, Chunked):
                continue
            props = TensorProperties(dtype=ch.dtype)
            for o, s, t in ch.pieces:
                if math.prod(s) == 0 and len(s) > 0:
                    continue
                if (fqn, o) in self._lookup:
                    raise RuntimeError(f"internal error: two local pieces of {fqn} start at {o}")
                self._lookup[(fqn, o)] = t
                items.append(
                    WriteItem(
                        index=MetadataIndex(fqn, torch.Size(o)),
                        type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(
                            chunk=ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)),
                            properties=props,
                            size=torch.Size(ch.size),
                        ),
                    )
                )
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def resolve_data(self, write_item):
        key = (write_item.index.fqn, tuple(write_item.index.offset or ()))
        t = self._lookup.get(key) if hasattr(self, "_lookup") else None
        if t is not None:
            return t.detach()
        return super().resolve_data(write_item)


class FlashLoadPlanner(DefaultLoadPlanner):
    """Reads :class:`Chunked` destinations (boxes of global tensors) plus plain byte entries."""

    def __init__(self, targets: Dict[str, Chunked]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._targets = targets

    def create_local_plan(self) -> LoadPlan:
        plan = super().create_local_plan()  # byte entries of self.state_dict
        items = list(plan.items)
        md = self.metadata.state_dict_metadata
        for fqn, ch in self._targets.items():
            if not ch.pieces:
                continue
            chunks = [ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s, _ in ch.pieces]
            items += create_read_items_for_chunk_list(fqn, md[fqn], chunks)
        return dataclasses.replace(plan, items=items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        ch = self._targets.get(index.fqn)
        if ch is not None:
            return ch.pieces[index.index][2]
        return super().lookup_tensor(index)
