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

**Batching per engine unit.** An engine adapter may register a *unit* function
(:func:`register_release_units`) that names, for each parameter, the group of parameters whose
gradients become ready together (FSDP2: one ``fully_shard`` module, whose sharded gradients are
views of one reduce-scatter output). The hooks then collect a unit and update it with one
kernel launch once its last gradient arrives — the memory is the same (the unit's gradients
share one buffer, freed when the last view goes) and the per-launch host cost (~0.1 ms) is paid
once per unit instead of once per parameter. A unit whose parameters do not all get a gradient
is updated at the next unit's first hook or at the end of backward, whichever comes first.

Gradient accumulation on one device is impossible with release (each backward steps). Under
FSDP2, ``set_requires_gradient_sync(False)`` accumulation does work: the hooks fire only on the
micro-batch that reduce-scatters. Clipping by the global norm with release:
:func:`flashoptim_dist.distributed.clip.enable_gradient_release_with_clipping`.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

__all__ = ["enable_gradient_release", "GradientReleaseHandle", "register_release_check", "register_release_units"]

# Engine checks ``fn(model, optimizer)`` that raise where release would be silently wrong (DDP
# fires the hook before its all-reduce; FSDP1 never fires it). flashoptim_dist.distributed
# registers its check on import; the core itself imports no engine.
_RELEASE_CHECKS: list = []


def register_release_check(fn) -> None:
    """Register ``fn(model, optimizer)``, called by :func:`enable_gradient_release` before any
    hook is installed; it raises to refuse an engine set-up that release cannot support."""
    if fn not in _RELEASE_CHECKS:
        _RELEASE_CHECKS.append(fn)


# Engine unit functions ``fn(params) -> {id(param): unit key}`` (see "Batching per engine unit").
_RELEASE_UNITS: list = []


def register_release_units(fn) -> None:
    """Register ``fn(params)`` returning ``{id(p): key}`` for the parameters an engine updates
    together (same key = gradients ready together); parameters it leaves out step alone."""
    if fn not in _RELEASE_UNITS:
        _RELEASE_UNITS.append(fn)


class _UnitBatcher:
    """Collects the parameters of one unit from their hooks and steps them in one launch."""

    def __init__(self, optimizer, params: List[torch.Tensor]):
        self.optimizer = optimizer
        self.params = params
        self._unit: Dict[int, Tuple[object, int]] = {}
        self._pending: List[Tuple[torch.Tensor, dict]] = []
        self._key = None
        self._queued = False
        self._refresh()

    def _refresh(self) -> None:
        keys: Dict[int, object] = {}
        for fn in _RELEASE_UNITS:
            for pid, key in (fn(self.params) or {}).items():
                keys.setdefault(pid, key)
        sizes: Dict[object, int] = {}
        for key in keys.values():
            sizes[key] = sizes.get(key, 0) + 1
        self._unit = {pid: (key, sizes[key]) for pid, key in keys.items()}

    def add(self, p: torch.Tensor, group: dict) -> None:
        if p.grad is None:  # e.g. a measuring pass of two-pass clipping took the gradient
            return
        hit = self._unit.get(id(p))
        key, size = hit if hit is not None else (("param", id(p)), 1)
        if self._pending and key != self._key:
            self.flush()
        self._pending.append((p, group))
        self._key = key
        if len(self._pending) >= size:
            self.flush()
        elif not self._queued:
            try:  # an incomplete unit (a parameter without gradient) is stepped at the end of backward
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
                self._queued = True
            except RuntimeError:  # hooks fired outside an autograd backward: nothing to wait for
                self.flush()

    def _end_of_backward(self) -> None:
        self._queued = False
        self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        items, self._pending, self._key = self._pending, [], None
        if not items:
            return
        self.optimizer.step_items(items)
        for p, _ in items:
            p.grad = None


class GradientReleaseHandle:
    """Returned by :func:`enable_gradient_release`; :meth:`remove` restores normal stepping."""

    def __init__(self, optimizer, hooks: List, params: List[torch.Tensor]):
        self.optimizer = optimizer
        self._hooks = hooks
        self.params = params
        self.active = True

    def remove(self) -> None:
        batcher = getattr(self, "_batcher", None)
        if batcher is not None:
            batcher.flush()  # a unit still collecting (removed mid-backward) is stepped now
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.active = False
        if getattr(self.optimizer, "gradient_release", None) is self:
            self.optimizer.gradient_release = None


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
    if getattr(optimizer, "gradient_release", None) is not None:
        raise RuntimeError("gradient release is already enabled on this optimizer; remove() the first handle")
    model_params = {id(p) for p in model.parameters()}
    hooks, params, entries = [], [], []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                continue
            if id(p) not in model_params:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is in the optimizer but not in the model; "
                    "gradient release hooks only fire for the model's own parameters"
                )
            local = optimizer.local_tensor(p)
            if local.dtype == torch.float16:
                raise ValueError(
                    "gradient release does not support float16 parameters: fp16 needs GradScaler, "
                    "which must unscale and inf-check the whole gradient before any update. "
                    "Cast the model to bfloat16 (cast_model(model, torch.bfloat16))."
                )

            entries.append((p, group))
            params.append(p)
    batcher = _UnitBatcher(optimizer, params)
    for p, group in entries:
        hooks.append(p.register_post_accumulate_grad_hook(lambda param, _group=group: batcher.add(param, _group)))
    handle = GradientReleaseHandle(optimizer, hooks, params)
    handle._batcher = batcher
    optimizer.gradient_release = handle
    return handle
