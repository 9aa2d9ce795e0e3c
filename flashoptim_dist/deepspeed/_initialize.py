"""``initialize`` (drop-in for ``deepspeed.initialize``) and the opt-in ``register()``."""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Optional

import torch

from ._config import (
    FLASH_OPTIMIZER_NAMES,
    FlashDeepSpeedConfigError,
    flash_optimizer_name,
    load_config,
    optimizer_kwargs,
    prepare_config,
    resolve_optimizer_class,
)
from ._shards import attach_shard_specs
from ._shm import release_cpu_comm_buffer

__all__ = ["initialize", "register", "unregister", "is_registered"]

log = logging.getLogger(__name__)

_WRAPPED_FLAG = "_flashoptim_wrapped"
_ORIGINAL_ATTR = "_flashoptim_original"


def _deepspeed():
    try:
        import deepspeed
    except ImportError as e:  # pragma: no cover - exercised only without deepspeed
        raise ImportError(
            "flashoptim_dist.deepspeed needs DeepSpeed: DS_BUILD_OPS=0 pip install 'deepspeed>=0.18.3'"
        ) from e
    return deepspeed


def _original_initialize():
    ds = _deepspeed()
    fn = ds.initialize
    return getattr(fn, _ORIGINAL_ATTR, fn)


def _is_flash_optimizer(obj) -> bool:
    if not isinstance(obj, torch.optim.Optimizer):
        return False
    return any(type(obj).__name__ == n for n in FLASH_OPTIMIZER_NAMES) or type(obj).__module__.startswith(
        "flashoptim_dist"
    )


def _is_pipeline(model) -> bool:
    try:
        from deepspeed.pipe import PipelineModule
    except Exception:  # pragma: no cover
        return False
    return isinstance(model, PipelineModule)


def _initialize_impl(
    ds_initialize,
    *,
    args=None,
    model=None,
    optimizer=None,
    model_parameters=None,
    config=None,
    config_params=None,
    dedupe: bool = True,
    **rest,
):
    ds = _deepspeed()
    if model is None:
        raise FlashDeepSpeedConfigError("initialize requires a model")
    if isinstance(optimizer, torch.optim.Optimizer) and not _is_flash_optimizer(optimizer):
        # not ours: exactly what deepspeed.initialize does (lets a trainer run its baselines through here)
        log.info("flashoptim_dist.deepspeed: %s is not a Flash optimizer; calling DeepSpeed unchanged",
                 type(optimizer).__name__)
        out = ds_initialize(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                            config=config, config_params=config_params, **rest)
        release_cpu_comm_buffer()
        return out
    cfg, ds_args = load_config(args, config, config_params)
    entry = cfg.get("optimizer")
    if optimizer is not None and entry is not None:
        raise FlashDeepSpeedConfigError(
            'got both an optimizer argument and an "optimizer" entry in the DeepSpeed config; pass only one'
        )
    cls = kwargs = None
    if optimizer is None:
        if not isinstance(entry, dict) or "type" not in entry:
            raise FlashDeepSpeedConfigError(
                f'the DeepSpeed config has no "optimizer": {{"type": ...}} entry; add one with a type from '
                f"{list(FLASH_OPTIMIZER_NAMES)} or pass optimizer="
            )
        cls = resolve_optimizer_class(entry["type"])
        kwargs = optimizer_kwargs(cls, entry.get("params"))

    cfg, notes = prepare_config(cfg, deepspeed_version=ds.__version__, pipeline=_is_pipeline(model))
    for line in notes:
        log.info("flashoptim_dist.deepspeed: %s", line)

    if model_parameters is not None and not isinstance(model_parameters, (list, tuple)):
        model_parameters = list(model_parameters)  # a generator would be consumed twice
    if optimizer is None:
        params = model_parameters if model_parameters is not None else [
            p for p in model.parameters() if p.requires_grad]
        optimizer = cls(params, **kwargs)
    elif not isinstance(optimizer, torch.optim.Optimizer) and callable(optimizer):
        params = model_parameters if model_parameters is not None else [
            p for p in model.parameters() if p.requires_grad]
        optimizer = optimizer(params)
        if not _is_flash_optimizer(optimizer):
            raise FlashDeepSpeedConfigError(
                f"the optimizer callable returned a {type(optimizer).__name__}, not a Flash optimizer; pass "
                "non-Flash optimizers as an instance (they go to DeepSpeed unchanged)"
            )

    engine, opt, loader, sched = ds_initialize(
        args=ds_args, model=model, optimizer=optimizer, model_parameters=model_parameters, config=cfg, **rest
    )
    info = attach_shard_specs(engine, dedupe=dedupe)
    engine._flashoptim_info = dict(info, notes=notes)
    release_cpu_comm_buffer()  # DeepSpeed would leave its CPU allreduce segment in /dev/shm
    return engine, opt, loader, sched


def initialize(
    args: Any = None,
    model: Optional[torch.nn.Module] = None,
    optimizer=None,
    model_parameters=None,
    training_data=None,
    lr_scheduler=None,
    distributed_port: int = 29500,  # deepspeed.constants.TORCH_DISTRIBUTED_DEFAULT_PORT
    mpu=None,
    dist_init_required: Optional[bool] = None,
    collate_fn=None,
    config=None,
    mesh_param=None,
    config_params=None,
):
    """``deepspeed.initialize`` with a Flash optimizer built from the config's ``"optimizer"`` entry.

    Same arguments and return value as ``deepspeed.initialize`` (``engine, optimizer,
    training_dataloader, lr_scheduler``). The config (dict, path, or ``args.deepspeed_config``)
    names one of FlashAdamW, FlashAdam, FlashSGD, FlashSGDW, FlashLion with its constructor
    arguments in ``"params"``; alternatively pass a Flash optimizer (or a callable returning one)
    as ``optimizer``. A non-Flash optimizer instance goes to ``deepspeed.initialize`` unchanged.
    With ``bf16`` enabled and DeepSpeed >= 0.18.3 the ZeRO flat partitions are bf16 and the
    optimizer's ρ is the master; DeepSpeed's duplicate copy of the partition is dropped. Rejected
    with a :class:`FlashDeepSpeedConfigError` naming the key: optimizer CPU/NVMe offload,
    ``elastic_checkpoint``, ``checkpoint.load_universal``, and the ZeRO-1 config that makes
    DeepSpeed pick its fp32 ``BF16_Optimizer``.
    """
    return _initialize_impl(
        _original_initialize(),
        args=args,
        model=model,
        optimizer=optimizer,
        model_parameters=model_parameters,
        config=config,
        config_params=config_params,
        training_data=training_data,
        lr_scheduler=lr_scheduler,
        distributed_port=distributed_port,
        mpu=mpu,
        dist_init_required=dist_init_required,
        collate_fn=collate_fn,
        mesh_param=mesh_param,
    )


# ------------------------------------------------------------------------------------ register


def _wants_flash(bound: inspect.BoundArguments) -> bool:
    a = bound.arguments
    if a.get("optimizer") is not None:
        return _is_flash_optimizer(a["optimizer"])
    try:
        cfg, _ = load_config(a.get("args"), a.get("config"), a.get("config_params"))
    except Exception:
        return False  # let DeepSpeed report its own config error
    entry = cfg.get("optimizer")
    return isinstance(entry, dict) and flash_optimizer_name(entry.get("type")) is not None


def register() -> None:
    """Make plain ``deepspeed.initialize`` understand ``{"optimizer": {"type": "FlashAdamW"}}``.

    Opt-in and idempotent: replaces the module attribute ``deepspeed.initialize`` by a wrapper that
    routes calls whose config names a Flash optimizer (or that pass a Flash optimizer instance)
    through :func:`initialize`, and leaves every other call untouched. Frameworks that look the
    function up at call time (Hugging Face Accelerate and Trainer, Lightning) pick it up; call
    ``register()`` before code that did ``from deepspeed import initialize``.
    """
    ds = _deepspeed()
    current = ds.initialize
    if getattr(current, _WRAPPED_FLAG, False):
        return
    original = current
    sig = inspect.signature(original)

    @functools.wraps(original)
    def initialize_with_flash(*args, **kwargs):
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)
        if not _wants_flash(bound):
            return original(*args, **kwargs)
        a = dict(bound.arguments)
        return _initialize_impl(original, **a)

    setattr(initialize_with_flash, _WRAPPED_FLAG, True)
    setattr(initialize_with_flash, _ORIGINAL_ATTR, original)
    ds.initialize = initialize_with_flash


def unregister() -> None:
    """Undo :func:`register`."""
    ds = _deepspeed()
    fn = ds.initialize
    if getattr(fn, _WRAPPED_FLAG, False):
        ds.initialize = getattr(fn, _ORIGINAL_ATTR)


def is_registered() -> bool:
    ds = _deepspeed()
    return bool(getattr(ds.initialize, _WRAPPED_FLAG, False))
