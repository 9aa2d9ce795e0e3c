"""FSDP1 (``FullyShardedDataParallel``) adapter: flat-parameter slices → ShardSpecs.

FSDP1 concatenates the parameters of a unit into one flat parameter, pads it to a multiple of
the shard world size and gives rank ``r`` the contiguous range ``[r·S, (r+1)·S)`` of it. A rank
therefore holds, of each original parameter, one contiguous run of its flattened elements (maybe
empty), which FSDP records per rank in ``FlatParameter._shard_param_infos``
(``offset_in_shard``, ``numel_in_shard``, ``intra_param_start_idx``).

``use_orig_params=True``
    The optimizer sees the original parameters, each a 1-D view of its run in the local flat
    shard (an empty tensor when the rank holds none of it). Nothing on such a view says where it
    sits in the parameter, so call :func:`prepare_fsdp1` on the wrapped model **before creating
    the optimizer**; it attaches a ShardSpec with one Segment per parameter whose global start
    is ``intra_param_start_idx``. An unprepared FSDP1 parameter reaching a Flash optimizer is
    refused with a message saying so (it would otherwise be grouped in shard-local coordinates,
    making the numerics depend on the world size).

``use_orig_params=False``
    The optimizer sees the ``FlatParameter`` itself: one tensor packing runs of several
    parameters plus padding. :func:`fsdp1_shard_adapter` turns it into one Segment per run
    (``key`` = the parameter's FQN, ``global_start`` = the run's offset in the flattened
    parameter) and one Segment per padding gap (``key`` = ``"<fsdp1 padding>"``, its own groups,
    zero gradient, so it stays zero). This needs no preparation.

State dicts. FSDP1's ``FSDP.optim_state_dict`` / ``optim_state_dict_to_load`` (and torch's
``get_state_dict``/``set_state_dict``, which call them) treat every optimizer state tensor as
one value per element of the local shard, all of one dtype; the specs attached here ask the
optimizer for that form (``layout.FORM_ELEMENTWISE``, see :mod:`flashoptim_dist.optim.state_io`).

Invariance bound. Quantization groups are canonical (runs of G elements of each flattened
parameter). Parameters lying wholly inside a rank's range have canonical groups on that rank.
Only the first parameter of the range can start inside a group and only the last can end inside
one, so a rank holds **at most two partial groups per FlatParameter** (one when both cuts fall
in the same group), and a unit sharded over W ranks has at most W − 1 canonical groups cut. The
step math is elementwise and a group's scale depends only on its own elements, so every element
outside a cut group is bit-identical to the one-device step at every step; inside a cut group
each side quantizes with its own scale (absmax of its side ≤ the canonical absmax), a difference
of the order of one 8-bit quantization step of the moments.
"""

from __future__ import annotations

import sys
from typing import List, Optional

import torch

from .. import layout as lay
from .._dist import is_dtensor

__all__ = ["prepare_fsdp1", "fsdp1_shard_adapter", "FSDP1_PADDING_KEY", "is_fsdp1_param"]

FSDP1_PADDING_KEY = "<fsdp1 padding>"

_REQUIRED_FLAT_ATTRS = ("_shard_param_infos", "_fqns", "_shapes", "_numels")


def _flat_param_cls():
    mod = sys.modules.get("torch.distributed.fsdp._flat_param")
    return getattr(mod, "FlatParameter", None) if mod is not None else None


def is_fsdp1_param(p) -> bool:
    """True for FSDP1 FlatParameters and original parameters managed by FSDP1."""
    return bool(getattr(p, "_fsdp_flattened", False)) and not is_dtensor(p)


def _missing_metadata_error(what: str) -> RuntimeError:
    return RuntimeError(
        f"FSDP1 metadata {what} was not found on this torch ({torch.__version__}): flashoptim_dist "
        "reads FlatParameter._shard_param_infos/_fqns/_shapes/_numels (torch 2.1-2.13) to place "
        "quantization groups. Use FSDP2 (torch.distributed.fsdp.fully_shard), which needs no "
        "private metadata, or a torch version in that range."
    )


def _check_flat_param(fp) -> None:
    for attr in _REQUIRED_FLAT_ATTRS:
        if not hasattr(fp, attr):
            raise _missing_metadata_error(f"FlatParameter.{attr}")
    infos = fp._shard_param_infos
    if infos and not all(
        hasattr(infos[0], f) for f in ("in_shard", "offset_in_shard", "numel_in_shard", "intra_param_start_idx")
    ):
        raise _missing_metadata_error(
            "_ShardParamInfo(in_shard, offset_in_shard, numel_in_shard, intra_param_start_idx)"
        )
    if len(infos) != len(fp._fqns):
        raise _missing_metadata_error("(one _shard_param_infos entry per parameter)")


def _handles(model: torch.nn.Module) -> List:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover
        return []
    out, seen = [], set()
    for name, m in model.named_modules():
        if not isinstance(m, FSDP):
            continue
        hs = getattr(m, "_handle", None)
        hs = [hs] if hs is not None else list(getattr(m, "_handles", []) or [])  # torch 2.0: list
        for h in hs:
            if id(h) not in seen:
                seen.add(id(h))
                out.append((name, h))
    return out


def _clean(name: str) -> str:
    for prefix in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name


def _uses_sharded_strategy(handle) -> bool:
    v = getattr(handle, "uses_sharded_strategy", None)
    if v is None:  # pragma: no cover - older name
        strategy = getattr(handle, "_sharding_strategy", None)
        return strategy is not None and "NO_SHARD" not in str(strategy)
    return bool(v)


def prepare_fsdp1(model: torch.nn.Module) -> int:
    """Attach a canonical-layout ShardSpec to every original parameter of an FSDP1 model
    wrapped with ``use_orig_params=True``. Call it after wrapping and before building the
    optimizer; returns the number of parameters prepared (0 when ``model`` has no FSDP1 unit).

    With ``use_orig_params=False`` the optimizer receives FlatParameters, which carry their own
    metadata; this function then only validates that metadata.
    """
    count = 0
    for prefix, handle in _handles(model):
        fp = getattr(handle, "flat_param", None)
        if fp is None:
            raise _missing_metadata_error("FlatParamHandle.flat_param")
        _check_flat_param(fp)
        params = getattr(fp, "_params", None)
        base = _clean(prefix + "." if prefix else "")
        if params is None:
            # use_orig_params=False: the FlatParameter is what the optimizer sees. Its _fqns are
            # relative to its unit (every block has an "attn.weight"), so attach a spec whose
            # segment keys carry the unit's path: checkpoint keys must be model-global.
            lay.set_shard_spec(fp, _flat_spec(fp, base))
            count += 1
            continue
        sharded = _uses_sharded_strategy(handle)
        for p, info, fqn, shape, numel in zip(params, fp._shard_param_infos, fp._fqns, fp._shapes, fp._numels):
            key = _clean(base + fqn)
            gshape = tuple(shape)
            if not sharded:
                seg = lay.Segment(0, p.numel(), 0, key, int(numel))
            elif info.in_shard:
                seg = lay.Segment(0, int(info.numel_in_shard), int(info.intra_param_start_idx), key, int(numel))
            else:
                seg = lay.Segment(0, 0, 0, key, int(numel))
            if p.numel() != seg.length:
                raise RuntimeError(
                    f"FSDP1 parameter {key!r}: its local view has {p.numel()} elements but FSDP's "
                    f"shard metadata says {seg.length}. prepare_fsdp1 must run while the model is "
                    "in its sharded state (not inside forward/backward or summon_full_params)."
                )
            lay.set_shard_spec(
                p, lay.ShardSpec(global_shape=gshape, segments=(seg,), state_dict_form=lay.FORM_ELEMENTWISE)
            )
            count += 1
    return count


# FlatParameter (use_orig_params=False) specs, cached per flat parameter and local size.
try:
    from torch.utils.weak import WeakIdKeyDictionary as _WeakIdKeyDictionary

    _FLAT_CACHE = _WeakIdKeyDictionary()
except ImportError:  # pragma: no cover
    _FLAT_CACHE = {}


def _flat_spec(fp, prefix: str = "") -> lay.ShardSpec:
    """Spec of a FlatParameter; ``prefix`` (the unit's module path) makes the keys model-global."""
    _check_flat_param(fp)
    n = fp.numel()
    runs = []
    for info, fqn, numel in zip(fp._shard_param_infos, fp._fqns, fp._numels):
        if info.in_shard and info.numel_in_shard:
            runs.append((int(info.offset_in_shard), int(info.numel_in_shard), int(info.intra_param_start_idx),
                         _clean(prefix + fqn), int(numel)))
    runs.sort()
    segs, pos = [], 0
    for off, length, gstart, fqn, numel in runs:
        if off < pos or off + length > n:
            raise RuntimeError(
                f"FSDP1 FlatParameter metadata is inconsistent (run of {fqn!r} at {off}+{length} in a "
                f"local shard of {n} elements); torch {torch.__version__} changed its layout"
            )
        if off > pos:
            segs.append(lay.Segment(pos, off - pos, 0, FSDP1_PADDING_KEY, off - pos))
        segs.append(lay.Segment(off, length, gstart, fqn, numel))
        pos = off + length
    if pos < n:
        segs.append(lay.Segment(pos, n - pos, 0, FSDP1_PADDING_KEY, n - pos))
    shape = (sum(int(x) for x in fp._numels),)
    return lay.ShardSpec(global_shape=shape, segments=tuple(segs), state_dict_form=lay.FORM_ELEMENTWISE)


def fsdp1_shard_adapter(p) -> Optional[lay.ShardSpec]:
    """:func:`~flashoptim_dist.layout.register_shard_adapter` hook for FSDP1.

    FlatParameters get a multi-segment spec; an original parameter that :func:`prepare_fsdp1`
    did not prepare raises (prepared ones never reach adapters: their attached spec wins).
    """
    if not is_fsdp1_param(p):
        return None
    cls = _flat_param_cls()
    if cls is not None and isinstance(p, cls):
        hit = _FLAT_CACHE.get(p)
        if hit is not None and hit[0] == p.numel():
            return hit[1]
        spec = _flat_spec(p)
        _FLAT_CACHE[p] = (p.numel(), spec)
        return spec
    raise RuntimeError(
        f"a parameter of local shape {tuple(p.shape)} belongs to an FSDP1 "
        "(FullyShardedDataParallel, use_orig_params=True) unit but carries no shard layout: each "
        "original parameter is a 1-D slice of FSDP's flat parameter, and without its offset the "
        "quantization groups would depend on the number of ranks. Fix: call "
        "flashoptim_dist.distributed.prepare_fsdp1(fsdp_model) after wrapping and before creating "
        "the optimizer (Lightning's FSDPStrategy: use "
        "flashoptim_dist.integrations.lightning.FlashFSDPStrategy, which does that)."
    )
