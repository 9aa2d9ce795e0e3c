"""How a Flash optimizer's state leaves through ``state_dict()`` and comes back through
``load_state_dict()``: in forms that torch's state-dict APIs, DCP and FSDP1 reshard correctly.

The optimizer *stores* each tensor's state in this rank's local layout (flat ρ and codes, one
bf16 scale per canonical group the rank touches; :mod:`flashoptim_dist.layout`). A state dict is
read by code that knows nothing of groups or segments — DCP's planner, torch's
``get_state_dict``/``set_state_dict`` (full, sharded, CPU-offloaded, broadcast, flattened),
FSDP1's ``optim_state_dict`` — so ``state_dict()`` exposes each tensor's state in one of three
forms, chosen per parameter (``ShardSpec.state_dict_form``, :func:`form_of`):

**Global** (``layout.FORM_GLOBAL``): DTensor parameters (FSDP2, HSDP) and whole tensors (one
device, DDP). ρ and the moment states (8-bit codes, or fp32 values) have the parameter's global
shape; for a DTensor parameter they are DTensors with its mesh and placements whose local part
is the rank's block of rows — a view of the stored state, no copy. Scales use the **row layout**:
shape ``(R, K)``, R = the parameter's dim 0 (1 for a 0-d one), K = the most canonical groups one
row touches; ``[r, j]`` is the scale of the j-th group touching row r, zero padded. Split on dim
0 like the parameter, it hands every rank exactly the scales of the groups its rows touch on any
number of ranks, so DCP reshards it like any DTensor (uneven and empty shards, HSDP) and the
full state dict is plain tensors.

    Why rows and not the flat vector of ``ceil(numel/G)`` scales: a DTensor split of that
    vector does not follow the parameter's row split (the chunk sizes differ), and DCP places a
    DTensor's local chunk only where ``compute_local_shape_and_global_offset`` says, so every
    save and load would have to move scales between ranks. When the row length L is a multiple
    of G (every matrix of a transformer) the row layout *is* the flat vector, ``K = L/G``, a view
    of the stored scales. Otherwise a group that spans two rows appears in both, K ≤ ceil(L/G)+1.
    Bytes: 2·R·K per state — a 1-D parameter gets one scale per element (2 bytes instead of 2/G;
    norms and biases are ~0.01 % of a transformer's elements).

    Tensor parallelism: a ``Shard(1)`` column split is accepted only where it cuts no group
    (:mod:`flashoptim_dist.placements`): the row length and every column boundary are
    multiples of G, so ``K = L/G`` and torch's split of the K scales of a row over the TP ranks
    gives each rank exactly the scales of its columns — the scales are a DTensor with the
    parameter's placements again (checked against torch for every parameter: a 3-D parameter
    whose dim-1 split does not map onto that chunking is refused by ``state_dict()``, naming
    :mod:`flashoptim_dist.checkpoint`, which has no such limit). Rows held as several runs
    (``_StridedShard(0)``) export each run's scales in local order, like the parameter.

    Partial groups: a block boundary inside a group (L % G ≠ 0, or a 1-D parameter whose chunk
    is not a multiple of G) leaves one scale per side. Before exposing them the ranks agree on
    the larger — one all-reduce MAX of those scales over the mesh, only when such a boundary
    exists, which depends on the global shape and the mesh only (the same answer on every rank)
    — and the smaller side's codes are re-expressed against it (:mod:`flashoptim_dist.canonical`,
    the code ``flashoptim_dist.checkpoint.save`` uses): what leaves is canonical. The stored
    state is not modified. ``state_dict()`` is then collective: call it on every rank of the
    mesh (``get_state_dict`` does).

**Elementwise** (``layout.FORM_ELEMENTWISE``): FSDP1. FSDP1's ``optim_state_dict`` gathers each
state as one value per element of the local flat shard, all states of a unit in one dtype, and
``optim_state_dict_to_load`` cuts them back the same way (collectives move them: NCCL and gloo
have no int16). So: bfloat16 for ρ (int8), the codes (int8/uint8) and each element's group scale
— all exact in bf16; float32 for all when ρ is int16 (``master_weight_bits=32``) or
``quantize=False``. 10 bytes per element for FlashAdamW-24 (torch AdamW: 8). Each side of a
partial group keeps its scale per element; loading reconciles a group whose elements carry
different scales (the larger wins, the other codes are re-expressed), which only happens on
another world size.

**Local** (``layout.FORM_LOCAL``): anything else (DeepSpeed flat partitions, custom ShardSpecs):
the stored tensors themselves, this rank's slice — a per-rank format, exact on the same
sharding (DeepSpeed's own checkpoints save it per rank). DCP would take such a tensor for a
replicated one; reshard these with :mod:`flashoptim_dist.checkpoint`.

``load_state_dict`` reads the global form written on any sharding (DTensors of any placements on
the parameter's mesh, full plain tensors), the elementwise form, and the stored form (state
dicts of format version 1, per-rank files).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import layout as lay
from .._dist import is_dtensor
from ..canonical import canonical_run, cut_groups, requantize
from ..placements import block_at, mesh_dims_sharding
from ..reference import FAMILIES

__all__ = [
    "form_of",
    "scale_rows_shape",
    "export_states",
    "import_state",
    "local_elementwise",
    "as_global",
    "is_dtensor",
]


def _whole(p, spec: lay.ShardSpec) -> bool:
    if spec.local is not None or len(spec.segments) != 1 or tuple(spec.global_shape) != tuple(p.shape):
        return False
    s = spec.segments[0]
    # a keyed segment is a fragment of a named parameter inside a packed tensor, not the tensor
    return s.key is None and s.local_start == 0 and s.global_start == 0 and s.length == p.numel()


def form_of(p, spec: lay.ShardSpec) -> str:
    """The form ``state_dict()`` gives ``p``'s state (see the module docstring)."""
    if spec.state_dict_form is not None:
        return spec.state_dict_form
    if (is_dtensor(p) and (spec.block is not None or len(spec.segments) == 1)) or _whole(p, spec):
        return lay.FORM_GLOBAL
    return lay.FORM_LOCAL


# ------------------------------------------------------------------------------ row layout


@functools.lru_cache(maxsize=4096)
def _row_width(R: int, L: int, G: int) -> int:
    """K: the most canonical groups one row of length L touches (rows start at r·L)."""
    if R == 0 or L == 0:
        return 0
    if L % G == 0:
        return L // G
    period = G // math.gcd(L, G)  # the phase (r·L) % G repeats with this period in r
    return max(((r * L) % G + L - 1) // G + 1 for r in range(min(R, period)))


def scale_rows_shape(global_shape, group_size: int) -> Tuple[int, int]:
    """``(R, K)``: shape of the row layout of a parameter's scales (see the module docstring)."""
    R, L = _rows_of(tuple(global_shape))
    return R, _row_width(R, L, group_size)


def _rows_of(gshape: tuple) -> Tuple[int, int]:
    """(rows, row length) of a global shape; a 0-d tensor is one row of one element."""
    if len(gshape) == 0:
        return 1, 1
    return int(gshape[0]), math.prod(gshape[1:])


def _row_groups(r0: int, n: int, L: int, K: int, G: int):
    """For rows [r0, r0+n): the global group of each (row, slot) and which slots are real."""
    r = torch.arange(r0, r0 + n, dtype=torch.int64).unsqueeze(1)
    first = (r * L) // G
    count = ((r * L) % G + L - 1) // G + 1
    j = torch.arange(K, dtype=torch.int64).unsqueeze(0)
    return first + j, j < count


def _scales_to_rows(sc: torch.Tensor, r0: int, n: int, L: int, K: int, G: int) -> torch.Tensor:
    """The row layout ``(n, K)`` of rows [r0, r0+n) from their local scale vector (whose first
    entry is the group of element r0·L)."""
    if n == 0 or K == 0:
        return sc.new_zeros((n, K))
    if L % G == 0:
        return sc.view(n, K)  # the rows are the flat vector itself
    groups, real = _row_groups(r0, n, L, K, G)
    local = torch.where(real, groups - (r0 * L) // G, sc.numel()).to(sc.device)
    return torch.cat([sc, sc.new_zeros(1)])[local]


def _rows_to_scales(rows: torch.Tensor, r0: int, n: int, L: int, G: int, n_scales: int) -> torch.Tensor:
    """The local scale vector of rows [r0, r0+n) from their row layout: group g is read from
    the first of these rows that touches it."""
    if n_scales == 0:
        return rows.new_zeros(0)
    if L % G == 0:
        return rows.reshape(-1)
    g = torch.arange(n_scales, dtype=torch.int64) + (r0 * L) // G
    r = ((g * G) // L).clamp(r0, r0 + n - 1)
    col = g - (r * L) // G
    return rows[(r - r0).to(rows.device), col.to(rows.device)]


# ------------------------------------------------------------------------------ partial groups


@functools.lru_cache(maxsize=4096)
def _mesh_cut_groups(gshape: tuple, mesh_sizes: tuple, placements: tuple, G: int) -> Tuple[int, ...]:
    """Every canonical group that a boundary between two ranks' runs cuts, over the whole mesh
    (the same on every rank: global shape, mesh and placements only)."""
    R, L = _rows_of(gshape)
    numel = R * L
    dims = mesh_dims_sharding(placements)
    # rows start at multiples of L: with L % G == 0 only a column split could cut, and the
    # adapter accepts column splits only at multiples of G
    if L % G == 0 or not dims or numel == 0:
        return ()
    cuts = set()
    for sub in itertools.product(*(range(mesh_sizes[d]) for d in dims)):
        coord = [0] * len(mesh_sizes)
        for d, c in zip(dims, sub):
            coord[d] = c
        for seg in block_at(gshape, mesh_sizes, coord, placements).segments(numel):
            cuts.update(cut_groups(seg.global_start, seg.length, numel, G))
    return tuple(sorted(cuts))


def _mesh_device(mesh) -> torch.device:
    kind = mesh.device_type
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


def _agree_cut_scales(entries: List[dict], G: int) -> Dict[tuple, float]:
    """(param index, state, group) -> agreed (largest) scale of every cut group of the DTensor
    entries: one all-reduce MAX per sharded mesh dim, per mesh, only where cuts exist."""
    by_mesh: Dict[Any, List[Tuple[dict, tuple]]] = {}
    for e in entries:
        p = e["p"]
        cuts = _mesh_cut_groups(tuple(e["spec"].global_shape), tuple(p.device_mesh.shape), tuple(p.placements), G)
        if cuts:
            by_mesh.setdefault(p.device_mesh, []).append((e, cuts))
    agreed: Dict[tuple, float] = {}
    for mesh, ents in by_mesh.items():
        slots, vals = [], []
        dims = set()
        for e, cuts in ents:
            dims.update(mesh_dims_sharding(e["p"].placements))
            layout = e["layout"]
            for name, _ in e["quantized"]:
                sc = e["st"][name + "_scales"]
                mine: Dict[int, float] = {}  # this rank's scale of each cut group it touches (scales are >= 0)
                for run in lay.segment_runs(layout):
                    seg = run.segment
                    g_lo, g_hi = seg.global_start // G, (seg.global_start + seg.length - 1) // G
                    for g in cuts[bisect.bisect_left(cuts, g_lo) : bisect.bisect_right(cuts, g_hi)]:
                        mine[g] = max(mine.get(g, 0.0), float(sc[run.scale_start + g - g_lo]))
                for g in cuts:
                    slots.append((e["pid"], name, g))
                    vals.append(mine.get(g, 0.0))
        buf = torch.tensor(vals, dtype=torch.float32, device=_mesh_device(mesh))
        for d in sorted(dims):
            dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=mesh.get_group(d))
        agreed.update(zip(slots, buf.cpu().tolist()))
    return agreed


# ------------------------------------------------------------------------------ export


def _contiguous_stride(shape) -> Tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(tuple(shape)):
        stride.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(stride))


def as_global(p, local: torch.Tensor, shape=None):
    """``local`` (this rank's block of rows of a tensor of global ``shape``, default ``p``'s) as a
    DTensor with ``p``'s mesh and placements when ``p`` is a DTensor; ``local`` itself otherwise."""
    if not is_dtensor(p):
        return local
    from torch.distributed.tensor import DTensor

    shape = tuple(p.shape) if shape is None else tuple(shape)
    return DTensor.from_local(
        local, p.device_mesh, p.placements, run_check=False, shape=torch.Size(shape), stride=_contiguous_stride(shape)
    )


def _global_geometry(p, spec: lay.ShardSpec, local: torch.Tensor):
    """(global shape, local shape, R, L, block) of a global-form tensor: the
    :class:`~flashoptim_dist.layout.RowBlock` this rank holds (all rows for a whole tensor)."""
    gshape = tuple(spec.global_shape)
    R, L = _rows_of(gshape)
    lshape = tuple(local.shape) if is_dtensor(p) else gshape
    block = spec.block
    if block is None:  # a whole tensor, or a one-segment DTensor spec without a block: whole rows
        seg = spec.segments[0]
        n = (lshape[0] if lshape else 1) if seg.length else 0
        r0 = seg.global_start // L if (L and n) else 0
        block = lay.RowBlock(((r0, n),) if n else (), 0, L, L)
    return gshape, lshape, R, L, block


def _block_scale_rows(sc: torch.Tensor, layout, block: lay.RowBlock, K: int, G: int) -> torch.Tensor:
    """This rank's rows of the row layout ``(n, K_local)`` from its stored scale vector: all K
    slots of each held row, or — under an (aligned) column split — the slots of its columns."""
    n, L = block.n_rows, block.row_length
    if not block.whole_rows:  # aligned column split: one segment (w/G scales) per row, in order
        return sc.view(n, block.width // G) if n else sc.new_zeros((0, block.width // G))
    if L % G == 0 or not block.row_runs:
        return sc.view(n, K) if n else sc.new_zeros((0, K))
    parts = [
        _scales_to_rows(sc[soff : soff + seg.n_groups(G)], r0, cnt, L, K, G)
        for (r0, cnt), seg, soff in zip(block.row_runs, layout.segments, layout.scale_offsets)
    ]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _block_rows_to_scales(rows: torch.Tensor, layout, block: lay.RowBlock, G: int) -> torch.Tensor:
    """Inverse of :func:`_block_scale_rows`: the stored scale vector from this rank's rows."""
    L = block.row_length
    if not block.whole_rows or L % G == 0 or not block.row_runs:
        return rows.reshape(-1)[: layout.n_scales] if layout.n_scales else rows.new_zeros(0)
    parts, i = [], 0
    for (r0, cnt), seg in zip(block.row_runs, layout.segments):
        parts.append(_rows_to_scales(rows[i : i + cnt], r0, cnt, L, G, seg.n_groups(G)))
        i += cnt
    return torch.cat(parts) if len(parts) > 1 else parts[0]


@functools.lru_cache(maxsize=4096)
def _scale_split_ok(gshape: tuple, K: int, G: int, mesh, placements: tuple, block: lay.RowBlock) -> bool:
    """Whether torch splits the ``(R, K)`` scale rows under ``placements`` into exactly this
    rank's ``(rows, scales of its columns)`` (always, unless a 3-D parameter's dim-1 split does
    not map onto torch.chunk of K)."""
    if block.whole_rows:
        return True  # placements split dim 0 only: the scale rows split like the parameter's rows
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # pragma: no cover
        return True
    shape, offset = compute_local_shape_and_global_offset((gshape[0], K), mesh, placements)
    n, w = block.n_rows, block.width // G
    return tuple(shape) == (n, w) and (
        n == 0 or w == 0 or (offset[0] == block.row_runs[0][0] and offset[1] == block.lo // G)
    )


def _export_global(e: dict, G: int, agreed: Dict[tuple, float]) -> dict:
    p, spec, layout, st, local = e["p"], e["spec"], e["layout"], e["st"], e["local"]
    gshape, lshape, R, L, block = _global_geometry(p, spec, local)
    K = _row_width(R, L, G)
    kinds = dict(e["quantized"])
    if kinds and is_dtensor(p) and not _scale_split_ok(gshape, K, G, p.device_mesh, tuple(p.placements), block):
        raise ValueError(
            f"state_dict() cannot express the scales of a parameter of global shape {gshape} with placements "
            f"{tuple(p.placements)} as a DTensor split like the parameter: its dim-1 split gives this rank "
            f"{block.width // G} groups per row, which torch's split of the {K} scales of a row does not. Save this "
            "optimizer with flashoptim_dist.checkpoint.save (any split), or split dim 1 into pieces whose element "
            "counts are equal multiples of the group size."
        )
    out: Dict[str, Any] = {}
    for k, v in st.items():
        if not torch.is_tensor(v) or v.dim() == 0:
            out[k] = v
        elif k in kinds:
            codes, sc = v, st[k + "_scales"]
            if agreed:
                codes, sc = _canonical_runs(
                    codes, sc, kinds[k], layout, spec.global_numel, G, lambda g, k=k: agreed.get((e["pid"], k, g))
                )
            out[k] = as_global(p, codes.view(lshape), gshape)
            out[k + "_scales"] = as_global(p, _block_scale_rows(sc, layout, block, K, G), (R, K))
        elif k.endswith("_scales") and k[: -len("_scales")] in kinds:
            continue  # written with its codes
        elif v.numel() == layout.numel:  # ρ, fp32 moments: one value per element
            out[k] = as_global(p, v.view(lshape), gshape)
        else:
            raise ValueError(
                f"optimizer state {k!r} of a parameter of global shape {gshape} has {v.numel()} elements, neither "
                f"one per local element ({layout.numel}) nor a known per-group state; state_dict() cannot express it "
                "in the parameter's global layout. Save this optimizer with flashoptim_dist.checkpoint.save."
            )
    return out


def _canonical_runs(codes, scales, kind, layout, numel: int, G: int, agreed):
    """:func:`~flashoptim_dist.canonical.canonical_run` of every segment of a tensor: new codes
    and scales where a cut group's agreed scale differs from the rank's own (the inputs
    otherwise; never modified)."""
    out_c, out_s = codes, scales
    for run in lay.segment_runs(layout):
        cs, ss = codes[run.local], scales[run.scales]
        c, sc = canonical_run(cs, ss, kind, run.segment.global_start, numel, G, agreed)
        if c is cs and sc is ss:  # no cut group of this run changed
            continue
        if out_c is codes:
            out_c, out_s = codes.clone(), scales.clone()
        out_c[run.local] = c
        out_s[run.scales] = sc
    return out_c, out_s


def _group_counts(seg: lay.Segment, G: int) -> torch.Tensor:
    """How many of the segment's elements fall in each canonical group it touches."""
    ph, n = seg.phase(G), seg.length
    ng = seg.n_groups(G)
    ends = torch.clamp(torch.arange(1, ng + 1, dtype=torch.int64) * G - ph, max=n)
    starts = torch.clamp(torch.arange(ng, dtype=torch.int64) * G - ph, min=0)
    return ends - starts


def _elementwise_dtype(layout) -> torch.dtype:
    """One dtype that holds every state value exactly: bf16 has 8 significant bits (int8 ρ,
    8-bit codes, bf16 scales); int16 ρ and fp32 moments need float32."""
    return torch.bfloat16 if layout.quantized and layout.rho_dtype in (None, torch.int8) else torch.float32


def _export_elementwise(e: dict, G: int) -> dict:
    layout, st = e["layout"], e["st"]
    xdt = _elementwise_dtype(layout)
    out: Dict[str, Any] = {}
    for k, v in st.items():
        if not torch.is_tensor(v) or v.dim() == 0:
            out[k] = v
        elif k.endswith("_scales"):
            per = v.new_empty(layout.numel)
            for run in lay.segment_runs(layout):
                per[run.local] = torch.repeat_interleave(v[run.scales], _group_counts(run.segment, G).to(v.device))
            out[k] = per.to(xdt)  # FSDP1 moves one dtype per unit
        else:
            out[k] = v.to(xdt)  # exact (see _elementwise_dtype)
    return out


def export_states(opt, packed: Dict[int, dict]) -> Dict[int, dict]:
    """The ``"state"`` entry of ``opt.state_dict()`` from torch's packed one (index → the live
    state dicts, which are never modified)."""
    params = [(p, g) for g in opt.param_groups for p in g["params"]]
    G = opt.config.group_size
    entries, out = [], {}
    for idx, st in packed.items():
        p, group = params[idx]
        if "step" not in st:
            out[idx] = dict(st)
            continue
        info = opt._info.get(p) or opt._make_info(p)
        local = info.spec.local(p) if info.spec.local is not None else p
        quantized = list(FAMILIES[opt.family][: opt._n_states(group)]) if info.layout.quantized else []
        entries.append(
            {
                "pid": idx,
                "p": p,
                "spec": info.spec,
                "layout": info.layout,
                "st": st,
                "local": local,
                "form": form_of(p, info.spec),
                "quantized": quantized,
            }
        )
    dtensors = [e for e in entries if e["form"] == lay.FORM_GLOBAL and e["quantized"] and is_dtensor(e["p"])]
    agreed = _agree_cut_scales(dtensors, G) if dtensors else {}
    for e in entries:
        if e["form"] == lay.FORM_GLOBAL:
            out[e["pid"]] = _export_global(e, G, agreed)
        elif e["form"] == lay.FORM_ELEMENTWISE:
            out[e["pid"]] = _export_elementwise(e, G)
        else:
            out[e["pid"]] = dict(e["st"])
    return out


# ------------------------------------------------------------------------------ import


def _describe(v) -> str:
    if is_dtensor(v):
        return f"DTensor {tuple(v.shape)} {v.dtype} placements {tuple(v.placements)}"
    return f"tensor {tuple(v.shape)} {v.dtype}"


def _local_block(v, p, expected: tuple, block: lay.RowBlock, cols: Tuple[int, int]) -> Optional[torch.Tensor]:
    """This rank's part of a global-form tensor ``v`` of shape ``expected`` (a DTensor of any
    placements, or a full plain tensor): the block's rows, and of each row the range ``cols``
    (of ``expected``'s flattened trailing dims); None if ``v`` is not of that shape."""
    if tuple(v.shape) != tuple(expected):
        return None
    n = block.n_rows
    if is_dtensor(v):
        if is_dtensor(p) and v.device_mesh == p.device_mesh:
            if tuple(v.placements) != tuple(p.placements):
                v = v.redistribute(p.device_mesh, p.placements)
            loc = v.to_local()
            if loc.dim() and loc.shape[0] != n:
                raise ValueError(
                    f"a loaded DTensor of shape {tuple(v.shape)} holds {loc.shape[0]} rows on this rank, the parameter "
                    f"{n}: its local chunk is not the standard split of its placements {tuple(v.placements)}"
                )
            return loc
        v = v.full_tensor()  # another mesh, or a plain parameter: gather, then take our part
    if v.dim() == 0:
        return v
    rows = v.reshape(v.shape[0], math.prod(v.shape[1:]))
    lo, hi = cols
    if block.row_runs == ((0, v.shape[0]),):
        part = rows[:, lo:hi]
    else:
        part = rows[block.rows().to(v.device)][:, lo:hi] if n else rows[:0, lo:hi]
    return part


def _shape_error(k, v, p, gshape, expected, stored) -> ValueError:
    return ValueError(
        f"loaded optimizer state {k!r} for a parameter of global shape {gshape} is a {_describe(v)}; expected the "
        f"global layout of state_dict() ({expected}) or this rank's stored layout ({stored}). The state dict belongs "
        "to a different model or numeric config (group_size): load it into the optimizer it was written by, or "
        "convert it with flashoptim_dist.checkpoint (save + load(..., convert=True))"
    )


def _import_global(p, spec, layout, st, G: int) -> dict:
    local = spec.local(p) if spec.local is not None else p
    gshape, lshape, R, L, block = _global_geometry(p, spec, local)
    K = _row_width(R, L, G)
    kcols = (0, K) if block.whole_rows else (block.lo // G, block.hi // G)
    out: Dict[str, Any] = {}
    for k, v in st.items():
        if not torch.is_tensor(v) or v.dim() == 0:
            out[k] = v
        elif k.endswith("_scales"):
            blk = _local_block(v, p, (R, K), block, kcols)
            if blk is not None:
                out[k] = _block_rows_to_scales(blk, layout, block, G)
            elif not is_dtensor(v) and v.dim() == 1 and v.numel() == layout.n_scales:
                out[k] = v  # stored form (format version 1, per-rank files)
            else:
                raise _shape_error(k, v, p, gshape, f"({R}, {K})", f"({layout.n_scales},)")
        else:
            blk = _local_block(v, p, gshape, block, (block.lo, block.hi))
            if blk is not None:
                out[k] = blk.reshape(-1)
            elif not is_dtensor(v) and v.numel() == layout.numel and (v.dim() == 1 or tuple(v.shape) == lshape):
                out[k] = v.reshape(-1)
            else:
                raise _shape_error(k, v, p, gshape, str(gshape), f"({layout.numel},)")
    return out


def _narrow(v: torch.Tensor, dtype: torch.dtype, k: str) -> torch.Tensor:
    """The stored integer dtype of an elementwise-form value (exact integers in bf16/fp32)."""
    if v.dtype == dtype:
        return v
    info = torch.iinfo(dtype)
    if v.numel() and (v.min() < info.min or v.max() > info.max or (v.is_floating_point() and (v != v.round()).any())):
        raise ValueError(
            f"loaded optimizer state {k!r} holds values that are not {dtype}: it is not Flash state of this config"
        )
    return v.to(dtype)


def _import_elementwise(p, spec, layout, st, kinds: Dict[str, str], G: int) -> dict:
    out: Dict[str, Any] = {}
    per_elem = {}
    for k, v in st.items():
        if not torch.is_tensor(v) or v.dim() == 0:
            out[k] = v
            continue
        v = v.reshape(-1)
        if k.endswith("_scales") and not (v.dtype == torch.bfloat16 and v.numel() == layout.n_scales):
            if v.numel() != layout.numel:
                raise ValueError(
                    f"loaded optimizer state {k!r} has {v.numel()} values; this rank holds {layout.numel} elements "
                    f"({layout.n_scales} groups): the state dict belongs to a different model or sharding"
                )
            per_elem[k[: -len("_scales")]] = v.to(torch.bfloat16)  # exact: written from bf16
        elif k == "rho" and layout.rho_dtype is not None:
            out[k] = _narrow(v, layout.rho_dtype, k)
        elif k in kinds and layout.quantized:
            out[k] = _narrow(v, torch.int8 if kinds[k] == "signed" else torch.uint8, k)
        else:
            out[k] = v  # fp32 moments, and the stored form (format version 1, per-rank files)
    for name, per in per_elem.items():
        if name not in out:
            raise ValueError(f"loaded optimizer state has {name}_scales but no {name!r}")
        out[name], out[name + "_scales"] = _reconcile(out[name], per, kinds[name], layout, G, name)
    return out


def _reconcile(codes: torch.Tensor, per: torch.Tensor, kind: str, layout, G: int, name: str):
    """Codes and one scale per touched group from one bf16 scale per element. Elements of one
    group carry one scale unless the group was cut on the saving ranks and is whole here: then
    the group takes the largest and the other elements' codes are re-expressed against it."""
    scales = per.new_zeros(layout.n_scales)
    codes = codes.clone()
    for run in lay.segment_runs(layout):
        ng = run.n_groups
        s = per[run.local].float()
        gidx = torch.repeat_interleave(torch.arange(ng, device=s.device), _group_counts(run.segment, G).to(s.device))
        smax = s.new_zeros(ng).scatter_reduce(0, gidx, s, "amax", include_self=False)
        scales[run.scales] = smax.to(torch.bfloat16)  # exact: each is one of the bf16 inputs
        low = (s != smax[gidx]).nonzero().flatten()
        for i in low.tolist():  # rare: a formerly cut group, one element at a time keeps it simple
            j = run.start + i
            s_new = smax[gidx[i]].reshape(1).to(torch.bfloat16)
            codes[j : j + 1] = requantize(codes[j : j + 1], kind, per[j : j + 1], s_new, G, 0).to(codes.device)
    return codes, scales


def import_state(opt, p, st: dict, group: dict) -> dict:
    """One loaded Flash state entry (any form) in this rank's stored layout, ready for
    ``install_state`` (which checks dtypes and sizes)."""
    spec = lay.resolve_shard(p)
    layout = opt._make_info(p).layout
    form = form_of(p, spec)
    G = opt.config.group_size
    if form == lay.FORM_GLOBAL:
        return _import_global(p, spec, layout, st, G)
    if form == lay.FORM_ELEMENTWISE:
        kinds = dict(FAMILIES[opt.family][: opt._n_states(group)])
        return _import_elementwise(p, spec, layout, st, kinds, G)
    return dict(st)


def local_elementwise(p, v: torch.Tensor) -> Optional[torch.Tensor]:
    """This rank's part (flat) of a per-element value given in ``p``'s global shape (a DTensor
    or a full tensor, e.g. torch AdamW's ``exp_avg`` under FSDP2); None if ``v`` is not that."""
    spec = lay.resolve_shard(p)
    if form_of(p, spec) != lay.FORM_GLOBAL:
        return None
    local = spec.local(p) if spec.local is not None else p
    gshape, _, _, _, block = _global_geometry(p, spec, local)
    blk = _local_block(v, p, gshape, block, (block.lo, block.hi))
    return None if blk is None else blk.reshape(-1)
