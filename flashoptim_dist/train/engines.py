"""Engines: how the model and optimizer are laid out over ranks, behind one small interface.

=========  ===================================================================================
engine     what it does
=========  ===================================================================================
single     one rank, whole tensors.
ddp        ``DistributedDataParallel``; whole tensors on every rank, gradients all-reduced.
fsdp2      ``fully_shard`` on every block (``model.fsdp_units()``), on the embedding and the
           untied head (``model.fsdp_embedding_units()``, ``engine.shard_embeddings``) and on
           the root; params are DTensors sharded on dim 0 over a 1-D device mesh of all ranks.
           With ``engine.tp_size`` > 1 (built-in GPT): a ("dp", "tp") mesh — ("replicate",
           "shard", "tp") with ``engine.replicas`` (HSDP + TP) — the model's tensor-parallel plan
           (``GPT.tensor_parallel_plan``, torchtitan's) applied on "tp" with
           ``parallelize_module``, then ``fully_shard`` on the data-parallel dims — torchtitan's
           order.
fsdp1      ``FullyShardedDataParallel(use_orig_params=True)``, one unit per block and, as
           for fsdp2, for the embedding and the untied head; on CPU with
           ``device_id=torch.device('cpu')``.
zero1/2/3  DeepSpeed ZeRO through ``flashoptim_dist.deepspeed.initialize`` (same signature as
           ``deepspeed.initialize``), which accepts ``{"optimizer": {"type": "FlashAdamW"}}``.
=========  ===================================================================================

Precision: Flash optimizers get bf16 parameters (``cast_model`` before wrapping; norms and
RoPE compute in fp32 inside the model). Torch baselines keep fp32 parameters and compute in bf16:
``torch.autocast`` for single/ddp, ``MixedPrecisionPolicy(param_dtype=bf16)`` for fsdp2,
``MixedPrecision(param_dtype=bf16)`` for fsdp1, DeepSpeed's ``bf16`` section for zero*.
Gradients are reduced in ``engine.reduce_dtype`` (fp32 by default) under FSDP.

Gradient accumulation: ``micro_context(is_last)`` suppresses gradient synchronisation on all
but the last micro-step (``no_sync`` / ``set_requires_gradient_sync``); DeepSpeed counts
micro-steps itself.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .._dist import rank_world
from ..release import enable_gradient_release
from ..utils import cast_model
from .config import FLASH_OPTIMIZERS, Config
from ._engine import (
    Engine,
    EngineError,
    _DDPEngine,
    _DeepSpeedEngine,
    _FSDP1Engine,
    _FSDP2Engine,
    cross_entropy,
    local_tensor,
)
from .optimizers import build_optimizer, is_flash, optimizer_kwargs

__all__ = [
    "Engine",
    "build_engine",
    "EngineError",
    "cross_entropy",
    "deepspeed_config",
    "local_tensor",
    "parallel_dims",
]


# ---------------------------------------------------------------------------------------------


def _bf16_cast(model: nn.Module) -> nn.Module:
    return cast_model(model, dtype=torch.bfloat16)


def _fsdp2_mesh(cfg: Config, device: torch.device, world: int):
    """``(mesh for fully_shard, tensor-parallel mesh or None)``.

    FSDP2 shards over a 1-D mesh of all ranks, or with engine.replicas != 1 over the 2-D
    (replicate, shard) HSDP mesh whose shape :func:`launch_env.hsdp_mesh_shape` derives from where
    every rank runs. With engine.tp_size = T > 1 a last mesh dim "tp" of T consecutive ranks is
    split off (within a node, where the tensor-parallel collectives are): ("dp", "tp") or
    ("replicate", "shard", "tp"), and fully_shard takes the data-parallel dims."""
    from torch.distributed.device_mesh import init_device_mesh

    from .. import launch_env

    tp = cfg.engine.tp_size
    if cfg.engine.replicas == 1:
        if tp == 1:
            return init_device_mesh(device.type, (world,)), None
        mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
        return mesh["dp"], mesh["tp"]
    nodes: list = [launch_env.detect().node_rank] * world
    if world > 1:
        dist.all_gather_object(nodes, nodes[0])
    try:
        shape = launch_env.hsdp_mesh_shape(cfg.engine.replicas, nodes)
    except launch_env.LaunchEnvError as e:
        raise EngineError(str(e)) from None
    if tp == 1:
        return init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard")), None
    if shape[1] % tp:
        raise EngineError(
            f"engine.tp_size={tp} does not divide the {shape[1]} ranks of an HSDP replica (engine.replicas="
            f"{cfg.engine.replicas}, {world} ranks): the tensor-parallel ranks sit inside one replica. Use a tp_size "
            f"dividing {shape[1]}, or fewer replicas"
        )
    mesh = init_device_mesh(device.type, (shape[0], shape[1] // tp, tp), mesh_dim_names=("replicate", "shard", "tp"))
    return mesh["replicate", "shard"], mesh["tp"]


def deepspeed_config(cfg: Config, world_size: int, grad_accum: int) -> dict:
    """The DeepSpeed config dict for ``cfg``: the JSON file (or a minimal one) plus the trainer's
    batch sizes, accumulation, clipping, ZeRO stage and (for Flash optimizers) optimizer entry.

    Raises EngineError where the file contradicts the trainer config (a different ZeRO stage or
    optimizer type, a batch size that does not match, a "scheduler" entry).
    """
    stage = int(cfg.engine.name[-1])
    if cfg.engine.deepspeed_config:
        with open(cfg.engine.deepspeed_config) as fh:
            try:
                ds = json.load(fh)
            except ValueError as e:
                raise EngineError(
                    f"engine.deepspeed_config={cfg.engine.deepspeed_config!r} is not valid JSON: {e}"
                ) from None
        src = repr(cfg.engine.deepspeed_config)
    else:
        ds, src = {}, "the built-in DeepSpeed config"
    ds = copy.deepcopy(ds)
    zero = ds.setdefault("zero_optimization", {})
    if "stage" in zero and int(zero["stage"]) != stage:
        raise EngineError(
            f"engine.name={cfg.engine.name!r} but {src} has zero_optimization.stage={zero['stage']}; "
            f"make them agree (engine.name=zero{zero['stage']} or edit the JSON)"
        )
    zero["stage"] = stage
    if "scheduler" in ds:
        raise EngineError(
            f"{src} has a 'scheduler' entry; remove it: the trainer sets the learning rate (optim.schedule)"
        )
    mb, gb = cfg.data.micro_batch_size, cfg.data.micro_batch_size * world_size * grad_accum
    for key, want in (
        ("train_micro_batch_size_per_gpu", mb),
        ("gradient_accumulation_steps", grad_accum),
        ("train_batch_size", gb),
    ):
        have = ds.get(key, "auto")
        if have != "auto" and int(have) != want:
            raise EngineError(
                f"{src} sets {key}={have} but the trainer config gives {want}; remove it from the JSON or set it to "
                '"auto"'
            )
        ds[key] = want
    ds["gradient_clipping"] = cfg.train.max_grad_norm
    ds.setdefault("steps_per_print", 10**9)
    bf16 = ds.setdefault("bf16", {"enabled": True})
    if is_flash(cfg.optim.name):
        bf16.setdefault("bf16_master_weights_and_grads", True)
        bf16.setdefault("bf16_optimizer_states", True)
        opt = ds.get("optimizer")
        if opt is None:
            params = optimizer_kwargs(cfg.optim)
            params["betas"] = list(params.get("betas", ())) or None
            ds["optimizer"] = {"type": cfg.optim.name, "params": {k: v for k, v in params.items() if v is not None}}
        elif str(opt.get("type", "")).lower() != cfg.optim.name.lower():
            raise EngineError(
                f"{src} has optimizer type {opt.get('type')!r} but optim.name={cfg.optim.name!r}; make them agree"
            )
    else:
        opt = ds.get("optimizer")
        if opt is not None and str(opt.get("type", "")).lower() in {n.lower() for n in FLASH_OPTIMIZERS}:
            # A Flash config reused for its torch baseline (e.g. by `compare`): the trainer builds
            # the baseline optimizer itself and hands it to DeepSpeed.
            del ds["optimizer"]
            for key in ("bf16_master_weights_and_grads", "bf16_optimizer_states"):
                bf16.pop(key, None)
        elif opt is not None:
            raise EngineError(
                f"{src} has an 'optimizer' entry but optim.name={cfg.optim.name!r} is a torch baseline that the "
                "trainer "
                "builds itself; remove the entry or choose a Flash optimizer"
            )
    return ds


def _fsdp_units(cfg: Config, model: nn.Module) -> list:
    """Sub-modules that get an FSDP unit of their own (fsdp2 and fsdp1): the blocks, plus the
    embedding and the untied head with ``engine.shard_embeddings`` — out of the root unit, which
    both FSDP versions keep gathered from the end of forward to the end of backward."""
    units = list(model.fsdp_units())
    if cfg.engine.shard_embeddings and hasattr(model, "fsdp_embedding_units"):
        units += model.fsdp_embedding_units()
    return units


def parallel_dims(cfg: Config, rank: int, world: int) -> tuple[int, int, int]:
    """(data-parallel rank, data-parallel size, tensor-parallel size) of this rank: ranks form a
    (world / tp, tp) row-major mesh ("dp", "tp"), so the tp ranks of a dp group are consecutive
    and read the same batch. Raises EngineError when engine.tp_size does not divide the ranks."""
    tp = cfg.engine.tp_size
    if world % tp:
        raise EngineError(
            f"engine.tp_size={tp} does not divide the {world} ranks the launcher started; launch a multiple of "
            f"{tp} ranks or choose a tp_size that divides {world}"
        )
    return rank // tp, world // tp, tp


def _check_tensor_parallel(cfg: Config, model: nn.Module, flash: bool) -> None:
    """EngineError naming every reason the model cannot be split engine.tp_size ways."""
    tp = cfg.engine.tp_size
    problems = (
        model.tensor_parallel_problems(tp, group_size=32 if flash else 0)
        if hasattr(model, "tensor_parallel_problems")
        else [f"{type(model).__name__} has no tensor-parallel plan (tensor_parallel_plan)"]
    )
    if problems:
        raise EngineError(
            f"engine.tp_size={tp} cannot split this model: "
            + "; ".join(problems)
            + ". Use an engine.tp_size that divides them (1 turns tensor parallelism off) or change the model shape"
        )


def _check_launch(cfg: Config, world: int, grad_accum: int) -> None:
    """What every engine rejects before it builds anything (EngineError naming the fix)."""
    if cfg.optim.gradient_release and grad_accum > 1:
        raise EngineError(
            f"optim.gradient_release=true cannot accumulate gradients (here {grad_accum} micro-steps per step): "
            "set data.global_batch_size = data.micro_batch_size x ranks, or turn gradient release off"
        )
    if cfg.engine.name == "single" and world != 1:
        raise EngineError(
            f"engine.name=single runs on one rank but the launcher started {world}; "
            "use engine.name=ddp/fsdp2/fsdp1 or launch one process"
        )


@dataclasses.dataclass(frozen=True)
class _Build:
    """What an engine builder gets: config, model, device, this rank's place, and two derived
    settings: ``flash`` (a Flash optimizer: bf16 params; else fp32 params, bf16 compute) and
    ``reduce_dtype`` (gradient reduction under FSDP, engine.reduce_dtype)."""

    cfg: Config
    model: nn.Module
    device: torch.device
    rank: int
    world: int
    grad_accum: int
    meta: bool
    flash: bool
    reduce_dtype: torch.dtype


def _materialise(b: _Build) -> None:
    """engine single, model built on the meta device: cast there to the final dtype (bf16 for Flash
    optimizers; a meta tensor holds no memory), allocate on ``b.device`` (``to_empty``) and initialise
    there (``init_weights``). No full fp32 copy of the weights ever exists, and with a CUDA device no
    host copy at all.

    On the CPU the weights are bit-identical to the model built on the CPU (init_device=cpu) from the
    same seed: ``replay_constructor_rng`` first draws what that model's constructor draws. On another
    device ``init_weights`` draws from that device's generator: same distribution (init_weights), other
    values — as under FSDP2, where ``init_weights`` runs on the shards after ``to_empty``."""
    model = b.model
    if b.device.type == "cpu" and hasattr(model, "replay_constructor_rng"):
        model.replay_constructor_rng()
    if b.flash:
        _bf16_cast(model)
    model.to_empty(device=b.device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # to_empty from meta unties the head from the embedding
    model.init_weights()


def _build_single_or_ddp(b: _Build) -> Engine:
    model, name = b.model, b.cfg.engine.name
    if b.meta:
        _materialise(b)
    else:
        model.to(b.device)
        if b.flash:
            _bf16_cast(model)
    module = model
    if name == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[b.device.index] if b.device.type == "cuda" else None)
    opt = build_optimizer(b.cfg.optim, module)
    cls = _DDPEngine if name == "ddp" else Engine
    return cls(name, model, module, opt, b.device, autocast=not b.flash)


def _build_fsdp2(b: _Build) -> Engine:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cfg, model, device = b.cfg, b.model, b.device
    if b.flash:
        _bf16_cast(model)
    if not b.meta:
        model.to(device)
    _, _, tp = parallel_dims(cfg, b.rank, b.world)
    if tp > 1:
        _check_tensor_parallel(cfg, model, b.flash)
    mesh, tp_mesh = _fsdp2_mesh(cfg, device, b.world)
    if tp_mesh is not None:  # torchtitan's order: tensor parallelism first, then FSDP2 on dp
        from torch.distributed.tensor.parallel import parallelize_module

        parallelize_module(model, tp_mesh, model.tensor_parallel_plan())
    mp = MixedPrecisionPolicy(param_dtype=None if b.flash else torch.bfloat16, reduce_dtype=b.reduce_dtype)
    for unit in _fsdp_units(cfg, model):
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    if b.meta:
        model.to_empty(device=device)
        model.init_weights()
    opt = build_optimizer(cfg.optim, model)
    eng = _FSDP2Engine(cfg.engine.name, model, model, opt, device)
    eng.tp_size = tp
    if mesh.ndim == 2:
        eng.layout = f"HSDP {mesh.shape[0]} replicas x {mesh.shape[1]} shards"
    if tp > 1:
        eng.layout = (eng.layout or f"FSDP2 over {mesh.shape[0]}") + f" x tensor parallel {tp}"
    return eng


def _build_fsdp1(b: _Build) -> Engine:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp.wrap import CustomPolicy

    model, device = b.model, b.device
    if b.flash:
        _bf16_cast(model)
    unit_ids = {id(u) for u in _fsdp_units(b.cfg, model)}
    mp = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=b.reduce_dtype, buffer_dtype=torch.bfloat16)
    model = FSDP(
        model,
        # these module instances (not every module of their types: the head is an nn.Linear)
        auto_wrap_policy=CustomPolicy(lambda m: id(m) in unit_ids) if unit_ids else None,
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        mixed_precision=mp,
        device_id=device if device.type == "cuda" else torch.device("cpu"),
        use_orig_params=True,
    )
    if b.flash:
        try:
            from flashoptim_dist.distributed import prepare_fsdp1
        except ImportError:  # pragma: no cover - older core without the FSDP1 adapter
            prepare_fsdp1 = None
        if prepare_fsdp1 is not None:
            prepare_fsdp1(model)  # canonical layout of the flat slices, before the optimizer
    opt = build_optimizer(b.cfg.optim, model)
    return _FSDP1Engine(b.cfg.engine.name, model, model, opt, device)


def _build_deepspeed(b: _Build) -> Engine:
    cfg = b.cfg
    try:
        from flashoptim_dist.deepspeed import initialize
    except ImportError as e:
        raise EngineError(
            f"engine.name={cfg.engine.name!r} needs flashoptim_dist.deepspeed.initialize, which cannot be imported "
            f"({e}). "
            "Install DeepSpeed (`DS_BUILD_OPS=0 pip install deepspeed`) and make sure flashoptim_dist.deepspeed is "
            "present, "
            "or use engine.name=fsdp2"
        ) from e
    ds = deepspeed_config(cfg, b.world, b.grad_accum)
    kwargs = dict(model=b.model, model_parameters=[p for p in b.model.parameters() if p.requires_grad], config=ds)
    if not b.flash:
        kwargs["optimizer"] = build_optimizer(cfg.optim, b.model)
    out = initialize(**kwargs)
    engine, optimizer = out[0], out[1]
    return _DeepSpeedEngine(cfg.engine.name, engine, engine.module, optimizer, b.device)


#: engine.name -> the function that wraps the model and builds the optimizer for it.
_BUILDERS: dict[str, Callable[[_Build], Engine]] = {
    "single": _build_single_or_ddp,
    "ddp": _build_single_or_ddp,
    "fsdp2": _build_fsdp2,
    "fsdp1": _build_fsdp1,
    "zero1": _build_deepspeed,
    "zero2": _build_deepspeed,
    "zero3": _build_deepspeed,
}


def _enable_gradient_release(cfg: Config, eng: Engine) -> None:
    if cfg.train.max_grad_norm > 0:
        # Clipped with the previous step's global norm (the current one is unknown while the
        # hooks update parameters in the middle of backward).
        from flashoptim_dist.distributed import enable_gradient_release_with_clipping

        eng.grad_release = enable_gradient_release_with_clipping(
            eng.module, eng.optimizer, cfg.train.max_grad_norm, mode="previous"
        )
    else:
        eng.grad_release = enable_gradient_release(eng.module, eng.optimizer)


def build_engine(cfg: Config, model: nn.Module, device: torch.device, grad_accum: int, meta: bool = False) -> Engine:
    """Wrap ``model`` for ``cfg.engine.name`` and build the optimizer. ``meta``: ``model`` lives on
    the meta device and is materialised (``to_empty`` + ``init_weights``): after sharding (fsdp2), or
    directly on the device in the final dtype (single)."""
    name = cfg.engine.name
    rank, world = rank_world()
    _check_launch(cfg, world, grad_accum)
    builder = _BUILDERS.get(name)
    if builder is None:  # pragma: no cover - the config validator rejects other names
        raise EngineError(f"engine.name={name!r} is not supported")
    reduce_dtype = torch.float32 if cfg.engine.reduce_dtype == "fp32" else torch.bfloat16
    eng = builder(_Build(cfg, model, device, rank, world, grad_accum, meta, is_flash(cfg.optim.name), reduce_dtype))
    # (DeepSpeed steps in its own backward: no gradient release hooks; config.py rejects them)
    if cfg.optim.gradient_release and not name.startswith("zero"):
        _enable_gradient_release(cfg, eng)
    eng.loss_chunks = cfg.model.loss_chunks
    return eng
