"""Gradient release: update each parameter inside backward and free its gradient at once.

With release, a parameter is stepped in its post-accumulate-grad hook (the hook runs after the
gradient is fully accumulated — for FSDP2 after the reduce-scatter, on the sharded parameter)
and its ``.grad`` is set to ``None`` right after, so at most one tensor's gradient is alive at a
time. For FlashAdamW this takes persistent memory from ~7.1 to ~5.1 bytes per parameter.

What cannot work, and says so:

* ``optimizer.step()`` while release is active raises: the update already happened during
  backward, and a loop that calls ``step`` expects step-time semantics (gradient accumulation
  over micro-batches, ``GradScaler``, clipping the full gradient) that release cannot give.
* fp16 parameters: fp16 training needs loss scaling, and ``GradScaler`` unscales and checks
  the *whole* gradient before the step, which no longer exists. Use bf16.
* Engines where the hook would fire at the wrong time: DDP (before its all-reduce, so ranks
  would step on different gradients) and FSDP1 (the original parameters' hooks never fire).
  :mod:`flashoptim_dist.distributed` registers checks that refuse both with the fix.

Gradient accumulation on one device is impossible with release (each backward steps). Under
FSDP2, ``set_requires_gradient_sync(False)`` accumulation does work: the hooks fire only on the
micro-batch that reduce-scatters. Clipping by the global norm with release:
:func:`flashoptim_dist.distributed.clip.enable_gradient_release_with_clipping`.
"""

from __future__ import annotations

from typing import List

import torch

__all__ = ["enable_gradient_release", "GradientReleaseHandle", "register_release_check"]

# Engine checks ``fn(model, optimizer)`` that raise where release would be silently wrong (DDP
# fires the hook before its all-reduce; FSDP1 never fires it). flashoptim_dist.distributed
# registers its check on import; the core itself imports no engine.
_RELEASE_CHECKS: list = []


def register_release_check(fn) -> None:
    """Register ``fn(model, optimizer)``, called by :func:`enable_gradient_release` before any
    hook is installed; it raises to refuse an engine set-up that release cannot support."""
    if fn not in _RELEASE_CHECKS:
        _RELEASE_CHECKS.append(fn)


class GradientReleaseHandle:
    """Returned by :func:`enable_gradient_release`; :meth:`remove` restores normal stepping."""

    def __init__(self, optimizer, hooks: List, params: List[torch.Tensor]):
        self.optimizer = optimizer
        self._hooks = hooks
        self.params = params
        self.active = True

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.active = False
        if getattr(self.optimizer, "_gradient_release", None) is self:
            self.optimizer._gradient_release = None


def enable_gradient_release(model: torch.nn.Module, optimizer) -> GradientReleaseHandle:
    """Step every parameter of ``optimizer`` in its post-accumulate-grad hook and free its grad.

    ``model`` is used to check that every optimized parameter belongs to it (a parameter that
    does not would never get a hook call). Returns a handle; ``handle.remove()`` undoes it.
    """
    from .optim.base import FlashOptimizer

    if not isinstance(optimizer, FlashOptimizer):
        raise TypeError(
            f"enable_gradient_release needs a Flash optimizer, got {type(optimizer).__name__}; "
            "torch optimizers can be used with per-parameter optimizers instead"
        )
    for check in _RELEASE_CHECKS:
        check(model, optimizer)
    if getattr(optimizer, "_gradient_release", None) is not None:
        raise RuntimeError("gradient release is already enabled on this optimizer; remove() the first handle")
    model_params = {id(p) for p in model.parameters()}
    hooks, params = [], []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                continue
            if id(p) not in model_params:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is in the optimizer but not in the model; "
                    "gradient release hooks only fire for the model's own parameters"
                )
            local = optimizer._local(p)
            if local.dtype == torch.float16:
                raise ValueError(
                    "gradient release does not support float16 parameters: fp16 needs GradScaler, "
                    "which must unscale and inf-check the whole gradient before any update. "
                    "Cast the model to bfloat16 (cast_model(model, torch.bfloat16))."
                )

            def hook(param, _group=group):
                optimizer.step_param(param, _group)
                param.grad = None

            hooks.append(p.register_post_accumulate_grad_hook(hook))
            params.append(p)
    handle = GradientReleaseHandle(optimizer, hooks, params)
    optimizer._gradient_release = handle
    return handle
