"""Flash optimizers in torchtitan (written against torchtitan 0.3.0).

torchtitan has no optimizer registry: ``OptimizersContainer._resolve_optimizer_factory`` knows
``Adam``, ``AdamW`` and ``DistMuon`` only (``torchtitan/components/optimizer/optimizer.py``).
Its extension point is a subclass of the container with its own nested ``Config``, put into the
config tree either by a ``config_registry`` function or by an ``@override`` on
``OptimizersContainer.Config`` that the user activates with ``--override.imports``. This module
provides both:

* :class:`FlashOptimizersContainer` — the container with ``FlashAdamW``, ``FlashAdam``,
  ``FlashLion``, ``FlashSGD`` and ``FlashSGDW`` added to the names a ``ParamGroupConfig`` may
  use (torch's names keep working, so one model can mix them by pattern);
* :func:`flash_optimizers` — the override: it replaces the optimizer config of any torchtitan
  config by a :class:`FlashOptimizersContainer.Config`, renaming ``AdamW``/``Adam`` groups to
  their Flash twins (or every group to ``optimizer=``), so the one-flag change is::

      torchrun --nproc_per_node 8 -m torchtitan.train --module llama3 --config llama3_8b \\
          --training.dtype bfloat16 \\
          --override.imports flashoptim_dist.integrations.torchtitan.flash_optimizers

  with options as JSON after the target, e.g.
  ``'flashoptim_dist.integrations.torchtitan.flash_optimizers={"optimizer": "FlashLion", "lr": 1e-4}'``;
* :func:`flash_adamw` — the twin of torchtitan's ``default_adamw`` for ``config_registry``
  functions written in Python.

What the rest of torchtitan does with the optimizer, and why it works unchanged:

* it passes ``fused``/``foreach`` in every param group and ``param_names`` (FQNs): the Flash
  optimizers accept and ignore the first two (one fused launch per step anyway) and torch keeps
  the names;
* its checkpointer saves ``OptimizersContainer.state_dict()``, a flat FQN-keyed dict
  (``state.{fqn}.{name}``, ``components/optimizer/utils.py``) built from ``opt.state_dict()``,
  which for FSDP2 parameters holds DTensors in the parameter's global layout; loading walks the
  live state's keys, which are the same names. So DCP reshards the Flash state on load (2 → 1
  ranks tested) and the checkpoint holds ρ and 8-bit codes, not fp32 moments;
* it materializes state before a save or load with a zero-gradient, lr = 0 step, which changes
  nothing in a Flash optimizer either;
* it keeps gradients as zeroed buffers between steps (``zero_grad(set_to_none=False)`` while
  CUDA graphs are on) and may CUDA-graph forward + backward: the optimizer step stays outside
  the graph, which is why this container offers no gradient release (that would step inside
  backward, i.e. inside the captured region).

Parameters must be bf16 for the ρ scheme: torchtitan keeps fp32 parameters and casts them for
compute (``training.mixed_precision_param``) unless ``--training.dtype bfloat16``. A Flash
optimizer on fp32 parameters keeps no ρ but fp32 parameters and gradients (≈ 10 bytes/param
instead of 7); the container refuses that with the fix unless the config says
``allow_fp32_params=True``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig
from torchtitan.config.override import derive, override

from .. import optim as _optim
from .._names import BASELINE_OF, FLASH_OPTIMIZER_NAMES

__all__ = ["FlashOptimizersContainer", "FLASH_OPTIMIZERS", "flash_adamw", "flash_optimizers", "flash_param_groups"]

logger = logging.getLogger(__name__)

#: The names a ParamGroupConfig.optimizer_name may use for a Flash optimizer.
FLASH_OPTIMIZERS: Dict[str, type] = {name: getattr(_optim, name) for name in FLASH_OPTIMIZER_NAMES}

#: What flash_optimizers renames when no ``optimizer`` is given: torch's name -> the Flash twin.
#: Only torch.optim's own names (SGDW and Lion are not torch.optim classes).
_TWINS = {base: flash for flash, base in BASELINE_OF.items() if base in ("AdamW", "Adam", "SGD")}

#: Keyword arguments of the optimizer constructors that configure the numerics, not a group:
#: they go to ``optimizer_factory_kwargs_by_name`` (one value per optimizer instance).
_NUMERIC_KWARGS = ("master_weight_bits", "quantize", "group_size", "backend", "check_numerics", "rounding", "seed")


def _group_keys(cls: type) -> set:
    """The per-group hyper-parameters ``cls`` takes (its constructor's keyword arguments minus
    the numeric config and torch's implementation switches)."""
    names = set(inspect.signature(cls.__init__).parameters) - {"self", "params", "kwargs"}
    return names - set(_NUMERIC_KWARGS)


class FlashOptimizersContainer(OptimizersContainer):
    """torchtitan's ``OptimizersContainer`` with the Flash optimizers added to the names a
    ``ParamGroupConfig.optimizer_name`` may use.

    Everything else is the parent's: param groups by regex pattern (first match wins, one
    optimizer instance per name and model part), the flat FQN-keyed state dict the checkpointer
    saves, ``step``/``zero_grad`` over every optimizer, the MoE load-balancing pre-hook. The
    numeric config of a Flash optimizer (``master_weight_bits``, ``quantize``, ``rounding``,
    ``seed``, ...) is per instance: set it in ``optimizer_factory_kwargs_by_name``, e.g.
    ``{"FlashAdamW": {"master_weight_bits": 32}}``.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        allow_fp32_params: bool = False
        """Let a Flash optimizer step float32 parameters. It then keeps no ρ and saves only the
        8-bit moments (≈ 10 bytes/param instead of 7): usually a missed
        ``--training.dtype bfloat16``, hence refused unless set."""

    @staticmethod
    def _resolve_optimizer_factory(name: str):
        cls = FLASH_OPTIMIZERS.get(name)
        if cls is not None:
            return cls
        try:
            return OptimizersContainer._resolve_optimizer_factory(name)
        except NotImplementedError:
            raise NotImplementedError(
                f"Optimizer {name!r} is not known to FlashOptimizersContainer: use one of "
                f"{sorted(FLASH_OPTIMIZERS)} or torchtitan's own names (Adam, AdamW, DistMuon)"
            ) from None

    def __init__(self, config: Config, *, model_parts: List[torch.nn.Module]) -> None:
        super().__init__(config, model_parts=model_parts)
        if not config.allow_fp32_params:
            for opt in self.optimizers:
                if not isinstance(opt, _optim.FlashOptimizer) or opt.config.master_weight_bits is None:
                    continue
                fp32 = [name for g in opt.param_groups for name, p in zip(g.get("param_names", ()), g["params"])
                        if p.dtype == torch.float32]
                if fp32:
                    raise ValueError(
                        f"{type(opt).__name__} got {len(fp32)} float32 parameters ({', '.join(fp32[:3])}"
                        f"{', ...' if len(fp32) > 3 else ''}): torchtitan keeps fp32 parameters unless "
                        "--training.dtype bfloat16, and then the optimizer keeps fp32 parameters and "
                        "gradients instead of bf16 + an int8 rho (about 10 bytes/param instead of 7). "
                        "Fix: --training.dtype bfloat16 (torchtitan then builds the model in bf16 and "
                        "FSDP keeps fp32 gradient reduction through --training.mixed_precision_reduce), "
                        "or set allow_fp32_params=True in the optimizer config to accept it."
                    )


def flash_param_groups(groups: List[ParamGroupConfig], optimizer: Optional[str] = None,
                       **hyper: Any) -> List[ParamGroupConfig]:
    """``groups`` with Flash optimizers: every group renamed to ``optimizer`` when given, else
    ``AdamW``/``Adam``/``SGD`` groups to their Flash twins (other names are kept). ``hyper``
    (``lr``, ``weight_decay``, ...) overrides the kwargs of every renamed group; kwargs the new
    optimizer does not take (``eps`` for Lion, ``betas`` for SGD) are dropped and logged."""
    if optimizer is not None and optimizer not in FLASH_OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not a Flash optimizer; use one of {sorted(FLASH_OPTIMIZERS)}")
    out = []
    for g in groups:
        name = optimizer if optimizer is not None else _TWINS.get(g.optimizer_name, g.optimizer_name)
        if name not in FLASH_OPTIMIZERS:
            out.append(g)
            continue
        keys = _group_keys(FLASH_OPTIMIZERS[name])
        bad = sorted(set(hyper) - keys)
        if bad:
            raise ValueError(f"{name} takes no {bad}; its group hyper-parameters are {sorted(keys)}")
        kwargs = {**g.optimizer_kwargs, **hyper}
        dropped = sorted(k for k in kwargs if k not in keys)
        if dropped:
            logger.warning("param group %r: %s does not take %s; dropped", g.pattern, name, dropped)
        out.append(dataclasses.replace(g, optimizer_name=name,
                                       optimizer_kwargs={k: v for k, v in kwargs.items() if k in keys}))
    return out


@override(target=OptimizersContainer.Config,
          description="Flash optimizers (flashoptim_dist): bf16 params + int8 rho, 8-bit states")
def flash_optimizers(cfg: OptimizersContainer.Config, optimizer: Optional[str] = None,
                     allow_fp32_params: bool = False, **kwargs: Any) -> "FlashOptimizersContainer.Config":
    """The torchtitan override that switches a config to Flash optimizers.

    Activated with ``--override.imports flashoptim_dist.integrations.torchtitan.flash_optimizers``
    (kwargs as JSON after ``=``). Keeps the param-group patterns and their hyper-parameters and
    renames the optimizers (see :func:`flash_param_groups`); ``kwargs`` may hold group
    hyper-parameters (``lr``, ``weight_decay``, ``betas``, ...) applied to every renamed group
    and numeric options (``master_weight_bits``, ``quantize``, ``rounding``, ``seed``, ...)
    applied to every Flash optimizer instance.
    """
    numeric = {k: kwargs.pop(k) for k in list(kwargs) if k in _NUMERIC_KWARGS}
    groups = flash_param_groups(cfg.param_groups, optimizer, **kwargs)
    used = {g.optimizer_name for g in groups if g.optimizer_name in FLASH_OPTIMIZERS}
    if not used:
        raise ValueError(
            "flash_optimizers: no param group uses AdamW, Adam or SGD, so nothing was switched "
            f"(groups: {[g.optimizer_name for g in cfg.param_groups]}); name the optimizer, e.g. "
            "'flashoptim_dist.integrations.torchtitan.flash_optimizers={\"optimizer\": \"FlashAdamW\"}'"
        )
    by_name = {k: dict(v) for k, v in cfg.optimizer_factory_kwargs_by_name.items()}
    for name in used:
        by_name[name] = {**by_name.get(name, {}), **numeric}
    return derive(cfg, FlashOptimizersContainer.Config, param_groups=groups,
                  optimizer_factory_kwargs_by_name=by_name, allow_fp32_params=allow_fp32_params)


def flash_adamw(lr: float = 8e-4, **kwargs: Any) -> "FlashOptimizersContainer.Config":
    """``default_adamw``'s twin: one catch-all ``FlashAdamW`` group with torchtitan's defaults
    (``betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1``); ``kwargs`` override group
    hyper-parameters or set numeric options (``master_weight_bits``, ``rounding``, ...)."""
    numeric = {k: kwargs.pop(k) for k in list(kwargs) if k in _NUMERIC_KWARGS}
    return FlashOptimizersContainer.Config(
        param_groups=[ParamGroupConfig(pattern=r".*", optimizer_name="FlashAdamW", optimizer_kwargs={
            "lr": lr, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, **kwargs})],
        optimizer_factory_kwargs_by_name={"FlashAdamW": numeric} if numeric else {},
    )
