"""load(): verify first, then read each rank's slices of the canonical layout through DCP.

Order of work (nothing of the model or optimizer is modified before step 5):

1. COMPLETE manifest present and self-consistent; format version readable.
2. Every file's size, and (``verify="checksum"``, the default) its CRC-32 — the ranks share
   the files between them, so the checkpoint is read once in total.
3. Model fingerprint: parameter FQNs and global shapes equal the model's.
4. Numeric config: equal to the optimizer's, or ``convert=True``.
5. DCP reads into fresh buffers (optimizer state) and staging buffers (parameters); only after
   every read succeeded are parameters copied and the optimizer state installed.
"""

from __future__ import annotations

import os
import random
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .._dist import is_dtensor, rank_world
from ..optim.base import FlashOptimizer
from . import _comm
from . import _format as F
from ._dcp import FlashLoadPlanner
from ._inspect import flash_state_in_dcp
from ._plan import PlannedLoad, Source, _fp32_state, _master, plan_load
from ._plan import install_state  # noqa: F401  (imported from here by ._export)
from ._views import View, build_view


# ------------------------------------------------------------------------------ sources


def _read_dcp_metadata(path: str):
    try:
        return dcp.FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001
        raise F.CorruptCheckpointError(
            f"{os.path.join(path, '.metadata')}: cannot read the DCP metadata ({type(e).__name__}: {e})"
        ) from None


def _flash_source(path: str, verify: str, rank: int, world: int) -> Tuple[Source, List[str]]:
    manifest = F.read_manifest(path)
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > F.FORMAT_VERSION:
        raise F.VersionMismatchError(
            f"{os.path.join(path, F.COMPLETE_FILE)}: checkpoint format version {version} is newer than this "
            f"flashoptim_dist reads ({F.FORMAT_VERSION}); upgrade flashoptim_dist to load it"
        )
    names = sorted(manifest["files"])
    for required in (F.META_FILE, ".metadata"):
        if required not in manifest["files"]:
            raise F.CorruptCheckpointError(
                f"{path}: the manifest does not list {required}; not a flashoptim_dist checkpoint"
            )
    # small files on every rank, big ones shared out
    errs = F.verify_files(path, manifest, [F.META_FILE, ".metadata"], checksums=verify != "none")
    errs += F.verify_files(path, manifest, names, checksums=False)
    if verify == "checksum":
        big = [n for n in names if n not in (F.META_FILE, ".metadata")]
        errs += F.verify_files(path, manifest, big[rank::world], checksums=True)
    import json

    if any(F.META_FILE in e or ".metadata" in e for e in errs):
        return None, errs
    with open(os.path.join(path, F.META_FILE)) as f:
        meta = json.load(f)
    if meta.get("format") != F.FORMAT_NAME:
        raise F.CorruptCheckpointError(f"{os.path.join(path, F.META_FILE)}: not flashoptim_dist checkpoint metadata")
    mv = meta.get("format_version")
    if not isinstance(mv, int) or mv > F.FORMAT_VERSION:
        raise F.VersionMismatchError(
            f"{os.path.join(path, F.META_FILE)}: format version {mv} is newer than this flashoptim_dist reads "
            f"({F.FORMAT_VERSION}); upgrade flashoptim_dist"
        )
    md = _read_dcp_metadata(path)
    params = {
        f: {"shape": tuple(d["shape"]), "dtype": d["stored_dtype"], "key": F.model_key(f)}
        for f, d in meta["model"]["params"].items()
    }
    buffers = {
        f: {"shape": tuple(d["shape"]), "dtype": d["dtype"], "key": F.model_key(f)}
        for f, d in meta["model"]["buffers"].items()
    }
    opt = meta.get("optimizer")
    byte_keys = {}
    if meta["contents"].get("lr_scheduler"):
        byte_keys["lr_scheduler"] = F.KEY_LR_SCHEDULER
    if meta["contents"].get("extra"):
        byte_keys["extra"] = F.KEY_EXTRA
    if meta["contents"].get("rng_ranks", 0) > rank:
        byte_keys["rng"] = F.rng_key(rank)
    src = Source(path, "flash", md, meta, params, buffers, opt, meta.get("world_size"), byte_keys)
    src.linear_rho = version <= 2  # ρ of bf16 parameters in the linear form of those versions
    return src, errs


def _torch_source(path: str) -> Source:
    """A checkpoint written by ``dcp.save({"model": ..., "optim": ...})`` with
    ``get_state_dict`` (plain torch.optim)."""
    md = _read_dcp_metadata(path)
    pd = md.planner_data or {}
    params, states, steps, groups = {}, {}, {}, {}
    for key, smd in md.state_dict_metadata.items():
        p = pd.get(key, tuple(key.split(".")))
        if len(p) == 2 and p[0] == "model" and isinstance(smd, TensorStorageMetadata):
            params[p[1]] = {"shape": tuple(smd.size), "dtype": F.dtype_name(smd.properties.dtype), "key": key}
        elif len(p) == 4 and p[0] == "optim" and p[1] == "state":
            if p[3] == "step":
                steps[p[2]] = key
            else:
                states.setdefault(p[2], {})[p[3]] = key
        elif len(p) == 4 and p[0] == "optim" and p[1] == "param_groups":
            groups.setdefault(int(p[2]), {})[p[3]] = key
    if not params:
        raise F.IncompleteCheckpointError(
            f"{path} is a DCP checkpoint without 'model.*' entries and without {F.COMPLETE_FILE}: it is neither a "
            "flashoptim_dist checkpoint nor a plain get_state_dict() checkpoint"
        )
    if flash_state_in_dcp(md):
        raise F.CheckpointError(
            f"{path} is a standard torch.distributed.checkpoint checkpoint holding Flash optimizer state (written "
            "through torch's get_state_dict + dcp.save): its ρ and 8-bit codes are not torch.optim moments. Load it "
            "the way it was written: msd, osd = get_state_dict(model, optimizer); dcp.load({'model': msd, 'optim': "
            "osd}, checkpoint_id=path); set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)"
        )
    opt = None
    if states:
        names = sorted({n for d in states.values() for n in d})
        opt = {"kind": "torch", "state_keys": states, "step_keys": steps, "group_keys": groups, "state_names": names}
    return Source(path, "torch", md, None, params, {}, opt, None, {})


def open_source(path: str, verify: str, rank: int, world: int) -> Tuple[Optional[Source], List[str]]:
    """Read a checkpoint's description and verify this rank's share of its files (no
    collective); returns (source, errors)."""
    path = os.path.abspath(os.fspath(path))
    if (
        os.path.isdir(path)
        and not os.path.exists(os.path.join(path, F.COMPLETE_FILE))
        and not os.path.exists(os.path.join(path, F.META_FILE))
        and os.path.isfile(os.path.join(path, ".metadata"))
    ):
        return _torch_source(path), []
    return _flash_source(path, verify, rank, world)


def open_verified(path: str, verify: str, group) -> Source:
    """:func:`open_source` on every rank (the ranks share the checksumming); raises the same
    :class:`CorruptCheckpointError` on every rank if any file is damaged."""
    rank, world = rank_world(group)
    box = {}

    def run():
        box["src"], errs = open_source(path, verify, rank, world)
        return sorted(set(errs))

    flat = sorted({e for es in _comm.run_everywhere(run, "reading the checkpoint", group) for e in es})
    if flat:
        raise F.CorruptCheckpointError(
            f"checkpoint {os.path.abspath(os.fspath(path))} is damaged; nothing was loaded. "
            + "; ".join(flat[:10])
            + (f" (and {len(flat) - 10} more)" if len(flat) > 10 else "")
            + ". Load an earlier checkpoint."
        )
    return box["src"]


# ------------------------------------------------------------------------------ checks


def _check_model(src: Source, view: View) -> None:
    if src.kind == "torch":  # plain DCP model state dicts mix buffers in with the parameters
        for f in list(src.params):
            if f in view.buffers and f not in view.params:
                src.buffers[f] = src.params.pop(f)
    have = {f: tuple(pi.global_shape) for f, pi in view.params.items()}
    want = {f: tuple(d["shape"]) for f, d in src.params.items()}
    problems = []
    for f in sorted(set(have) | set(want)):
        if f not in want:
            problems.append(f"{f} {list(have[f])} is in the model but not in the checkpoint")
        elif f not in have:
            problems.append(f"{f} {list(want[f])} is in the checkpoint but not in the model")
        elif have[f] != want[f]:
            problems.append(f"{f}: checkpoint shape {list(want[f])}, model shape {list(have[f])}")
    for f, b in view.buffers.items():
        if src.kind == "flash" and f in src.buffers and tuple(src.buffers[f]["shape"]) != tuple(b.shape):
            problems.append(f"buffer {f}: checkpoint shape {list(src.buffers[f]['shape'])}, model {list(b.shape)}")
    if problems:
        raise F.ModelMismatchError(
            f"checkpoint {src.path} is from a different model ({len(problems)} difference(s)); nothing was loaded: "
            + "; ".join(problems[:8])
            + (" ..." if len(problems) > 8 else "")
        )


def _needs_conversion(src: Source, view: View, client) -> List[str]:
    """Reasons a numeric conversion is needed (empty: the state loads bit for bit)."""
    reasons = []
    if src.kind == "torch":
        reasons.append("it was written by a plain torch optimizer (fp32 states, no ρ)")
    opt = src.optimizer
    if client is None:
        pass
    elif not isinstance(client, FlashOptimizer):
        if opt is not None and opt.get("kind") == "flash":
            reasons.append(f"the target optimizer is {type(client).__name__}, the checkpoint holds 8-bit Flash state")
    elif opt is None:
        raise F.NumericConfigMismatchError(
            f"checkpoint {src.path} holds no optimizer state (it was saved with optimizer=None); pass "
            "optimizer=None to load only the model (the optimizer then starts fresh), or "
            "flashoptim_dist.checkpoint.load_weights to also initialise ρ from the weights"
        )
    elif opt.get("kind") == "flash":
        if opt["family"] != client.family:
            raise F.NumericConfigMismatchError(
                f"checkpoint {src.path} holds {opt['class']} ({opt['family']}) state; the optimizer is "
                f"{type(client).__name__} ({client.family}); states of different optimizer families cannot be "
                "converted. Build the optimizer the checkpoint was written with."
            )
        saved = opt["config"]
        for k in ("group_size", "quantize", "master_weight_bits"):
            if saved.get(k) != getattr(client.config, k):
                reasons.append(
                    f"{k}={saved.get(k)!r} in the checkpoint, {getattr(client.config, k)!r} in the optimizer"
                )
    for f, pi in view.params.items():
        sd = src.params[f]["dtype"]
        if sd != F.dtype_name(pi.dtype):
            reasons.append(f"{f} is stored as {sd}, the model has {F.dtype_name(pi.dtype)}")
            break
    return reasons


# ------------------------------------------------------------------------------ main


def _comm_world() -> int:
    return rank_world()[1]


def _restore_rng(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


def _group_hypers(src: Source, rank_groups_fqns: List[set]) -> List[Optional[dict]]:
    """Saved hyper-parameters for each current param group (None: keep the current ones)."""
    opt = src.optimizer
    if opt is None:
        return [None] * len(rank_groups_fqns)
    out = []
    if opt["kind"] == "flash":
        saved_groups = opt["param_groups"]
        of = opt["param_group_of"]
        for fq in rank_groups_fqns:
            ids = sorted({of[f] for f in fq if f in of})
            out.append(dict(saved_groups[ids[0]]) if ids else None)
    else:
        out = [None] * len(rank_groups_fqns)  # filled after reading the byte entries
    return out


def _apply_hypers(group: dict, saved: Optional[dict]) -> None:
    if not saved:
        return
    for k, v in saved.items():
        if k in ("params", "_n_states"):
            continue
        if k == "betas" and isinstance(v, list):
            v = tuple(v)
        if k in group and isinstance(group[k], torch.Tensor) and not isinstance(v, torch.Tensor):
            group[k].fill_(v)
            continue
        group[k] = v


def load(
    path,
    model,
    optimizer=None,
    *,
    lr_scheduler=None,
    convert: bool = False,
    verify: str = "checksum",
    restore_rng: bool = True,
    process_group=None,
) -> dict:
    """Load a checkpoint written by :func:`save` (on any world size, under any engine) into
    ``model``/``optimizer``; see :mod:`flashoptim_dist.checkpoint`. Collective.

    ``convert=True`` allows a numeric conversion (other ρ width, quantization, group size or
    param dtype, a plain ``torch.optim`` target, or a plain-DCP torch.optim checkpoint as
    source); without it such a load raises :class:`NumericConfigMismatchError` before anything
    is modified. ``verify``: "checksum" (CRC-32 of every file, default), "size" or "none".

    FSDP2 units left unsharded (e.g. the root after an evaluation forward) are resharded
    first with ``FSDPModule.reshard()``, so the values land in the sharded parameters the
    optimizer updates.

    Returns ``{"step", "extra", "saved_world_size", "engine", "converted", "path"}``.
    """
    if verify not in ("checksum", "size", "none"):
        raise ValueError(f"verify must be 'checksum', 'size' or 'none', got {verify!r}")
    group = process_group
    rank, world = rank_world(group)
    path = os.path.abspath(os.fspath(path))
    st: Dict[str, Any] = {}

    src = open_verified(path, verify, group)

    def check():
        view = build_view(model, optimizer)
        _check_model(src, view)
        reasons = _needs_conversion(src, view, view.client)
        if reasons and not convert:
            raise F.NumericConfigMismatchError(
                f"checkpoint {path} needs a numeric conversion to load into this model/optimizer: "
                + "; ".join(reasons)
                + ". Pass convert=True to convert explicitly (state is re-encoded; "
                "bit-exactness is lost), or build the optimizer/model with the checkpoint's config "
                "(`flashoptim-dist ckpt inspect PATH` shows it)."
            )
        st["view"] = view
        return None

    _comm.run_everywhere(check, "checking the checkpoint", group)
    view: View = st["view"]
    client = view.client

    if (
        src.kind == "flash"
        and isinstance(client, FlashOptimizer)
        and src.optimizer
        and src.optimizer["class"] != type(client).__name__
    ):
        warnings.warn(
            f"checkpoint {path} was written by {src.optimizer['class']}, loading into {type(client).__name__} "
            "(same state format; the update rule changes from here on)",
            stacklevel=2,
        )
    box: Dict[str, Any] = {}

    def plan():
        exact = not _needs_conversion(src, view, client)
        box["plan"] = plan_load(src, view, client, lr_scheduler, restore_rng, exact)

    _comm.run_everywhere(plan, "planning the load", group)
    planned: PlannedLoad = box.pop("plan")
    _dcp_read(src, planned.targets, planned.sd, group)  # every rank enters; DCP reports a failure on any rank to all

    def install():
        box["result"] = _install(planned)

    _comm.run_everywhere(install, "installing the loaded state", group)
    return box["result"]


def _dcp_read(src: Source, targets, sd, group) -> None:
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(
                sd,
                storage_reader=dcp.FileSystemReader(src.path),
                planner=FlashLoadPlanner(targets),
                process_group=group,
                no_dist=not _comm.active(group),
            )
    except CheckpointException as e:
        raise F.CheckpointError(
            f"reading checkpoint {src.path} failed ({_comm.describe_dcp_failure(e)}); the model and optimizer "
            "were not modified"
        ) from None


def _install(plan: PlannedLoad) -> dict:
    """Copy what was read into the model and install the optimizer state (the read succeeded
    on every rank); returns ``load()``'s result."""
    src, view, client, sd = plan.src, plan.view, plan.client, plan.sd
    lr_scheduler, restore_rng, group_byte_keys = plan.lr_scheduler, plan.restore_rng, plan.group_byte_keys
    flash = isinstance(client, FlashOptimizer)
    # ---- install (nothing was modified before this point)
    with torch.no_grad():
        for fn in plan.installs:
            fn()
        for dst, r in plan.model_copies:
            if dst.dtype == r.param.dtype:
                dst.view(-1).copy_(r.param)
            else:
                dst.view(-1).copy_(_master(r.param, r.rho, src.linear_rho).to(dst.dtype))
        if plan.torch_target:
            _install_torch_target(
                src, view, client, plan.torch_entries, plan.saved_step, _torch_groups(sd, group_byte_keys)
            )

    if flash:
        _restore_param_groups(src, view, client, _torch_groups(sd, group_byte_keys))
    if lr_scheduler is not None:
        if "lr_scheduler" in src.byte_keys:
            lr_scheduler.load_state_dict(sd[src.byte_keys["lr_scheduler"]])
        else:
            warnings.warn(
                f"checkpoint {src.path} has no lr_scheduler state; the scheduler was left as is", stacklevel=3
            )
    if restore_rng and "rng" in src.byte_keys:
        _restore_rng(sd[src.byte_keys["rng"]])
    if restore_rng and "rng" in src.byte_keys and src.world_size != _comm_world():
        warnings.warn(
            f"checkpoint {src.path} was written by {src.world_size} ranks, loaded by {_comm_world()}: RNG states "
            "were restored only on ranks that existed at save time",
            stacklevel=3,
        )
    meta = src.meta or {}
    return {
        "path": src.path,
        "step": meta.get("step"),
        "extra": sd.get(F.KEY_EXTRA),
        "saved_world_size": src.world_size,
        "engine": meta.get("engine", "plain-dcp"),
        "converted": not plan.exact,
    }


_TORCH_HYPERS = ("lr", "betas", "eps", "weight_decay", "maximize", "momentum", "dampening", "nesterov", "initial_lr")


def _restore_param_groups(src: Source, view: View, client, torch_groups: List[dict]) -> None:
    fq_by_group: List[set] = [set() for _ in client.param_groups]
    id_to_fqn = {id(pi.param): f for f, pi in view.params.items()}
    for ti in view.tensors:
        for si in ti.segs:
            fq_by_group[ti.group].add(si.fqn)
        if id(ti.tensor) in id_to_fqn:
            fq_by_group[ti.group].add(id_to_fqn[id(ti.tensor)])
    if src.kind == "flash":
        for g, saved in zip(client.param_groups, _group_hypers(src, fq_by_group)):
            _apply_hypers(g, saved)
        return
    for g, fq in zip(client.param_groups, fq_by_group):
        for sg in torch_groups:
            if fq & set(sg.get("params", [])):
                _apply_hypers(g, {k: v for k, v in sg.items() if k in _TORCH_HYPERS})
                break


def _torch_groups(sd: dict, group_byte_keys) -> List[dict]:
    groups: Dict[int, dict] = {}
    for gi, k, key in group_byte_keys:
        groups.setdefault(gi, {})[k] = sd[key]
    return [groups[i] for i in sorted(groups)]


# ------------------------------------------------------------------------------ torch target


def _install_torch_target(src: Source, view: View, client, entries, saved_step, torch_groups: List[dict]) -> None:
    state = {}
    idx = 0
    for e in entries:
        flat, local = e["flat"], e["local"]
        bufs = {name: torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device) for name, _ in e["names"]}
        have = set()
        for s, r in e["reads"]:
            sl = slice(s.local_start, s.local_start + s.length)
            flat[sl].copy_(_master(r.param, r.rho, src.linear_rho).to(flat.dtype))
            for name, kind in e["names"]:
                v = _fp32_state(r, name, kind)
                if v is not None:
                    bufs[name][sl] = v
                    have.add(name)
        entry = {}
        if have or saved_step(e["fqn"]):
            entry["step"] = torch.tensor(float(saved_step(e["fqn"])))
            p = e["param"]
            for name in bufs:
                t = bufs[name].view(local.shape)
                if is_dtensor(p):
                    from torch.distributed.tensor import DTensor

                    t = DTensor.from_local(
                        t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                    )
                entry[name] = t
            state[idx] = entry
        e["index"] = idx
        idx += 1
    groups = []
    for gi, g in enumerate(client.param_groups):
        d = {k: v for k, v in g.items() if k != "params"}
        ids = [e["index"] for e in entries if e["group"] == gi]
        fq = {e["fqn"] for e in entries if e["group"] == gi}
        if src.kind == "flash" and src.optimizer:
            of = src.optimizer["param_group_of"]
            gids = sorted({of[f] for f in fq if f in of})
            if gids:
                for k, v in src.optimizer["param_groups"][gids[0]].items():
                    if k in d and k not in ("params", "_n_states"):
                        d[k] = tuple(v) if k == "betas" else v
        for sg in torch_groups:
            if fq & set(sg.get("params", [])):
                d.update({k: v for k, v in sg.items() if k in _TORCH_HYPERS and k in d})
                break
        d["params"] = ids
        groups.append(d)
    client.load_state_dict({"state": state, "param_groups": groups})
