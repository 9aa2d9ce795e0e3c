"""FSDP2 / HSDP / tensor-parallel adapter: DTensor parameters → :class:`~flashoptim_dist.layout.ShardSpec`.

FSDP2 replaces every parameter by a DTensor whose local tensor is a block of rows of the global
parameter: placement ``(Shard(0),)`` on a 1-D mesh, ``(Replicate(), Shard(0))`` on an HSDP
(replicate × shard) mesh. Rows are split the way ``torch.chunk`` splits dim 0 — chunk size
``ceil(rows / n)``, trailing ranks possibly short or *empty*. Tensor parallelism
(``parallelize_module``) adds ``Shard(0)`` (colwise), ``Shard(1)`` (rowwise) and, with FSDP on top,
``_StridedShard(0)``; torchtitan's FSDP + TP plan gives ``(_StridedShard(0, tp), Shard(0))``
(colwise), ``(Shard(0), Shard(1))`` (rowwise) and ``(Shard(0), Replicate())`` (norms under
sequence parallelism) on a (dp, tp) mesh, HSDP a leading ``Replicate()``.

:mod:`flashoptim_dist.placements` turns any of these into the rows and the range of each row a rank holds (torch's own
split functions, cross-checked against ``compute_local_shape_and_global_offset``) and into segments
of the flattened global parameter: one per run of whole rows (FSDP2's row block is one segment,
placed at ``first_row × row_length``), one per local row under a ``Shard(1)`` column split. The
optimizer places quantization groups by those global offsets, which makes the state of a sharded
step bit-identical to the one-device step wherever no shard boundary falls inside a group (always
for a ≥ 2-D parameter whose row length is a multiple of G; column splits that would cut groups are
refused, :func:`flashoptim_dist.placements.column_check`). A dim-0 boundary inside a group leaves a *partial group*
on each side (at most two per run of rows).

What the adapter hands the optimizer (:func:`fsdp2_shard_adapter`):

* ``local(p)`` — ``p._local_tensor``, the very tensor FSDP2 all-gathers from (a view into the
  padded ``FSDPParam._sharded_param_data``), so in-place updates reach the model.
  ``p.to_local()`` shares that storage but, on torch ≥ 2.12, wraps it in a fresh view object
  when called on a Parameter; ``_local_tensor`` has been the attribute since DTensor's first
  release and is used whenever it exists.
* ``grad(p)`` — ``p.grad._local_tensor`` (FSDP2's reduce-scattered gradient shard; under plain
  TP the DTensor gradient autograd made). A gradient whose placements differ from the
  parameter's — a ``Partial`` gradient that was never reduced, e.g. of a norm weight under
  sequence parallelism without FSDP — is refused, because stepping with it would be silently
  wrong; :func:`reduce_partial_grads` reduces them (torch's optimizers do it implicitly through
  DTensor arithmetic).
* ``block`` — the :class:`~flashoptim_dist.layout.RowBlock` (rows × range of each row), and
  ``check`` — the column-split check, run with the optimizer's group size at construction.

Checks done once per parameter (the result is cached):

* placements must be ``Replicate()``, ``Shard(0)``, ``Shard(1)`` or ``_StridedShard(0)``;
  ``Partial`` and the rest raise ``ValueError`` naming the placement and the fix;
* the local shape must equal the block computed above, and torch's
  ``compute_local_shape_and_global_offset`` must agree;
* the ``fully_shard`` unit holding the parameter must hold one dtype among its trainable
  parameters (see :func:`check_fsdp2_unit`).

CPU offload (``fully_shard(..., offload_policy=CPUOffloadPolicy())``) is supported: the state is
created next to the offloaded shard on the CPU and the step runs the PyTorch reference there
(correct, but much slower than the fused GPU kernel; a one-time warning says so).
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Optional, Tuple

import torch

from .. import layout as lay
from .._dist import is_dtensor
from ..layout import chunk_range  # noqa: F401  (re-exported: part of this module's API)
from .. import placements as dt

__all__ = [
    "fsdp2_shard_adapter",
    "chunk_range",
    "dtensor_row_block",
    "check_fsdp2_unit",
    "is_dtensor",
    "reduce_partial_grads",
]


# ---------------------------------------------------------------------------------------------
# cheap DTensor detection: a DTensor can only exist once torch.distributed.tensor is imported


# ---------------------------------------------------------------------------------------------
# row blocks


def _placement_kind(pl) -> str:
    """'replicate', 'shard0' or 'other' (every other placement, strided shards included)."""
    kind, dim = dt.placement_kind(pl)
    if kind == "shard" and dim == 0:
        return "shard0"
    return kind if kind == "replicate" else "other"


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
            partial = any(dt.placement_kind(pl)[0] == "partial" for pl in g.placements)
            why = (
                " A Partial gradient is a per-rank partial sum: under tensor parallelism this is the gradient of a "
                "replicated parameter (a norm weight under sequence parallelism) that no FSDP reduce-scatter "
                "reduced. Call flashoptim_dist.distributed.reduce_partial_grads(model) after backward (torch's "
                "optimizers reduce it implicitly through DTensor arithmetic), or shard the model with fully_shard."
                if partial else ""
            )
            raise RuntimeError(
                f"the gradient of a DTensor parameter of shape {tuple(p.shape)} has placements "
                f"{tuple(g.placements)} but the parameter has {tuple(p.placements)}: stepping "
                "with it would use an unreduced or differently sharded gradient. Reduce it first, "
                f"e.g. p.grad = p.grad.redistribute(placements=p.placements).{why}"
            )
        return _local_of(g)
    return g


@torch.no_grad()
def reduce_partial_grads(model_or_params) -> int:
    """Redistribute every DTensor gradient whose placements differ from its parameter's (e.g.
    ``Partial`` gradients of replicated norm weights under sequence parallelism without FSDP) to
    the parameter's placements — an all-reduce over the partial mesh dims. Call it on every rank
    after backward and before ``step()``/clipping; returns how many gradients it reduced.
    Collective: every rank must call it with the same parameters. Not for gradient release (the
    hooks step before it could run)."""
    params = model_or_params.parameters() if hasattr(model_or_params, "parameters") else model_or_params
    n = 0
    for p in params:
        g = p.grad
        if g is None or not is_dtensor(g) or not is_dtensor(p) or tuple(g.placements) == tuple(p.placements):
            continue
        p.grad = g.redistribute(p.device_mesh, p.placements)
        n += 1
    return n


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


# WeakIdKeyDictionary: tensors hash by id but compare elementwise, so a plain weak dict is unsafe.
try:
    from torch.utils.weak import WeakIdKeyDictionary as _WeakIdKeyDictionary
except ImportError:  # pragma: no cover
    _WeakIdKeyDictionary = None

_SPEC_CACHE = _WeakIdKeyDictionary() if _WeakIdKeyDictionary is not None else {}


def _fqn_finder(p):
    """A zero-argument callable naming ``p`` for error messages (the FSDP2 unit lookup scans the
    model, so it runs only when an error is worded); holds ``p`` weakly (it lives in the spec,
    which the weak-keyed spec cache keeps)."""
    ref = weakref.ref(p)

    def find() -> Optional[str]:
        q = ref()
        if q is None:
            return None
        group, fp = _lookup_unit(q)
        return _param_name_in_unit(group, fp) if group is not None and fp is not None else None

    return find


def _build_spec(p, local) -> lay.ShardSpec:
    placements = tuple(p.placements)
    gshape = tuple(p.shape)
    name = _fqn_finder(p)
    dt.check_placements(gshape, placements, name)
    check_fsdp2_unit(p)
    block = dt.dtensor_block(p, tuple(local.shape), name)
    segments = block.segments(math.prod(gshape))
    return lay.ShardSpec(global_shape=gshape, segments=segments, local=_local_of, grad=_grad_of, block=block,
                         check=dt.column_check(gshape, tuple(p.device_mesh.shape), placements, name))


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
