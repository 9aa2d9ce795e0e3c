"""The one place that maps an optimizer name from the config to a class and its arguments.

Flash optimizers come from :mod:`flashoptim_dist`; their fp32 baselines from :mod:`torch.optim`
(AdamW, Adam, SGD). torch has no SGDW or Lion, so this module defines small fp32 reference
implementations of both (:class:`SGDW`, :class:`Lion`) with the same update rules as the Flash
versions: SGDW is torch SGD with the decay applied as ``θ ← θ(1 − lr·wd)`` before the step;
Lion is ``θ ← θ(1 − lr·wd) − lr·sign(β1·m + (1−β1)·g)``, then ``m ← β2·m + (1−β2)·g``.

Parameter groups: weight decay applies to parameters with two or more dimensions (matrices and
embeddings); 1-D parameters (norm weights, biases) get ``weight_decay=0`` unless
``optim.decay_all`` is set.
"""

from __future__ import annotations

import importlib
from typing import Iterable

import torch
from torch import nn

from .._names import FAMILY_OF
from .config import BASELINE_OF, FLASH_OPTIMIZERS, OptimConfig

__all__ = [
    "OPTIMIZER_CLASSES", "optimizer_class", "optimizer_kwargs", "param_groups", "build_optimizer", "SGDW", "Lion",
    "baseline_of", "is_flash",
]

#: name -> (module, attribute). The single lookup table for optimizer classes.
OPTIMIZER_CLASSES = {
    **{name: ("flashoptim_dist.optim.flash", name) for name in FLASH_OPTIMIZERS},
    "AdamW": ("torch.optim", "AdamW"),
    "Adam": ("torch.optim", "Adam"),
    "SGD": ("torch.optim", "SGD"),
    "SGDW": (__name__, "SGDW"),
    "Lion": (__name__, "Lion"),
}


def is_flash(name: str) -> bool:
    """True for the Flash optimizers (bf16 params), False for their fp32 torch baselines."""
    return name in FLASH_OPTIMIZERS


def baseline_of(name: str) -> str:
    """The torch baseline of a Flash optimizer (FlashAdamW -> AdamW); a torch name maps to itself."""
    return BASELINE_OF.get(name, name)


def optimizer_class(name: str):
    """The class registered under ``name``; a clear ImportError if its module is missing."""
    if name not in OPTIMIZER_CLASSES:
        raise KeyError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZER_CLASSES)}")
    module, attr = OPTIMIZER_CLASSES[name]
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ImportError(
            f"optimizer {name!r} needs {module}.{attr}, which cannot be imported ({e}); "
            "install the package (`pip install -e .`) or choose a torch baseline such as optim.name=AdamW"
        ) from e


def _family(name: str) -> str:
    return FAMILY_OF[name]


def optimizer_kwargs(cfg: OptimConfig) -> dict:
    """Constructor keyword arguments for ``cfg.name`` (lr, betas, ... and the Flash-only options)."""
    fam = _family(cfg.name)
    if fam == "adam":
        kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif fam == "sgd":
        kw = dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    else:
        kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if is_flash(cfg.name):
        kw.update(master_weight_bits=cfg.master_weight_bits, quantize=cfg.quantize, rounding=cfg.rounding,
                  seed=cfg.rounding_seed, check_numerics=cfg.check_numerics)
    elif cfg.fused:
        kw["fused"] = True
    return kw


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """Two groups: decayed (>=2-D params) and not decayed (1-D); empty groups are dropped."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if decay_all or p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: OptimConfig, model: nn.Module):
    """Instantiate ``cfg.name`` over ``model``'s parameters (call after the engine wrapped the model)."""
    cls = optimizer_class(cfg.name)
    groups = param_groups(model, cfg.weight_decay, cfg.decay_all)
    for g in groups:  # the schedule's peak, as torch's LR schedulers record it (check_numerics judges it)
        g["initial_lr"] = cfg.lr
    return cls(groups, **optimizer_kwargs(cfg))


class SGDW(torch.optim.SGD):
    """torch SGD with decoupled weight decay: ``θ ← θ(1 − lr·wd)``, then SGD without decay."""

    @torch.no_grad()
    def step(self, closure=None):
        saved = []
        for group in self.param_groups:
            saved.append(group["weight_decay"])
            wd, lr = group["weight_decay"], group["lr"]
            if wd:
                for p in group["params"]:
                    if p.grad is not None:
                        p.mul_(1 - lr * wd)
            group["weight_decay"] = 0.0
        try:
            return super().step(closure)
        finally:
            for group, wd in zip(self.param_groups, saved):
                group["weight_decay"] = wd


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023) in fp32, the baseline of FlashLion; state: ``exp_avg``."""

    def __init__(self, params: Iterable, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        if lr < 0:
            raise ValueError(f"Lion: lr={lr} must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion: betas={betas} must be in [0, 1)")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                g = p.grad
                update = (m * beta1 + g * (1 - beta1)).sign_()
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr)
                m.mul_(beta2).add_(g, alpha=1 - beta2)
        return loss
