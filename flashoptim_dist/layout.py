"""The canonical state layout: the one place that decides how optimizer state is laid out.

Invariant (docs/design.md §3): the representation of a parameter's optimizer state is a pure
function of the parameter's *global* shape and the numeric config, never of the shard a rank
holds.

The rule chosen here:

* A parameter is flattened in row-major order of its **global** shape. Quantization groups are
  the contiguous runs ``[g*G, (g+1)*G)`` of that flattened global index (``G = group_size``,
  32 by default). The last group of a parameter may be short.
* Every element of a parameter with a floating dtype gets 8-bit states when quantization is on;
  there is no size threshold, so a norm weight is laid out exactly like a projection matrix and a
  flat DeepSpeed partition that mixes both needs no special case.
* A rank holds one or more :class:`Segment` s of a parameter: contiguous runs of the flattened
  global index. The *phase* of a segment, ``global_start % G``, says where inside its canonical
  group the segment starts. A segment that starts or ends inside a group holds a *partial group*
  and keeps its own scale for it at run time; checkpoints reconcile the two halves.
* Per segment the rank stores one scale per canonical group it touches:
  ``ceil((phase + length) / G)`` scales, laid out segment after segment.
* Where the local tensor is a sub-block of the global one — rows of dim 0 (any set, e.g. a
  strided one) times one range of each row (a ``Shard(1)`` column split of tensor parallelism) —
  the spec also carries it as a :class:`RowBlock`, so that ``state_dict()`` can expose state in
  the parameter's global layout and checkpoints can write it as boxes instead of one run per row.

Engines tell the optimizer what a rank holds by attaching a :class:`ShardSpec` to the parameter
(:func:`set_shard_spec`) or through an adapter registered with :func:`register_shard_adapter`
(FSDP2's DTensors are handled that way). The optimizer core never imports an engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Optional, Sequence, Tuple

import torch

__all__ = [
    "Segment",
    "RowBlock",
    "ShardSpec",
    "StateLayout",
    "SegmentRun",
    "segment_runs",
    "state_layout",
    "spec_layout",
    "num_groups",
    "set_shard_spec",
    "get_shard_spec",
    "register_shard_adapter",
    "resolve_shard",
    "chunk_range",
    "shard_block",
    "FORM_GLOBAL",
    "FORM_ELEMENTWISE",
    "FORM_LOCAL",
]

#: Attribute name under which an engine adapter stores a :class:`ShardSpec` on a parameter.
SHARD_SPEC_ATTR = "_flashoptim_shard_spec"


def num_groups(length: int, phase: int, group_size: int) -> int:
    """Number of canonical groups a run of ``length`` elements starting at ``phase`` touches."""
    if length <= 0:
        return 0
    return (phase + length + group_size - 1) // group_size


@dataclass(frozen=True)
class Segment:
    """A contiguous run of one global parameter's elements that this rank holds.

    Attributes:
        local_start: offset of the run's first element in the *optimizer tensor's* local flat
            storage (0 for a whole tensor or a single shard).
        length: number of elements in the run (may be 0).
        global_start: offset of the run's first element in the flattened *global* parameter;
            ``global_start % group_size`` is the canonical group phase.
        key: identity of the global parameter (its FQN) when one optimizer tensor packs several
            parameters (DeepSpeed flat partitions). ``None`` means "the tensor itself".
        global_numel: number of elements of the global parameter (``-1`` = unknown / same as
            the optimizer tensor).
    """

    local_start: int
    length: int
    global_start: int
    key: Optional[str] = None
    global_numel: int = -1

    def phase(self, group_size: int) -> int:
        return self.global_start % group_size

    def n_groups(self, group_size: int) -> int:
        return num_groups(self.length, self.phase(group_size), group_size)


@dataclass(frozen=True)
class RowBlock:
    """The local tensor as a sub-block of the global parameter, viewed as ``R`` rows of ``L``
    elements (dim 0 × the flattened trailing dims; a 1-D parameter has rows of one element, a
    0-d one is one row of one).

    The local tensor holds, for each global row ``r`` of ``row_runs`` (in that order), the
    elements ``[lo, hi)`` of that row: local flat index ``i·(hi − lo) + j`` is global element
    ``rows[i]·L + lo + j``. ``lo = 0, hi = L`` when the rows are whole (dim-0 sharding only); a
    ``Shard(1)`` split of a ``(R, C, D...)`` parameter over columns ``[c0, c1)`` gives
    ``lo = c0·D``, ``hi = c1·D``.

    Attributes:
        row_runs: ``((first row, count), ...)``: the global rows held, as maximal runs of
            consecutive rows, in local order (one run for a block of rows; several for a strided
            split of dim 0; empty when the rank holds nothing).
        lo, hi: the range of each row held.
        row_length: L.
    """

    row_runs: tuple
    lo: int
    hi: int
    row_length: int

    @property
    def n_rows(self) -> int:
        return sum(n for _, n in self.row_runs)

    @property
    def width(self) -> int:
        return self.hi - self.lo

    @property
    def whole_rows(self) -> bool:
        return self.lo == 0 and self.hi == self.row_length

    def rows(self) -> "torch.Tensor":
        """The global rows held, in local order (int64)."""
        if not self.row_runs:
            return torch.zeros(0, dtype=torch.int64)
        return torch.cat([torch.arange(r0, r0 + n, dtype=torch.int64) for r0, n in self.row_runs])

    def segments(self, global_numel: int) -> tuple:
        """The :class:`Segment` s of the block, tiling the local tensor in local order: one per
        run of rows when rows are whole (a run of whole rows is one contiguous run of the
        flattened parameter), else one per row (the pieces of two rows are not adjacent in the
        global parameter)."""
        L, w = self.row_length, self.width
        out, local = [], 0
        for r0, n in self.row_runs:
            if n == 0 or w == 0:
                continue
            if self.whole_rows:
                out.append(Segment(local, n * L, r0 * L, None, global_numel))
                local += n * L
                continue
            for r in range(r0, r0 + n):
                out.append(Segment(local, w, r * L + self.lo, None, global_numel))
                local += w
        if not out:
            out.append(Segment(0, 0, 0, None, global_numel))
        return tuple(out)


#: How ``FlashOptimizer.state_dict()`` exposes a tensor's state (see :mod:`flashoptim_dist.optim.state_io`):
#: in the parameter's global layout (DTensor for DTensor parameters; whole tensors), ...
FORM_GLOBAL = "global"
#: ... one value per local element in one dtype (what FSDP1's optim_state_dict gathers), ...
FORM_ELEMENTWISE = "elementwise"
#: ... or as stored, this rank's slice only (a per-rank format: DeepSpeed partitions, custom specs).
FORM_LOCAL = "local"


@dataclass(frozen=True)
class ShardSpec:
    """What a rank holds of a parameter, as seen by the optimizer.

    Attributes:
        global_shape: shape of the full (unsharded) parameter.
        segments: the runs of the flattened global parameter held locally, in local order.
            They must tile the local tensor: ``segments[i].local_start`` increasing, no overlap.
        local: optional callable returning the local tensor to update in place, for engines
            whose parameter object is not itself the local storage (FSDP2 DTensors).
        grad: optional callable returning the local gradient (same numel as the local tensor)
            or ``None``.
        state_dict_form: how ``state_dict()`` exposes the tensor's state (``FORM_*`` above);
            ``None`` lets the optimizer decide: the global layout for DTensor parameters and
            whole tensors, this rank's slice (``FORM_LOCAL``) for anything else.
        block: the local tensor as a :class:`RowBlock` of the global parameter, when it is one
            (the DTensor adapter always sets it); ``None`` otherwise.
        check: optional ``check(group_size)`` that raises when this shard cannot be laid out
            with canonical groups of that size (e.g. a column split that would cut a group in
            every row); called by :func:`spec_layout` before any state is laid out.
    """

    global_shape: tuple
    segments: tuple
    local: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    grad: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]] = None
    state_dict_form: Optional[str] = None
    block: Optional[RowBlock] = None
    check: Optional[Callable[[int], None]] = None

    @property
    def global_numel(self) -> int:
        return math.prod(self.global_shape)


def chunk_range(n: int, k: int, i: int) -> Tuple[int, int]:
    """(start, length) of chunk ``i`` when ``n`` items are split into ``k`` chunks like
    ``torch.chunk`` (chunk size ``ceil(n/k)``), padded with empty chunks at the end: how
    DTensor's ``Shard`` placement and FSDP2 split a dimension."""
    if k <= 0 or not 0 <= i < k:
        raise ValueError(f"chunk index {i} out of range for {k} chunks")
    if n <= 0:
        return 0, 0
    size = -(-n // k)
    start = min(i * size, n)
    return start, min(size, n - start)


def shard_block(n: int, mesh_sizes: Sequence[int], coord: Sequence[int], shard_dims: Sequence[int]) -> Tuple[int, int]:
    """(start, length) of the block of ``n`` rows held at mesh coordinate ``coord`` when the mesh
    dims in ``shard_dims`` each chunk the previous block like ``torch.chunk``, left to right
    (DTensor's order for several ``Shard(0)`` placements), and the other dims replicate it."""
    start, length = 0, n
    for dim in shard_dims:
        s, length = chunk_range(length, mesh_sizes[dim], coord[dim])
        start += s
    return start, length


def set_shard_spec(param: torch.Tensor, spec: ShardSpec) -> None:
    """Attach ``spec`` to ``param`` (used by engine adapters such as FSDP1's)."""
    setattr(param, SHARD_SPEC_ATTR, spec)


def get_shard_spec(param: torch.Tensor) -> Optional[ShardSpec]:
    return getattr(param, SHARD_SPEC_ATTR, None)


# Adapters: callables ``param -> ShardSpec | None``; first non-None wins. Engines register here
# (see flashoptim_dist/distributed/); the optimizer core only calls resolve_shard().
_ADAPTERS: list = []


def register_shard_adapter(fn: Callable[[torch.Tensor], Optional[ShardSpec]]) -> None:
    """Register ``fn(param) -> ShardSpec | None``; adapters are asked in registration order."""
    if fn not in _ADAPTERS:
        _ADAPTERS.append(fn)


def _whole_tensor_spec(param: torch.Tensor) -> ShardSpec:
    n = param.numel()
    return ShardSpec(global_shape=tuple(param.shape), segments=(Segment(0, n, 0, None, n),))


def resolve_shard(param: torch.Tensor) -> ShardSpec:
    """The :class:`ShardSpec` for ``param``: an attached spec, an adapter's, or the whole tensor."""
    spec = get_shard_spec(param)
    if spec is not None:
        return spec
    for fn in _ADAPTERS:
        spec = fn(param)
        if spec is not None:
            return spec
    return _whole_tensor_spec(param)


@dataclass(frozen=True)
class StateLayout:
    """Storage plan for one optimizer tensor's state on this rank (derived from ShardSpec+config).

    Attributes:
        numel: local element count (codes and ρ have this many entries).
        group_size: canonical group size G.
        segments: the local segments (see :class:`Segment`).
        scale_offsets: start of each segment's scales inside the tensor's scale vector.
        n_scales: total scales held locally (one bf16 per touched canonical group).
        rho_dtype: ``torch.int8`` (24-bit masters), ``torch.int16`` (32-bit) or ``None``.
        quantized: whether moment states are 8-bit codes + scales (else fp32).
    """

    numel: int
    group_size: int
    segments: tuple
    scale_offsets: tuple
    n_scales: int
    rho_dtype: Optional[torch.dtype]
    quantized: bool


def rho_dtype_for(param_dtype: torch.dtype, master_weight_bits: Optional[int]) -> Optional[torch.dtype]:
    """ρ storage: int8 for 24-bit masters, int16 for 32-bit; none for fp32 params or no ECC."""
    if master_weight_bits is None or param_dtype == torch.float32:
        return None
    return {24: torch.int8, 32: torch.int16}[master_weight_bits]


def state_layout(
    numel: int,
    segments: Sequence[Segment],
    param_dtype: torch.dtype,
    *,
    group_size: int,
    quantize: bool,
    master_weight_bits: Optional[int],
) -> StateLayout:
    """Decide the state layout from the segments (global coordinates) and the config only."""
    offs = []
    total = 0
    covered = 0
    for s in segments:
        offs.append(total)
        total += s.n_groups(group_size)
        covered += s.length
    if covered != numel:
        raise ValueError(
            f"shard segments cover {covered} elements but the local tensor has {numel}; "
            "the engine adapter produced an inconsistent ShardSpec"
        )
    return StateLayout(
        numel=numel,
        group_size=group_size,
        segments=tuple(segments),
        scale_offsets=tuple(offs),
        n_scales=total,
        rho_dtype=rho_dtype_for(param_dtype, master_weight_bits),
        quantized=quantize,
    )


def state_layout_for(local: torch.Tensor, segments: Sequence[Segment], config) -> StateLayout:
    """:func:`state_layout` of the local tensor ``local`` under a :class:`~flashoptim_dist.FlashConfig`
    (its ``group_size``, ``quantize`` and ``master_weight_bits``): what the optimizer, the
    checkpoint views and the offline converters all use, so they cannot disagree."""
    return state_layout(local.numel(), segments, local.dtype, group_size=config.group_size,
                        quantize=config.quantize, master_weight_bits=config.master_weight_bits)


def spec_layout(local: torch.Tensor, spec: ShardSpec, config) -> StateLayout:
    """:func:`state_layout_for` of a :class:`ShardSpec` after its ``check`` (if any) accepted the
    config's group size: how the optimizer and the checkpoint views lay out a parameter's state."""
    if spec.check is not None:
        spec.check(config.group_size)
    return state_layout_for(local, spec.segments, config)


class SegmentRun(NamedTuple):
    """Where one non-empty segment of a :class:`StateLayout` sits in the tensor's local storage.

    Attributes:
        index: the segment's position in ``layout.segments`` (to pair it with per-segment data
            kept in that order, e.g. the optimizer's dither keys).
        segment: the :class:`Segment` itself (``key``, ``global_start``, ``global_numel``).
        start, stop: its elements in the local flat storage (codes, ρ, param, grad):
            ``[start, stop)``, ``stop - start == segment.length > 0``.
        phase: ``segment.global_start % group_size``, the position of its first element inside
            its canonical group (non-zero when the segment starts mid-group).
        scale_start, scale_stop: its scales in the tensor's scale vector: one per canonical group
            the segment touches, ``scale_stop - scale_start == segment.n_groups(group_size)``.
    """

    index: int
    segment: Segment
    start: int
    stop: int
    phase: int
    scale_start: int
    scale_stop: int

    @property
    def local(self) -> slice:
        """``slice(start, stop)``: the segment's elements in the local flat storage."""
        return slice(self.start, self.stop)

    @property
    def scales(self) -> slice:
        """``slice(scale_start, scale_stop)``: the segment's scales."""
        return slice(self.scale_start, self.scale_stop)

    @property
    def n_groups(self) -> int:
        return self.scale_stop - self.scale_start


def segment_runs(layout: StateLayout) -> Iterator[SegmentRun]:
    """The non-empty segments of ``layout``, in local order, each as a :class:`SegmentRun`.

    Yields one run per segment of ``layout.segments`` whose length is > 0 (empty segments,
    e.g. an FSDP shard holding no rows, are skipped but still count in ``index``). Nothing is
    cut at group boundaries: a run's first canonical group may be partial (``phase > 0``) and so
    may its last; its ``n_groups`` scales cover them all. Padding segments of flat partitions
    (``segment.key`` None or ``"<...>"``) are yielded like any other: callers that skip padding
    test ``run.segment.key``."""
    G = layout.group_size
    for i, (seg, soff) in enumerate(zip(layout.segments, layout.scale_offsets)):
        n = seg.length
        if n <= 0:
            continue
        phase = seg.global_start % G
        yield SegmentRun(i, seg, seg.local_start, seg.local_start + n, phase, soff,
                         soff + num_groups(n, phase, G))
