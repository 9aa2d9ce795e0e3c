"""Refusals of :class:`~flashoptim_dist.optim.base.FlashOptimizer` at a parameter's first step:
parameters upcast to fp32 after the optimizer was built, and learning rates below what the
stored master can resolve. Both raise with the reason and the fix."""

from __future__ import annotations

import math
import os
import sys
from typing import Callable, Dict, Tuple

import torch


def check_upcast(opt_name: str, built: Dict[Tuple[int, int], Tuple[torch.dtype, tuple]], param_groups,
                 local: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Refuse a step on float32 parameters that were bf16/fp16 when the optimizer was built.

    ``built``: (group index, position) -> (dtype, shape) of every narrow parameter at build time.
    Frameworks that build the optimizer on the model and then replace its parameters
    (Accelerate's FSDP2 ``prepare`` remaps the optimizer by ``data_ptr`` to the sharded
    parameters, and with ``mixed_precision != "no"`` it first upcasts every non-fp32
    trainable parameter to fp32: accelerate 1.15, ``utils/fsdp_utils.py``,
    ``fsdp2_prepare_model``) would otherwise turn the bf16 + ρ master into plain fp32
    parameters without a word. Run once, at the first step (state is created lazily, so
    nothing of the optimizer goes stale in such a remap); an optimizer built on fp32
    parameters is never refused. Only a parameter of the same (global) shape in the same
    place counts: an engine that replaces the parameters by flat partitions of its own
    (DeepSpeed ZeRO, whose fp32 partitions a user may ask for) changes the shapes, and that
    is no upcast."""
    if not built:
        return
    upcast = []
    for gi, group in enumerate(param_groups):
        for i, p in enumerate(group["params"]):
            was = built.get((gi, i))
            if was is not None and was[1] == tuple(p.shape) and local(p).dtype == torch.float32:
                upcast.append((tuple(p.shape), was[0]))
    if not upcast:
        return
    n_narrow = len(built)
    shapes = ", ".join(str(s) for s, _ in upcast[:3]) + (", ..." if len(upcast) > 3 else "")
    was = upcast[0][1]
    where = (
        " Accelerate does this under FSDP when mixed_precision is not \"no\": it upcasts every "
        "non-fp32 trainable parameter to fp32 inside accelerator.prepare (HF Trainer: bf16=True "
        "or fp16=True). Fix: keep the model in bf16 and use mixed_precision=\"no\" "
        "(Accelerator(mixed_precision=\"no\"), `accelerate launch --mixed_precision no`, "
        "TrainingArguments(bf16=False)); compute then runs in the parameters' bf16."
        if "accelerate" in sys.modules else ""
    )
    raise RuntimeError(
        f"{opt_name} was built on {n_narrow} {was} parameters, but {len(upcast)} "
        f"of them are float32 at the first step (shapes {shapes}): something cast the model "
        "after the optimizer was built, which replaces the narrow parameter + rho master "
        "(7.1 bytes/param for FlashAdamW) by fp32 parameters and fp32 gradients (10+)."
        f"{where} To train fp32 parameters on purpose, build the optimizer on the fp32 model."
    )


def check_resolution(p, local: torch.Tensor, lr: float, update: float, config) -> None:
    """Raise if an update of size ``update`` (lr times the update's typical magnitude) cannot
    move the largest weights of ``local`` at all.

    The smallest change the stored master can make at |θ| = max|θ| is ρ's step (u/2)/N;
    stochastic rounding moves it in expectation down to 2^-b of that step (the dither's grid,
    b = 15 for int8 ρ, 7 for int16); without ρ, θ' itself rounds to nearest: u/2."""
    amax = float(local.detach().abs().float().amax())
    if not math.isfinite(amax) or amax == 0.0:
        return
    mant = 7 if local.dtype == torch.bfloat16 else 10
    ulp = 2.0 ** (math.floor(math.log2(amax)) - mant)
    bits = config.master_weight_bits
    levels = {24: 127, 32: 32767, None: 0}[bits]
    resolution = ulp / (2 * levels) if levels else ulp / 2
    if levels and config.stochastic:
        resolution /= 2.0 ** (15 if bits == 24 else 7)
    if update < resolution:
        fixes = ["master_weight_bits=24 or 32 (an error-correction term)"] if not levels else (
            ["master_weight_bits=32"] + (["rounding='stochastic' (the default)"] if not config.stochastic else []))
        raise ValueError(
            f"learning rate {lr:.3g} is too small for a {local.dtype} parameter of shape "
            f"{tuple(p.shape)} with max |θ| = {amax:.3g}: with master_weight_bits={bits} and "
            f"rounding={config.rounding!r} the master moves in steps of {resolution:.3g}, "
            f"so the largest weights would never change. Use {', '.join(fixes)}, a larger "
            "learning rate, or keep this tensor in float32 (cast_model(..., keep_fp32=[...])); "
            "check_numerics=False turns the check off."
        )


def _triton_usable(device: torch.device, backend: str) -> bool:
    """Whether the fused Triton kernel runs for tensors on ``device`` under ``config.backend``;
    raises when ``backend="triton"`` was asked for and cannot be had (no triton on CUDA, or a
    CPU tensor without ``TRITON_INTERPRET=1``) rather than silently using the reference."""
    if backend == "reference":
        return False
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            if backend == "triton":
                raise RuntimeError("backend='triton' needs the triton package: pip install triton") from None
            return False
        return True
    if backend == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"backend='triton' on a {device.type} tensor needs TRITON_INTERPRET=1 set before "
                "triton is imported (CPU interpretation, for tests); use backend='auto' on CPU"
            )
        return True
    return False


def check_grad(opt_name: str, p, grad, local):
    """The gradient the kernel reads for ``p``: refused with the fix when it is sparse, complex or
    not the local shard's size (an engine adapter bug); made contiguous otherwise."""
    if grad.is_sparse:
        raise RuntimeError(
            f"{opt_name} does not support sparse gradients (parameter of shape "
            f"{tuple(p.shape)}); use a dense embedding (sparse=False) or torch.optim.SparseAdam"
        )
    if grad.is_complex():
        raise RuntimeError(
            f"{opt_name} does not support complex gradients; view complex parameters "
            "as real (torch.view_as_real) before passing them to the optimizer"
        )
    if grad.numel() != local.numel():
        raise RuntimeError(
            f"gradient has {grad.numel()} elements but the local parameter has {local.numel()}; "
            "the engine adapter's ShardSpec.grad returned the wrong tensor"
        )
    if not grad.is_contiguous():
        grad = grad.contiguous()
    return grad
