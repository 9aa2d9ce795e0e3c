"""DTensor placements → the canonical layout: which elements of the global parameter a rank holds.

Every DTensor parameter — FSDP2 (``fully_shard``), HSDP, tensor parallelism
(``parallelize_module``) and their combinations over 1-, 2- or 3-D meshes — is handed to the
optimizer as :class:`~flashoptim_dist.layout.Segment` s of its flattened *global* parameter
(docs/design.md §3), so quantization groups, the stochastic-rounding keys and checkpoints never
depend on the mesh.

Placements handled, per mesh dim:

=========================  =====================================================================
``Replicate()``            the mesh dim holds copies (HSDP replicas; TP of a norm under
                           sequence parallelism).
``Shard(0)``               dim 0 chunked like ``torch.chunk`` (FSDP2; TP colwise weights and the
                           embedding without FSDP).
``_StridedShard(0, sf)``   dim 0 chunked "right to left": what FSDP2 puts on top of a TP
                           ``Shard(0)`` (torchtitan's colwise layers under FSDP + TP).
``Shard(1)``               dim 1 chunked (TP rowwise weights, ``wo``/``w2``; FSDP2 with a
                           ``shard_placement_fn``); needs a parameter of ≥ 2 dims.
=========================  =====================================================================

Anything else is refused with the reason: ``Partial`` (a parameter whose value is a pending sum
cannot be stepped), ``Shard(d)`` for ``d ≥ 2`` and ``_StridedShard`` of dim ≥ 1 (no FSDP2/TP
plan produces them; a rank's elements would not be one range of each row), and a shard dim the
parameter does not have.

**How the held elements are computed.** Not re-derived: for each sharded tensor dim this module
applies the placements' own ``_split_tensor`` — the function ``distribute_tensor`` uses to cut
a full tensor into local shards — mesh dim by mesh dim, left to right, to a tensor of global
indices along that dim, and keeps the piece at this rank's mesh coordinate (the loop of
``torch.distributed.tensor._utils._compute_local_shape_and_global_offset`` in torch 2.13, with
the index lists kept instead of only their first entries). The result is checked against the
local tensor's shape and against ``compute_local_shape_and_global_offset`` (the helper DCP
places chunks with); a disagreement raises rather than guessing.

**From indices to segments.** Dim 0's indices become runs of consecutive rows; dim 1's must be one
contiguous range ``[c0, c1)`` (they always are for ``Shard``). Rows are whole when dim 1 is not
split: a run of rows is one segment (FSDP2's single row block is one segment, as before). With a
column split, row ``r`` holds the run ``[r·L + c0·D, r·L + c1·D)`` (``L`` the row length, ``D`` the
product of dims ≥ 2), so each local row is one segment; the fused kernel takes any number of
segments in one launch. The block is also given to the optimizer as a
:class:`~flashoptim_dist.layout.RowBlock` (for ``state_dict()`` and checkpoints).

**Column splits must not cut groups.** A ``Shard(1)`` split is accepted when the row length and
every column boundary, in elements, are multiples of the group size G (32): then no group is cut
and a TP step is bit-identical to the one-device step. Otherwise it is refused, naming the split
(:func:`column_check`). Why refuse rather than keep partial groups, as FSDP1 does: a column cut
would make *every row* of the matrix a partial group on both sides (R·(tp−1) cut groups per
parameter, against at most two per rank for a dim-0 boundary), so the whole matrix would lose
bit-identity with one device, hold one extra scale per row piece, and its scales could not be
exposed by ``state_dict()`` as a DTensor split like the parameter (a cut group's scale belongs to
two TP ranks), i.e. every ``get_state_dict`` would need an all-gather of scales over TP. Real TP
plans never need it: they split columns by attention heads (head_dim 64/128) or by the FFN width
over tp (14336/8 = 1792 = 56·32), always multiples of 32. The fix is a TP degree that splits the
columns into multiples of G or a smaller ``group_size``.

Memory: the adapter keeps, per parameter, the row runs (a handful of ints, or one per row for a
strided dim 0) and one :class:`~flashoptim_dist.layout.Segment` per local row under a column
split (≈ 100 bytes each on the host: 4096 rows → ~0.4 MB; the kernel plan adds one row of its
segment table, 13 int64 + 12 fp32 hyper-parameters ≈ 150 bytes on the device).
"""

from __future__ import annotations

import itertools
import math
from typing import Dict, Optional, Sequence, Tuple

import torch

from . import layout as lay

__all__ = [
    "placement_kind",
    "held_indices",
    "block_at",
    "dtensor_block",
    "column_check",
    "check_placements",
    "mesh_dims_sharding",
]


def placement_kind(pl) -> Tuple[str, int]:
    """``(kind, tensor dim)`` of a placement: kind is ``"replicate"``, ``"shard"``,
    ``"strided"`` (``_StridedShard``), ``"partial"`` or ``"other"``; dim is -1 where none."""
    name = type(pl).__name__
    dim = getattr(pl, "dim", -1)
    if "Strided" in name:  # _StridedShard subclasses Shard in torch < 2.10: test it first
        return "strided", int(dim)
    if getattr(pl, "is_replicate", None) is not None and pl.is_replicate():
        return "replicate", -1
    if getattr(pl, "is_partial", None) is not None and pl.is_partial():
        return "partial", -1
    if getattr(pl, "is_shard", None) is not None and pl.is_shard():
        return "shard", int(dim)
    return "other", -1


def mesh_dims_sharding(placements) -> Tuple[int, ...]:
    """The mesh dims over which a DTensor with ``placements`` holds different elements (every
    dim that is not ``Replicate``): the dims a sum over its elements must be reduced over."""
    return tuple(i for i, pl in enumerate(placements) if placement_kind(pl)[0] != "replicate")


def _what(fqn, gshape) -> str:
    """How an error names the parameter. ``fqn``: its name, or a zero-argument callable that
    finds it (only called when an error is raised: the lookup may scan the model), or None."""
    if callable(fqn):
        fqn = fqn()
    return (f"parameter {fqn!r} of global shape {tuple(gshape)}" if fqn
            else f"a parameter of global shape {tuple(gshape)}")


def check_placements(gshape: Sequence[int], placements, fqn=None) -> None:
    """Raise ``ValueError`` for placements the canonical layout cannot follow (see the module
    docstring); the message names the placement, why, and the fix. ``fqn``: the parameter's
    name or a callable returning it (called only to word an error)."""
    ndim = len(gshape)
    for md, pl in enumerate(placements):
        kind, dim = placement_kind(pl)
        if kind == "replicate" or (
            kind in ("shard", "strided") and (dim == 0 or (kind == "shard" and dim == 1 and ndim >= 2))
        ):
            continue
        where = f"{_what(fqn, gshape)} has placements {tuple(placements)}"
        if kind == "partial":
            raise ValueError(
                f"{where}: {pl} on mesh dim {md} means every rank holds a partial sum of the value, which an optimizer "
                "cannot update. Parameters are Replicate or Shard; reduce it first "
                "(p = p.redistribute(placements=[Replicate() if pl.is_partial() else pl for pl in p.placements]))."
            )
        if kind == "other":
            raise ValueError(
                f"{where}: Flash optimizers handle Replicate(), Shard(0), Shard(1) and _StridedShard(0) placements "
                f"(FSDP2, HSDP and tensor parallelism); {pl!r} on mesh dim {md} is none of them. Shard the parameter "
                "with one of those or keep it out of the Flash optimizer."
            )
        if dim >= ndim or dim < 0:
            raise ValueError(
                f"{where}: {pl} on mesh dim {md} shards dim {dim}, which a {ndim}-d parameter does not have. "
                "Use Shard(0) (or Replicate()) for it."
            )
        if (kind == "shard" and dim >= 2) or (kind == "strided" and dim != 0):
            raise ValueError(
                f"{where}: {pl} on mesh dim {md} is not supported. Flash optimizers place quantization groups along "
                "the flattened global parameter; they follow splits of dim 0 (Shard(0), _StridedShard(0), as FSDP2 "
                "and colwise tensor parallelism make) and one contiguous range of dim 1 (Shard(1), rowwise tensor "
                "parallelism), where each local row is one run of the flattened parameter. Shard this parameter on "
                "dim 0 or 1 (for FSDP2: return Shard(0) or Shard(1) from shard_placement_fn), or keep it out of the "
                "Flash optimizer."
            )


def held_indices(gshape: Sequence[int], mesh_shape: Sequence[int], coord: Sequence[int],
                 placements) -> Dict[int, torch.Tensor]:
    """Per sharded tensor dim, the global indices held at mesh coordinate ``coord``, in local
    order (int64): torch's ``_split_tensor`` of each placement applied, left to right, to the
    indices (see the module docstring). Dims absent from the result are held whole."""
    idx: Dict[int, torch.Tensor] = {}
    for md, pl in enumerate(placements):
        kind, dim = placement_kind(pl)
        if kind == "replicate":
            continue
        cur = idx.get(dim)
        if cur is None:
            cur = torch.arange(int(gshape[dim]), dtype=torch.int64)
        # the placement splits its own tensor dim: give the index vector that many leading dims
        pieces, _ = pl._split_tensor(cur.view([1] * dim + [-1]), int(mesh_shape[md]), with_padding=False,
                                     contiguous=True)
        idx[dim] = pieces[int(coord[md])].reshape(-1)
    return idx


def _runs(rows: torch.Tensor) -> tuple:
    """Maximal runs of consecutive values of ``rows`` (in order) as ((first, count), ...)."""
    if rows.numel() == 0:
        return ()
    brk = torch.nonzero(rows[1:] != rows[:-1] + 1).flatten() + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), brk])
    ends = torch.cat([brk, torch.tensor([rows.numel()], dtype=torch.int64)])
    return tuple((int(rows[s]), int(e - s)) for s, e in zip(starts.tolist(), ends.tolist()))


def block_at(gshape: Sequence[int], mesh_shape: Sequence[int], coord: Optional[Sequence[int]],
             placements) -> lay.RowBlock:
    """The :class:`~flashoptim_dist.layout.RowBlock` held at mesh coordinate ``coord`` (None:
    not in the mesh → nothing) by a DTensor of global shape ``gshape`` with ``placements``
    (already accepted by :func:`check_placements`). Depends on shapes and placements only, so
    any rank can compute any other rank's block."""
    gshape = tuple(int(s) for s in gshape)
    R = gshape[0] if gshape else 1
    L = math.prod(gshape[1:]) if gshape else 1
    if coord is None:
        return lay.RowBlock((), 0, 0, L)
    idx = held_indices(gshape, mesh_shape, coord, placements)
    rows = _runs(idx[0]) if 0 in idx else (((0, R),) if R else ())
    lo, hi = 0, L
    cols = idx.get(1)
    if cols is not None:
        D = math.prod(gshape[2:])
        if cols.numel() == 0:
            lo = hi = 0
        else:
            c0 = int(cols[0])
            if not torch.equal(cols, torch.arange(c0, c0 + cols.numel(), dtype=torch.int64)):
                raise ValueError(
                    f"placements {tuple(placements)} give a DTensor of shape {gshape} the columns "
                    f"{cols.tolist()[:8]}... "
                    "which are not one contiguous range; Flash optimizers need each local row to be one run of the "
                    "flattened parameter"
                )
            lo, hi = c0 * D, (c0 + cols.numel()) * D
    return lay.RowBlock(rows, lo, hi, L)


def _verify_with_torch(p, block: lay.RowBlock, local_shape) -> None:
    """The block must have the local tensor's shape, and start where torch's
    ``compute_local_shape_and_global_offset`` (DCP's chunk placement) says."""
    gshape = tuple(p.shape)
    if not gshape:
        return
    n = block.n_rows
    rest = tuple(local_shape[1:])
    expect = (n,) + rest
    if len(gshape) >= 2 and block.width != math.prod(rest):
        expect = None
    if expect is None or (tuple(local_shape) != expect and not (n == 0 and math.prod(local_shape) == 0)):
        raise RuntimeError(
            f"flashoptim_dist computed rows {block.row_runs} × elements [{block.lo}, {block.hi}) of each row for a "
            f"DTensor of global shape {gshape} with placements {tuple(p.placements)}, but its local tensor has shape "
            f"{tuple(local_shape)}. This torch {torch.__version__} shards differently from its own _split_tensor; "
            "please report it."
        )
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # pragma: no cover - private helper gone: the shape check above stands
        return
    try:
        shape, offset = compute_local_shape_and_global_offset(gshape, p.device_mesh, p.placements)
    except Exception:  # pragma: no cover - signature changed
        return
    if math.prod(local_shape) == 0:
        return
    first_row = block.row_runs[0][0]
    D = math.prod(gshape[2:]) if len(gshape) >= 2 else 1
    first_col = block.lo // D if len(gshape) >= 2 else 0
    if tuple(shape) != tuple(local_shape) or offset[0] != first_row or (len(gshape) >= 2 and offset[1] != first_col):
        raise RuntimeError(
            f"flashoptim_dist computed rows {block.row_runs} × elements [{block.lo}, {block.hi}) for a DTensor of "
            f"global shape {gshape} with placements {tuple(p.placements)}, but torch {torch.__version__}'s "
            f"compute_local_shape_and_global_offset says local shape {tuple(shape)} at offset {tuple(offset)}; "
            "please report it."
        )


def dtensor_block(p, local_shape, fqn: Optional[str] = None) -> lay.RowBlock:
    """This rank's :class:`~flashoptim_dist.layout.RowBlock` of DTensor parameter ``p`` (whose
    local tensor has ``local_shape``), verified against torch (see the module docstring)."""
    gshape = tuple(p.shape)
    check_placements(gshape, p.placements, fqn)
    mesh = p.device_mesh
    block = block_at(gshape, tuple(mesh.shape), mesh.get_coordinate(), p.placements)
    _verify_with_torch(p, block, tuple(local_shape))
    return block


def _column_pieces(gshape, mesh_shape, placements) -> list:
    """Every distinct (lo, hi) element range of a row held anywhere on the mesh (the column
    split depends only on the mesh dims that shard dim 1)."""
    dims = [md for md, pl in enumerate(placements) if placement_kind(pl)[1] == 1]
    out = set()
    for sub in itertools.product(*(range(int(mesh_shape[d])) for d in dims)):
        coord = [0] * len(mesh_shape)
        for d, c in zip(dims, sub):
            coord[d] = c
        b = block_at(gshape, mesh_shape, coord, placements)
        if b.width:
            out.add((b.lo, b.hi))
    return sorted(out)


def column_check(gshape, mesh_shape, placements, fqn=None):
    """``check(group_size)`` for :attr:`ShardSpec.check` when dim 1 is split: raises
    ``ValueError`` unless the row length and every column boundary (on every rank, so that all
    ranks agree) are multiples of the group size. None when dim 1 is not split. ``fqn`` as for
    :func:`check_placements`."""
    if not any(placement_kind(pl)[1] == 1 for pl in placements):
        return None
    gshape = tuple(int(s) for s in gshape)
    mesh_shape = tuple(int(s) for s in mesh_shape)
    placements = tuple(placements)

    def check(G: int) -> None:
        L = math.prod(gshape[1:])
        pieces = _column_pieces(gshape, mesh_shape, placements)
        bad = [(lo, hi) for lo, hi in pieces if lo % G or hi % G] if L % G == 0 else pieces
        if not bad:
            return
        D = math.prod(gshape[2:])
        unit = "columns" if D == 1 else f"columns of {D} elements"
        split = ", ".join(f"[{lo // D}, {hi // D})" for lo, hi in pieces)
        widths = sorted({(hi - lo) for lo, hi in pieces})
        tp = [mesh_shape[md] for md, pl in enumerate(placements) if placement_kind(pl)[1] == 1]
        raise ValueError(
            f"{_what(fqn, gshape)} with placements {placements} is split on dim 1 into the {unit} {split} "
            f"(pieces of {'/'.join(map(str, widths))} elements per row; row length {L}), which are not multiples of "
            f"the quantization group size {G}: every row would cut a canonical group at a column boundary, leaving "
            f"two partial groups per row per boundary, and the state could no longer be split like the parameter. "
            f"Fix one of: split dim 1 ({gshape[1]}) into multiples of {G // math.gcd(G, D)} {unit} (it is split "
            f"{' x '.join(map(str, tp))} ways: a smaller tensor-parallel degree, or under FSDP2 a shard_placement_fn "
            f"returning Shard(0) for it); a group_size dividing every piece "
            f"(group_size={math.gcd(G, math.gcd(L, *[x for p in pieces for x in p]))}); or keep the parameter "
            "replicated over that mesh dim (or out of the Flash optimizer)."
        )

    return check
