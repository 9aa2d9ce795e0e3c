"""The engine contract: what the trainer calls on any engine (:class:`Engine`), and the small
per-engine subclasses that differ in gradient sync, clipping and what counts as state.

Split out of :mod:`.engines`, which builds these objects (one builder per engine name) and
re-exports every public name here.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


class EngineError(RuntimeError):
    """The engine cannot run with this config/launch; the message says what to change."""


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local part of a tensor (``to_local()`` of a DTensor, the tensor itself otherwise)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token loss in fp32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)


class Engine:
    """A wrapped model + optimizer with the operations the training loop needs."""

    def __init__(self, name: str, model: nn.Module, module: nn.Module, optimizer, device: torch.device,
                 autocast: bool = False, grad_release=None) -> None:
        self.name = name
        self.model = model
        """What to call for forward (the wrapper)."""
        self.module = module
        """The underlying model (unwrapped where the wrapper is a separate object, e.g. DDP)."""
        self.optimizer = optimizer
        self.device = device
        self.autocast = autocast
        self.grad_release = grad_release
        self.layout = ""
        """How the ranks are arranged when that is not obvious from the engine's name (HSDP)."""
        self.tp_size = 1
        """Tensor-parallel degree (engine.tp_size; fsdp2 only)."""
        self.loss_chunks = 1
        """Token slices for head + loss (model.loss_chunks; > 1 needs a model with
        ``forward(idx, targets, loss_chunks)``: the built-in GPT, or a Hugging Face model after
        ``enable_sliced_loss()``, which ``build_model`` calls for model.loss_chunks > 1)."""

    # -- forward/backward ---------------------------------------------------------------------
    def _autocast(self):
        if self.autocast:
            # No weight cache: it keeps a bf16 copy of every fp32 weight alive until the whole
            # forward ends (2 bytes/param more at the peak), which is what activation
            # checkpointing tries to avoid; without checkpointing autograd saves each cast for
            # backward anyway, so the cache buys nothing but a cast per reuse (the sliced loss's head).
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def micro_context(self, is_last: bool):
        """Context for one micro-step's forward+backward; gradient sync only when ``is_last``."""
        return contextlib.nullcontext()

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of a micro-batch (forward only)."""
        with self._autocast():
            if self.loss_chunks > 1:  # the model computes head + loss slice by slice
                return self.model(x, targets=y, loss_chunks=self.loss_chunks)
            logits = self.model(x)
        return cross_entropy(logits, y)

    def sequence_losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of each sequence of a micro-batch, shape ``(batch,)``; forward
        only (evaluation). With ``loss_chunks`` > 1 sequence by sequence, head + loss in slices,
        so that the full logits never exist."""
        with self._autocast():
            if self.loss_chunks > 1:
                return torch.stack([self.model(x[i : i + 1], targets=y[i : i + 1], loss_chunks=self.loss_chunks)
                                    for i in range(x.shape[0])])
            return cross_entropy(self.model(x), y, reduction="none").view(y.shape).mean(dim=1)

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        """Backward of one micro-step's loss, scaled by 1/accum."""
        (loss / accum).backward()

    def clip_grad_norm(self, max_norm: float) -> Optional[float]:
        """Clip the global gradient norm to ``max_norm`` and return the norm before clipping."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if not params:
            return None
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(local_tensor(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))

    def step(self, max_grad_norm: float, before_zero_grad: Optional[Callable[[], None]] = None) -> Optional[float]:
        """Clip (if ``max_grad_norm`` > 0), step, call ``before_zero_grad``, zero the gradients."""
        norm = None
        if self.grad_release is None:
            if max_grad_norm > 0:
                norm = self.clip_grad_norm(max_grad_norm)
            self.optimizer.step()
        else:  # the hooks already stepped; a clipping handle knows the gradient norm
            last = getattr(self.grad_release, "last_norm", None)
            norm = None if last is None else float(last)
        if before_zero_grad is not None:
            before_zero_grad()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def eval_mode(self, on: bool) -> None:
        """Switch between eval (no dropout, no activation checkpointing) and train mode."""
        self.model.train(not on)

    # -- introspection --------------------------------------------------------------------------
    def ckpt_targets(self):
        """``(model, optimizer)`` to hand to the checkpoint functions."""
        return self.module if self.name == "ddp" else self.model, self.optimizer

    def param_tensors(self) -> list[torch.Tensor]:
        """This rank's parameter storage (local shards)."""
        return [local_tensor(p) for p in self.module.parameters()]

    def grad_tensors(self) -> list[torch.Tensor]:
        """This rank's gradient storage (local shards)."""
        return [local_tensor(p.grad) for p in self.module.parameters() if p.grad is not None]

    def optimizer_state_tensors(self) -> list[torch.Tensor]:
        """Every tensor held in ``optimizer.state`` (local shards)."""
        return list(_tensors_in(getattr(self.optimizer, "state", {})))

    def close(self) -> None:
        """Remove hooks installed by the engine."""
        if self.grad_release is not None:
            self.grad_release.remove()
            self.grad_release = None


def _tensors_in(obj):
    if isinstance(obj, torch.Tensor):
        yield local_tensor(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v)


class _DDPEngine(Engine):
    def micro_context(self, is_last: bool):
        return contextlib.nullcontext() if is_last else self.model.no_sync()


class _FSDP2Engine(Engine):
    def micro_context(self, is_last: bool):
        self.model.set_requires_gradient_sync(is_last)
        return contextlib.nullcontext()

    def clip_grad_norm(self, max_norm: float) -> Optional[float]:
        if self.tp_size == 1:
            return super().clip_grad_norm(max_norm)
        # Under TP the parameters live on two meshes (split weights on ("dp", "tp"), norms on
        # "dp"), which torch's clip_grad_norm_ cannot stack; flashoptim_dist's grad_norm reduces
        # each mesh over its sharded dims only (the norms' copies over "tp" counted once).
        from flashoptim_dist.distributed import clip_coefficient, grad_norm

        params = [p for p in self.module.parameters() if p.grad is not None]
        if not params:
            return None
        norm = grad_norm(params)
        coef = clip_coefficient(norm, max_norm)
        for p in params:
            local_tensor(p.grad).mul_(coef.to(p.grad.device))
        return float(norm)

    def eval_mode(self, on: bool) -> None:
        super().eval_mode(on)
        if not on:
            # A forward without backward (evaluation) leaves the root unit's parameters unsharded
            # (FSDP2 keeps the root gathered for the backward that would follow). Reshard so that
            # checkpoints, memory accounting and the optimizer see the sharded parameters again.
            from torch.distributed.fsdp import FSDPModule

            for m in self.model.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()


class _FSDP1Engine(Engine):
    def micro_context(self, is_last: bool):
        return contextlib.nullcontext() if is_last else self.model.no_sync()

    def clip_grad_norm(self, max_norm: float) -> Optional[float]:
        return float(self.model.clip_grad_norm_(max_norm))


class _DeepSpeedEngine(Engine):
    """DeepSpeed: engine.backward / engine.step per micro-step; DeepSpeed accumulates and clips."""

    def backward(self, loss, accum):
        self.model.backward(loss)
        self.model.step()

    def step(self, max_grad_norm, before_zero_grad=None):
        norm = None
        getter = getattr(self.model, "get_global_grad_norm", None)
        if callable(getter):
            value = getter()
            norm = None if value is None else float(value)
        if before_zero_grad is not None:
            before_zero_grad()
        return norm

    def ckpt_targets(self):
        return self.model, self.optimizer

    def param_tensors(self):
        out = []
        for p in self.model.module.parameters():
            ds = getattr(p, "ds_tensor", None)  # ZeRO-3 partition
            out.append(ds if ds is not None else p)
        return out

    def grad_tensors(self):
        out = [p.grad for p in self.model.module.parameters() if p.grad is not None]
        inner = getattr(self.optimizer, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            out.extend(p.grad for p in group["params"] if p.grad is not None)
        return out

    def optimizer_state_tensors(self):
        # The client optimizer's state (e.g. Flash ρ and 8-bit codes) plus the flat partitions it
        # optimizes when they are not the model's own storage (e.g. DeepSpeed's fp32 masters).
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        out = list(_tensors_in(getattr(inner, "state", {})))
        # ZeRO's flat bf16 partitions are slices of the buffer the model's params live in: same storage.
        model_storages = {t.untyped_storage().data_ptr() for t in self.param_tensors() if t.numel()}
        for group in getattr(inner, "param_groups", []):
            out.extend(p for p in group["params"] if p.numel() and p.untyped_storage().data_ptr() not in model_storages)
        return out

    def eval_mode(self, on: bool) -> None:
        (self.model.eval if on else self.model.train)()
