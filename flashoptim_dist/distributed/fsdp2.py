"""FSDP2 (``fully_shard``) adapter: DTensor parameters → :class:`~flashoptim_dist.layout.ShardSpec`.

FSDP2 replaces every parameter by a DTensor whose local tensor is a block of rows of the global
parameter: placement ``(Shard(0),)`` on a 1-D mesh, ``(Replicate(), Shard(0))`` on an HSDP
(replicate × shard) mesh. Rows are split the way ``torch.chunk`` splits dim 0 — chunk size
``ceil(rows / n)``, trailing ranks possibly short or *empty* — which is what FSDP2
(``_chunk_with_empty``) and DTensor (``Shard._split_tensor``) both do.

A block of rows ``[r0, r0 + n)`` of a parameter whose row length (product of the trailing dims)
is ``L`` is one contiguous run ``[r0·L, (r0 + n)·L)`` of the flattened global parameter, so the
adapter returns a single :class:`~flashoptim_dist.layout.Segment` starting at ``r0·L``. The
optimizer places quantization groups by that global offset, which makes the state of an
N-rank step bit-identical to the one-device step whenever ``r0·L`` is a multiple of the group
size G (always true when ``L % G == 0``; otherwise a shard boundary inside a group leaves a
*partial group* on each side, at most two per rank per parameter).

What the adapter hands the optimizer (:func:`fsdp2_shard_adapter`):

* ``local(p)`` — ``p._local_tensor``, the very tensor FSDP2 all-gathers from (a view into the
  padded ``FSDPParam._sharded_param_data``), so in-place updates reach the model.
  ``p.to_local()`` shares that storage but, on torch ≥ 2.12, wraps it in a fresh view object
  when called on a Parameter; ``_local_tensor`` has been the attribute since DTensor's first
  release and is used whenever it exists.
* ``grad(p)`` — ``p.grad._local_tensor`` (FSDP2's reduce-scattered gradient shard). A gradient
  whose placements differ from the parameter's (e.g. a ``Partial`` gradient that was never
  reduced) is refused, because stepping with it would be silently wrong.

Checks done once per parameter (the result is cached):

* placements must be ``Shard(0)`` or ``Replicate()`` on every mesh dim; anything else
  (``Shard(1)`` from a ``shard_placement_fn``, ``_StridedShard`` from TP+FSDP on dim 0,
  ``Partial``) raises ``ValueError`` naming the placement and the fix;
* the local shape must equal the row block computed above (and, when torch provides it,
  ``compute_local_shape_and_global_offset`` must agree);
* the ``fully_shard`` unit holding the parameter must hold one dtype among its trainable
  parameters (see :func:`check_fsdp2_unit`).

CPU offload (``fully_shard(..., offload_policy=CPUOffloadPolicy())``) is supported: the state is
created next to the offloaded shard on the CPU and the step runs the PyTorch reference there
(correct, but much slower than the fused GPU kernel; a one-time warning says so).
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from typing import Optional, Tuple

import torch

from .. import layout as lay
from ..layout import chunk_range  # noqa: F401  (re-exported: part of this module's API)

__all__ = [
    "fsdp2_shard_adapter",
    "chunk_range",
    "dtensor_row_block",
    "check_fsdp2_unit",
    "is_dtensor",
]


# ---------------------------------------------------------------------------------------------
# cheap DTensor detection: a DTensor can only exist once torch.distributed.tensor is imported


def _dtensor_cls():
    mod = sys.modules.get("torch.distributed.tensor._api")
    return getattr(mod, "DTensor", None) if mod is not None else None


def is_dtensor(t) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


# ---------------------------------------------------------------------------------------------
# row blocks


def _placement_kind(pl) -> str:
    """'replicate', 'shard0' or 'other' (strided shards and Partial are 'other')."""
    name = type(pl).__name__
    if "Strided" in name:  # _StridedShard subclasses Shard in torch < 2.10: test it first
        return "other"
    if getattr(pl, "is_replicate", None) is not None and pl.is_replicate():
        return "replicate"
    if getattr(pl, "is_shard", None) is not None and pl.is_shard() and getattr(pl, "dim", None) == 0:
        return "shard0"
    return "other"


def _unsupported_placement_error(p, placements, bad, fqn: Optional[str]) -> ValueError:
    what = f"parameter {fqn!r}" if fqn else "a parameter"
    return ValueError(
        f"Flash optimizers support FSDP2 parameters sharded on dim 0 only (placements made of "
        f"Shard(0) and Replicate(), e.g. (Shard(0),) for FSDP or (Replicate(), Shard(0)) for HSDP); "
        f"{what} of global shape {tuple(p.shape)} has placements {tuple(placements)} with the "
        f"unsupported placement {bad!r}. Its local block is not a contiguous run of the flattened "
        "parameter, so the canonical quantization groups (contiguous runs of the flattened global "
        "parameter) would be cut in every row. Fix: shard it on dim 0 — drop the "
        "shard_placement_fn passed to fully_shard, or make it return None or Shard(0) for this "
        "parameter; for tensor parallelism, shard it on dim 0 only or keep TP params out of the "
        "Flash optimizer."
    )


def dtensor_row_block(global_rows: int, mesh, placements) -> Tuple[int, int]:
    """(first global row, number of rows) this rank holds of a DTensor whose placements are all
    ``Shard(0)`` or ``Replicate()``. Shards are applied mesh dim by mesh dim, left to right, each
    chunking the previous block like ``torch.chunk`` (DTensor's default order)."""
    coord = mesh.get_coordinate()
    if coord is None:  # this rank is not part of the mesh: it holds nothing
        return 0, 0
    shard_dims = []
    for dim, pl in enumerate(placements):
        kind = _placement_kind(pl)
        if kind == "replicate":
            continue
        if kind != "shard0":
            raise ValueError(f"placement {pl} is not Shard(0)/Replicate()")
        shard_dims.append(dim)
    return lay.shard_block(global_rows, [mesh.size(d) for d in range(len(placements))], coord, shard_dims)


def _local_of(p):
    t = getattr(p, "_local_tensor", None)
    if t is not None:
        return t
    with torch.no_grad():
        return p.to_local()


def _grad_of(p):
    g = p.grad
    if g is None:
        return None
    t = getattr(g, "_local_tensor", None)  # a DTensor gradient (FSDP2 makes them like the param)
    if t is not None:
        gp, pp = g._spec.placements, p._spec.placements
        if gp is pp or gp == pp:  # identity first: this runs for every parameter every step
            return t
    if is_dtensor(g):
        if tuple(g.placements) != tuple(p.placements):
            raise RuntimeError(
                f"the gradient of a DTensor parameter of shape {tuple(p.shape)} has placements "
                f"{tuple(g.placements)} but the parameter has {tuple(p.placements)}: stepping "
                "with it would use an unreduced or differently sharded gradient. Reduce it first, "
                "e.g. p.grad = p.grad.redistribute(placements=p.placements)."
            )
        return _local_of(g)
    return g


# ---------------------------------------------------------------------------------------------
# fully_shard units: mixed dtypes and CPU offload


def _fsdp_param_groups_of_state(state):
    groups = getattr(state, "_fsdp_param_groups", None)  # torch >= 2.12 (per-param meshes)
    if groups is not None:
        return list(groups)
    try:
        g = getattr(state, "_fsdp_param_group", None)  # torch <= 2.11
    except Exception:  # pragma: no cover - the property asserts when there are several
        return []
    return [g] if g is not None else []


# id(sharded_param) -> (weakref(param), weakref(FSDPParamGroup), FSDPParam weakref)
_UNIT_INDEX: dict = {}


def _rebuild_unit_index() -> None:
    _UNIT_INDEX.clear()
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:  # pragma: no cover - very old torch
        return
    for _module, ref in list(_module_state_mapping.items()):
        state = ref() if callable(ref) else ref
        if state is None:
            continue
        for group in _fsdp_param_groups_of_state(state):
            for fp in getattr(group, "fsdp_params", ()) or ():
                sp = getattr(fp, "sharded_param", None)
                if sp is None:
                    continue
                try:
                    _UNIT_INDEX[id(sp)] = (weakref.ref(sp), weakref.ref(group), weakref.ref(fp))
                except TypeError:  # pragma: no cover
                    continue


def _lookup_unit(p):
    for attempt in range(2):
        hit = _UNIT_INDEX.get(id(p))
        if hit is not None and hit[0]() is p:
            return hit[1](), hit[2]()
        if attempt == 0:
            _rebuild_unit_index()
    return None, None


def _param_name_in_unit(group, fp) -> str:
    info = getattr(fp, "_module_info", None)
    if info is None:
        return "?"
    owner, pname = info.module, info.param_name
    prefix = getattr(group, "_module_fqn", None) or ""
    for root in getattr(group, "modules", ()) or ():
        for name, mod in root.named_modules():
            if mod is owner:
                full = ".".join(x for x in (prefix, name, pname) if x)
                return full
    return f"{type(owner).__name__}.{pname}"


def _unit_label(group) -> str:
    fqn = getattr(group, "_module_fqn", None)
    if fqn:
        return repr(fqn)
    mods = getattr(group, "modules", ()) or ()
    if mods:  # FSDP2 swaps the class for FSDP<Name>(FSDPModule, <Name>); show <Name>
        names = []
        for m in mods:
            bases = [b for b in type(m).__bases__ if "FSDPModule" not in b.__name__]
            names.append(bases[0].__name__ if bases else type(m).__name__)
        return "on " + ", ".join(names)
    return "(unknown)"


_OFFLOAD_WARNED = False


def check_fsdp2_unit(p) -> None:
    """Raise if the ``fully_shard`` unit holding DTensor parameter ``p`` mixes parameter dtypes.

    FSDP2 all-gathers and reduce-scatters one flat buffer per unit, so its trainable parameters
    must share one dtype; FSDP2 itself only notices at the first forward, with the bare
    ``AssertionError: FSDP expects uniform original parameter dtype``. Checked when the
    optimizer first sees the parameter, i.e. at construction. A parameter that no ``fully_shard``
    unit owns (e.g. a plain tensor-parallel DTensor) is not checked.
    """
    global _OFFLOAD_WARNED
    group, fp = _lookup_unit(p)
    if group is None:
        return
    if not getattr(group, "_flashoptim_unit_checked", False):
        by_dtype: dict = {}
        for q in getattr(group, "fsdp_params", ()) or ():
            sp = getattr(q, "sharded_param", None)
            if sp is None or not sp.requires_grad:
                continue
            by_dtype.setdefault(sp.dtype, []).append(q)
        if len(by_dtype) > 1:
            parts = []
            for dt, qs in sorted(by_dtype.items(), key=lambda kv: -len(kv[1])):
                names = [_param_name_in_unit(group, q) for q in qs[:3]]
                more = f" and {len(qs) - 3} more" if len(qs) > 3 else ""
                parts.append(f"{dt}: {', '.join(names)}{more}")
            # cast_model keeps chosen layers in fp32: those are the ones to move out
            kept = torch.float32 if torch.float32 in by_dtype else min(by_dtype.items(), key=lambda kv: len(kv[1]))[0]
            raise ValueError(
                f"the fully_shard unit {_unit_label(group)} holds trainable parameters of "
                f"{len(by_dtype)} dtypes ({'; '.join(parts)}). FSDP2 all-gathers and "
                "reduce-scatters one buffer per unit, so a unit must hold one dtype (FSDP2 itself "
                "fails at the first forward with 'FSDP expects uniform original parameter dtype'). "
                f"Fix: layers kept in {kept} must sit in their own fully_shard unit — call "
                "fully_shard(layer) on each of them before fully_shard on the module that contains "
                "them — or cast them like the rest (flashoptim_dist.cast_model(model, "
                "torch.bfloat16, keep_fp32=[...]) before sharding)."
            )
        try:
            group._flashoptim_unit_checked = True
        except Exception:  # pragma: no cover
            pass
    if (
        fp is not None
        and getattr(fp, "offload_to_cpu", False)
        and getattr(p.device_mesh, "device_type", "cpu") != "cpu"
        and not _OFFLOAD_WARNED
    ):
        _OFFLOAD_WARNED = True
        warnings.warn(
            "FSDP2 CPU offload: the Flash optimizer keeps its state next to the offloaded shards on "
            "the CPU and runs the PyTorch reference step there (correct, but much slower than the "
            "fused GPU kernel). Without offload the state is ~3.1 bytes/param/N of GPU memory.",
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------
# the adapter


def _signature(p, local) -> tuple:
    return (tuple(p.placements), id(p.device_mesh), tuple(p.shape), tuple(local.shape))


def _verify_with_torch(p, rows: Tuple[int, int], local_shape) -> None:
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # pragma: no cover - private helper gone: our own computation stands
        return
    try:
        shape, offset = compute_local_shape_and_global_offset(tuple(p.shape), p.device_mesh, p.placements)
    except Exception:  # pragma: no cover - signature changed
        return
    start, n = rows
    if p.dim() == 0:
        return
    if tuple(shape) != tuple(local_shape) or (n > 0 and offset[0] != start):
        raise RuntimeError(
            f"flashoptim_dist computed rows [{start}, {start + n}) for a DTensor of shape "
            f"{tuple(p.shape)} with placements {tuple(p.placements)}, but torch "
            f"{torch.__version__} says local shape {tuple(shape)} at offset {tuple(offset)}. "
            "This torch version shards dim 0 differently; please report it."
        )


# WeakIdKeyDictionary: tensors hash by id but compare elementwise, so a plain weak dict is unsafe.
try:
    from torch.utils.weak import WeakIdKeyDictionary as _WeakIdKeyDictionary
except ImportError:  # pragma: no cover
    _WeakIdKeyDictionary = None

_SPEC_CACHE = _WeakIdKeyDictionary() if _WeakIdKeyDictionary is not None else {}


def _build_spec(p, local) -> lay.ShardSpec:
    placements = tuple(p.placements)
    fqn = None
    for pl in placements:
        if _placement_kind(pl) == "other":
            group, fp = _lookup_unit(p)
            if group is not None and fp is not None:
                fqn = _param_name_in_unit(group, fp)
            raise _unsupported_placement_error(p, placements, pl, fqn)
    check_fsdp2_unit(p)
    gshape = tuple(p.shape)
    gnumel = math.prod(gshape)
    if p.dim() == 0:
        start, nrows, row = 0, 1, 1
    else:
        start, nrows = dtensor_row_block(gshape[0], p.device_mesh, placements)
        row = math.prod(gshape[1:])
    expect_shape = (nrows,) + gshape[1:] if p.dim() else ()
    if tuple(local.shape) != expect_shape and not (nrows == 0 and local.numel() == 0):
        raise RuntimeError(
            f"DTensor parameter of global shape {gshape} with placements {placements}: expected a "
            f"local block of shape {expect_shape} (rows [{start}, {start + nrows}) split like "
            f"torch.chunk), found {tuple(local.shape)}. flashoptim_dist cannot tell which elements "
            "this rank holds; shard it with fully_shard's default Shard(0) placement."
        )
    _verify_with_torch(p, (start, nrows), local.shape)
    seg = lay.Segment(0, local.numel(), start * row if nrows else 0, None, gnumel)
    return lay.ShardSpec(global_shape=gshape, segments=(seg,), local=_local_of, grad=_grad_of)


def fsdp2_release_units(params) -> dict:
    """:func:`~flashoptim_dist.release.register_release_units` hook: FSDP2 reduce-scatters one
    ``fully_shard`` unit at a time and calls its parameters' post-accumulate-grad hooks one after
    the other, their gradients views of one buffer — so gradient release steps a unit at once."""
    out = {}
    for p in params:
        if is_dtensor(p):
            group, _ = _lookup_unit(p)
            if group is not None:
                out[id(p)] = ("fsdp2", id(group))
    return out


def fsdp2_shard_adapter(p) -> Optional[lay.ShardSpec]:
    """:func:`~flashoptim_dist.layout.register_shard_adapter` hook: the ShardSpec of a DTensor
    parameter (FSDP2 / HSDP), ``None`` for anything else."""
    if not is_dtensor(p):
        return None
    local = _local_of(p)
    sig = _signature(p, local)
    hit = _SPEC_CACHE.get(p)
    if hit is not None and hit[0] == sig:
        return hit[1]
    spec = _build_spec(p, local)
    _SPEC_CACHE[p] = (sig, spec)
    return spec
