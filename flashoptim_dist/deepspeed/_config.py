"""DeepSpeed config handling for Flash optimizers: loading, validation and the keys we set.

Pure functions (no process group, no engine), so every rejection can be tested in-process.
See docs/deepspeed-internals.md for the DeepSpeed source behind each rule.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from typing import Any, Optional, Tuple

# The names accepted in the config's ``"optimizer": {"type": ...}`` entry (case-insensitive).
from .._names import FLASH_OPTIMIZER_NAMES, flash_optimizer_name

__all__ = [
    "FLASH_OPTIMIZER_NAMES",
    "MIN_BF16_MASTER_VERSION",
    "FlashDeepSpeedConfigError",
    "load_config",
    "flash_optimizer_name",
    "resolve_optimizer_class",
    "optimizer_kwargs",
    "prepare_config",
]


#: ``zero_optimization.reduce_bucket_size`` set for ZeRO-3 when the config leaves it out.
#: DeepSpeed's default (5e8 elements) allocates a 0.93 GiB bf16 bucket per rank up front — a
#: fifth of the whole ZeRO-3 footprint of a 1.3e9-param model under a Flash optimizer. 5e7
#: (93 MiB) took rank-0 persistent memory from 5.44 to 4.6 GiB and the iteration from 304 to
#: 261 ms on 2×H200 (docs/PERFORMANCE.md). Set the key in the config to keep DeepSpeed's value.
ZERO3_REDUCE_BUCKET_SIZE = 50_000_000

#: First DeepSpeed release whose ZeRO optimizers can hand a client optimizer bf16 flat partitions
#: (``bf16.bf16_master_weights_and_grads`` + ``bf16.bf16_optimizer_states``).
MIN_BF16_MASTER_VERSION = "0.18.3"

# Keys DeepSpeed's own optimizer entries take that mean nothing to a Flash optimizer.
_DEEPSPEED_ONLY_OPTIMIZER_PARAMS = {
    "torch_adam": "it selects DeepSpeed's built-in Adam implementation",
    "adam_w_mode": "choose FlashAdamW (decoupled decay) or FlashAdam (L2) by name instead",
    "fp32_optimizer_states": "Flash optimizers keep 8-bit states (set quantize=false for fp32 states)",
}


class FlashDeepSpeedConfigError(ValueError):
    """A DeepSpeed config combination that cannot work with a Flash optimizer."""


# --------------------------------------------------------------------------------------- loading


def _load_path(path: str) -> dict:
    try:  # DeepSpeed's own loader (json/hjson/base64), when present
        from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config  # type: ignore

        cfg = load_ds_config(path)
        if isinstance(cfg, dict):
            return cfg
    except ImportError:
        pass
    if not os.path.exists(path):
        raise FileNotFoundError(f"DeepSpeed config file {path!r} does not exist")
    with open(path) as f:
        return json.load(f)


def load_config(args: Any = None, config: Any = None, config_params: Any = None) -> Tuple[dict, Any]:
    """Resolve the config the way ``deepspeed.initialize`` does (``config``, else ``config_params``,
    else ``args.deepspeed_config``). Returns ``(config_dict_copy, args_for_deepspeed)`` where the
    returned args no longer carry ``deepspeed_config`` (we pass the dict as ``config=``)."""
    if config is None and config_params is not None:
        config = config_params
    ds_args = args
    from_args = getattr(args, "deepspeed_config", None) if args is not None else None
    if from_args is None and args is not None and getattr(args, "deepscale_config", None) is not None:
        from_args = args.deepscale_config
    if from_args is not None:
        if config is not None:
            raise FlashDeepSpeedConfigError(
                "got a DeepSpeed config both in args.deepspeed_config and in config=; pass only one"
            )
        config = from_args
        ds_args = copy.copy(args)
        for attr in ("deepspeed_config", "deepscale_config"):
            if hasattr(ds_args, attr):
                setattr(ds_args, attr, None)
    if config is None:
        raise FlashDeepSpeedConfigError(
            "no DeepSpeed config: pass config=<dict or path> or args with a deepspeed_config attribute"
        )
    if isinstance(config, dict):
        cfg = copy.deepcopy(config)
    elif isinstance(config, (str, os.PathLike)):
        cfg = _load_path(os.fspath(config))
    else:
        raise FlashDeepSpeedConfigError(f"DeepSpeed config must be a dict or a path, got {type(config).__name__}")
    return cfg, ds_args


# ------------------------------------------------------------------------------------- optimizer


def resolve_optimizer_class(name: Optional[str]):
    """The Flash optimizer class for a config ``optimizer.type``; unknown names list the choices."""
    canon = flash_optimizer_name(name)
    if canon is None:
        raise FlashDeepSpeedConfigError(
            f'optimizer.type {name!r} is not a Flash optimizer; choose one of {", ".join(FLASH_OPTIMIZER_NAMES)} '
            "(for DeepSpeed's own optimizers call deepspeed.initialize directly)"
        )
    from ..optim import flash

    try:
        return getattr(flash, canon)
    except AttributeError:
        raise ImportError(
            f"flashoptim_dist.optim.flash does not define {canon}; is the optimizer core installed?"
        ) from None


def _constructor_args(cls) -> list:
    """Named constructor arguments of ``cls``, following ``**kwargs`` forwarding up the MRO."""
    import torch

    try:
        from ..optim import FlashOptimizer as stop
    except ImportError:  # pragma: no cover
        stop = torch.optim.Optimizer
    allowed = []
    for klass in cls.__mro__:
        if klass is stop or klass is torch.optim.Optimizer:
            break  # the base takes (params, defaults, config), which are not user options
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        sig = inspect.signature(init)
        for n, p in sig.parameters.items():
            if n in ("self", "params") or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            if n not in allowed:
                allowed.append(n)
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            break
    return allowed


def optimizer_kwargs(cls, params: Optional[dict]) -> dict:
    """Validate ``optimizer.params`` against ``cls``'s constructor and return the kwargs."""
    params = dict(params or {})
    if "max_grad_norm" in params:
        raise FlashDeepSpeedConfigError(
            "optimizer.params.max_grad_norm is not an optimizer setting; use the top-level "
            '"gradient_clipping" key of the DeepSpeed config'
        )
    for key, why in _DEEPSPEED_ONLY_OPTIMIZER_PARAMS.items():
        if key in params:
            raise FlashDeepSpeedConfigError(f"optimizer.params.{key} is not supported by {cls.__name__}: {why}")
    auto = [k for k, v in params.items() if v == "auto"]
    if auto:
        raise FlashDeepSpeedConfigError(
            f'optimizer.params {auto} are "auto"; replace them with values (Hugging Face Trainer fills '
            '"auto" itself before it calls deepspeed.initialize)'
        )
    allowed = _constructor_args(cls)
    unknown = [k for k in params if k not in allowed]
    if unknown:
        raise FlashDeepSpeedConfigError(
            f"optimizer.params {unknown} are not arguments of {cls.__name__}; it accepts {allowed}"
        )
    if "betas" in params and isinstance(params["betas"], list):
        params["betas"] = tuple(params["betas"])
    return params


# ------------------------------------------------------------------------------ config rules


def _version_tuple(v: str) -> tuple:
    try:
        from packaging.version import Version

        return Version(v).release
    except Exception:  # pragma: no cover - packaging is a DeepSpeed dependency
        return tuple(int(x) for x in v.split("+")[0].split(".")[:3] if x.isdigit())


def _truthy(v) -> bool:
    return v is True or (isinstance(v, str) and v.lower() == "true")


def _bf16_section(cfg: dict) -> Tuple[Optional[str], dict]:
    for key in ("bf16", "bfloat16"):
        if isinstance(cfg.get(key), dict):
            return key, cfg[key]
    return None, {}


def prepare_config(
    cfg: dict,
    *,
    deepspeed_version: str,
    pipeline: bool = False,
) -> Tuple[dict, list]:
    """Check ``cfg`` for combinations that cannot work with a Flash optimizer and add the keys the
    Flash optimizers need. Returns ``(new_cfg, notes)``; ``notes`` are human-readable lines about
    what was changed or why ρ is not used. Raises :class:`FlashDeepSpeedConfigError` naming the
    offending key."""
    cfg = copy.deepcopy(cfg)
    notes = []
    zero = cfg.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise FlashDeepSpeedConfigError("zero_optimization must be a dict")
    stage = int(zero.get("stage", 0) or 0)

    # --- optimizer offload: the Flash step runs where the partitions live; DeepSpeed would run
    # the client optimizer on CPU copies (and for NVMe swap per-element fp32 state files).
    off = zero.get("offload_optimizer")
    device = (off or {}).get("device", "none") if isinstance(off, dict) else None
    if device is not None and str(device).lower() in ("cpu", "nvme"):
        raise FlashDeepSpeedConfigError(
            f"zero_optimization.offload_optimizer.device={device!r} is not supported with Flash optimizers: "
            "their 8-bit states and bf16 master (~7 bytes/param before sharding) replace offloading; remove "
            'zero_optimization.offload_optimizer or set its "device" to "none"'
        )
    if _truthy(zero.get("cpu_offload")):
        raise FlashDeepSpeedConfigError(
            "zero_optimization.cpu_offload=true (optimizer CPU offload) is not supported with Flash optimizers; "
            "remove zero_optimization.cpu_offload"
        )

    # --- elastic checkpoints trim optimizer states as if they had one element per parameter element.
    if _truthy(zero.get("elastic_checkpoint")):
        raise FlashDeepSpeedConfigError(
            "zero_optimization.elastic_checkpoint=true is not supported with Flash optimizers: DeepSpeed trims "
            "each state tensor to the partition's element count, which breaks grouped 8-bit states and their "
            "scales; set zero_optimization.elastic_checkpoint to false"
        )

    # --- universal checkpoints read exp_avg/exp_avg_sq as per-element fp32 tensors.
    ckpt = cfg.get("checkpoint") or {}
    if isinstance(ckpt, dict) and _truthy(ckpt.get("load_universal")):
        raise FlashDeepSpeedConfigError(
            "checkpoint.load_universal=true is not supported with Flash optimizers: DeepSpeed's universal "
            "format stores per-element fp32 optimizer states. Set checkpoint.load_universal to false; to move a "
            "Flash run to another world size or engine keep its 8-bit state with `flashoptim-dist ckpt convert`, "
            "or make a universal checkpoint for DeepSpeed's own Adam with "
            "`python -m flashoptim_dist.deepspeed.plain_checkpoint` followed by ds_to_universal"
        )

    bf16_key, bf16 = _bf16_section(cfg)
    bf16_on = _truthy(bf16.get("enabled"))
    fp16 = cfg.get("fp16") if isinstance(cfg.get("fp16"), dict) else {}
    fp16_on = _truthy(fp16.get("enabled"))
    grad_accum = ((cfg.get("data_types") or {}).get("grad_accum_dtype") or "").lower()

    # --- configs for which DeepSpeed wraps the client optimizer in an fp32-master optimizer.
    if bf16_on and grad_accum in ("fp32", "float32", "float") and stage == 1:
        raise FlashDeepSpeedConfigError(
            'data_types.grad_accum_dtype="fp32" with zero_optimization.stage=1 and bf16 makes DeepSpeed use its '
            "BF16_Optimizer, which keeps an fp32 master copy and gives the Flash optimizer fp32 partitions; remove "
            'data_types.grad_accum_dtype (or set it to "bf16"), or use zero_optimization.stage 2 or 3'
        )
    if stage == 0 and (bf16_on or fp16_on):
        which = bf16_key if bf16_on else "fp16"
        raise FlashDeepSpeedConfigError(
            f"zero_optimization.stage=0 with {which}.enabled=true makes DeepSpeed wrap the optimizer in its "
            "fp32-master FP16/BF16 optimizer; set zero_optimization.stage to 1, 2 or 3 (Flash's ρ is the "
            "master), or train without DeepSpeed's mixed-precision wrapper"
        )
    if pipeline:
        raise FlashDeepSpeedConfigError(
            "DeepSpeed pipeline parallelism (PipelineModule) is not supported by flashoptim_dist.deepspeed yet"
        )

    # --- ZeRO lists the optimizers it has tested; a Flash optimizer is not among them.
    if zero and stage > 0:
        if cfg.get("zero_allow_untested_optimizer") is False:
            raise FlashDeepSpeedConfigError(
                "zero_allow_untested_optimizer=false forbids client optimizers under ZeRO; remove the key "
                "(flashoptim_dist.deepspeed sets it to true)"
            )
        cfg["zero_allow_untested_optimizer"] = True

    # --- ZeRO-3's reduce bucket: a smaller default (see ZERO3_REDUCE_BUCKET_SIZE).
    if stage == 3 and "reduce_bucket_size" not in zero:
        zero["reduce_bucket_size"] = ZERO3_REDUCE_BUCKET_SIZE
        cfg["zero_optimization"] = zero
        notes.append(
            f"zero_optimization.reduce_bucket_size not set: using {ZERO3_REDUCE_BUCKET_SIZE:.0e} elements "
            "instead of DeepSpeed's 5e8 (a 0.93 GiB bf16 buffer per rank); set it to keep DeepSpeed's default"
        )

    # --- bf16 flat partitions as the master.
    if bf16_on and stage > 0:
        new_enough = _version_tuple(deepspeed_version) >= _version_tuple(MIN_BF16_MASTER_VERSION)
        master = bf16.get("bf16_master_weights_and_grads")
        states = bf16.get("bf16_optimizer_states")
        if not new_enough:
            if _truthy(master) or _truthy(states):
                raise FlashDeepSpeedConfigError(
                    f"{bf16_key}.bf16_master_weights_and_grads needs DeepSpeed >= {MIN_BF16_MASTER_VERSION}, "
                    f"found {deepspeed_version}; upgrade DeepSpeed or remove the key"
                )
            notes.append(
                f"DeepSpeed {deepspeed_version} < {MIN_BF16_MASTER_VERSION}: ZeRO keeps fp32 master partitions, "
                "the Flash optimizer keeps 8-bit states over them and no ρ"
            )
        elif master is False or (isinstance(master, str) and master.lower() == "false"):
            notes.append(
                f"{bf16_key}.bf16_master_weights_and_grads=false: ZeRO keeps fp32 master partitions, the Flash "
                "optimizer keeps 8-bit states over them and no ρ"
            )
        else:
            if states is False or (isinstance(states, str) and states.lower() == "false"):
                raise FlashDeepSpeedConfigError(
                    f"{bf16_key}.bf16_optimizer_states=false with bf16_master_weights_and_grads makes DeepSpeed "
                    "require ZeRO-Offload with DeepSpeedCPUAdam; remove bf16_optimizer_states (it is set to true) "
                    "or set bf16_master_weights_and_grads to false"
                )
            bf16["bf16_master_weights_and_grads"] = True
            bf16["bf16_optimizer_states"] = True
            cfg[bf16_key] = bf16
            notes.append("ZeRO hands the Flash optimizer bf16 flat partitions; ρ and 8-bit states are the master")
    return cfg, notes
