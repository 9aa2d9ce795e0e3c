"""The public Flash optimizers: hyper-parameter validation and per-group hyper rows.

Every class is a :class:`torch.optim.Optimizer` with the same hyper-parameters and update rule
as its ``torch.optim`` counterpart, plus the numeric options of :class:`~flashoptim_dist.FlashConfig`
(``master_weight_bits``, ``quantize``, ``group_size``, ``backend``, ``check_numerics``).
``torch.optim``'s implementation switches ``fused``/``foreach`` are accepted and ignored,
``differentiable=True`` refused with the reason (:func:`_torch_impl_flags`).

``capturable=True`` (as in ``torch.optim``) makes ``step()`` capturable in a CUDA graph: step
counters are 0-d float32 tensors on the parameter's device, ``lr`` may be a 0-d tensor (a
scheduler updates it in place), and the hyper-parameter rows are computed by torch ops on the
device, so nothing in the step reads a value on the host (:mod:`.base`, "Capturable step";
docs/design.md). It cannot be combined with ``check_numerics=True``, which reads the learning
rate and gradients on the host at a tensor's first step.

Persistent bytes per parameter with bf16 params and bf16 grads (params 2 + grads 2 + state):

=========================  =========  ==============================================
optimizer                  bytes      state
=========================  =========  ==============================================
FlashAdamW/FlashAdam-24    7.125      ρ int8 1 + m 1 + v 1 + 2 bf16 scales per 32
FlashAdamW-32              8.125      ρ int16 2 + m 1 + v 1 + scales
FlashSGD(momentum)/Lion    6.06       ρ 1 + momentum 1 + scales
FlashSGD (no momentum)     5          ρ 1
torch AdamW, fp32 params   16         param 4 + grad 4 + m 4 + v 4
=========================  =========  ==============================================

With gradient release (:func:`~flashoptim_dist.enable_gradient_release`) the 2 grad bytes
are freed right after each parameter's update, so only one tensor's grad is alive at a time.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .._names import DECOUPLED_DECAY, FAMILY_OF, FLASH_OPTIMIZER_NAMES
from ..config import FlashConfig
from .base import FlashOptimizer
from ..reference import N_HYPER

__all__ = ["FlashAdamW", "FlashAdam", "FlashSGD", "FlashSGDW", "FlashLion"]


def _as_float(name: str, value) -> float:
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = float(value.item())
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_range(name: str, value: float, lo: float, hi: float, lo_open=False, hi_open=True) -> None:
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"Invalid {name}: {value} (must be in {lb}{lo}, {hi}{rb})")


def _torch_impl_flags(cls_name: str, kwargs: Dict[str, Any]) -> None:
    """The implementation switches of ``torch.optim`` optimizers, which frameworks pass to
    every optimizer they build (torchtitan: ``fused``/``foreach``):

    * ``fused``, ``foreach`` (any value): accepted and ignored — a Flash step is always one
      fused kernel launch per (family, dtype) over every tensor, whatever they say;
    * ``differentiable``: ``False``/``None`` accepted; ``True`` refused — the update writes
      8-bit codes and ρ in place under ``no_grad``, so no gradient can flow through it.

    Anything else is a TypeError, as in ``torch.optim``.
    """
    for flag in ("fused", "foreach"):
        kwargs.pop(flag, None)
    if kwargs.pop("differentiable", None):
        raise ValueError(
            f"{cls_name} cannot run with differentiable=True: the step is not differentiable (it writes "
            "8-bit codes and the ρ correction in place under no_grad). Use a torch.optim optimizer with "
            "differentiable=True for meta-learning through the update."
        )
    if kwargs:
        raise TypeError(f"{cls_name} got unexpected keyword arguments: {sorted(kwargs)}")


def _capturable(cls_name: str, capturable, check_numerics: bool) -> bool:
    """Validate ``capturable`` (``None`` counts as False, as in ``torch.optim``)."""
    capturable = bool(capturable)
    if capturable and check_numerics:
        raise ValueError(
            f"{cls_name} cannot combine capturable=True with check_numerics=True: the numerics check reads "
            "the learning rate and the gradient on the host at each tensor's first step, which a captured "
            "(host-sync-free) step must not do. Run the check once with a non-capturable optimizer (same "
            "model and lr, check_numerics=True, one step), then build the capturable one with "
            "check_numerics=False."
        )
    return capturable


def _rows(n: int, values: List[float]) -> np.ndarray:
    """``n`` copies of one fp64 hyper row (the step-independent columns; the rest, including the
    step columns the base class fills, are 0)."""
    row = np.zeros(N_HYPER, dtype=np.float64)
    row[: len(values)] = values
    return np.tile(row, (n, 1))


def _config(master_weight_bits, quantize, group_size, backend, check_numerics, rounding, seed) -> FlashConfig:
    return FlashConfig(
        group_size=group_size,
        quantize=quantize,
        master_weight_bits=master_weight_bits,
        backend=backend,
        check_numerics=check_numerics,
        rounding=rounding,
        seed=seed,
    )


def _ratio_bound(xp, beta1: float, beta2: float, steps):
    """R_t on float64 ``steps`` with the array namespace ``xp`` (numpy on the host, torch for the
    capturable step on the steps' device): one formula, so both paths take the same operations
    in the same order (the step-independent logarithms taken by numpy in both, as before)."""
    if beta2 <= 0.0:
        return xp.full_like(steps, math.inf)
    r = beta1 * beta1 / beta2
    if r == 0.0:  # β1 = 0: m_t = g_t, one term
        geo = xp.ones_like(steps)
    elif r == 1.0:
        geo = steps
    else:  # Σ_{j<t} r^j
        geo = -xp.expm1(steps * float(np.log(r))) / (1.0 - r)
    return (1.0 - beta1) * xp.sqrt(geo) * xp.sqrt(-xp.expm1(steps * float(np.log(beta2)))) / math.sqrt(1.0 - beta2)


def adam_ratio_bound(beta1: float, beta2: float, steps: np.ndarray) -> np.ndarray:
    """R_t: the largest |m_t|·√(1−β2^t)/√v_t exact Adam can reach at step t, for any gradients
    (Cauchy–Schwarz, see :mod:`flashoptim_dist.reference`); ``inf`` where nothing bounds it (β2 = 0)."""
    return _ratio_bound(np, beta1, beta2, np.asarray(steps, dtype=np.float64))


def adam_ratio_bound_t(beta1: float, beta2: float, steps: torch.Tensor) -> torch.Tensor:
    """:func:`adam_ratio_bound` with torch ops on a float64 tensor of step counts (the capturable
    step)."""
    return _ratio_bound(torch, beta1, beta2, steps)


def _rows_t(steps: torch.Tensor, values: list) -> torch.Tensor:
    """:func:`_rows` on the device of ``steps`` (float64): ``values`` are Python floats or 0-d
    float64 tensors (the lr); filled column by column, nothing is copied from the host."""
    rows = torch.zeros((steps.shape[0], N_HYPER), dtype=torch.float64, device=steps.device)
    for i, v in enumerate(values):
        if torch.is_tensor(v) or v != 0.0:
            rows[:, i] = v
    return rows


def _lr_t(group, device) -> Any:
    """The group's lr for the capturable rows: a Python float, or its 0-d tensor as float64 (a
    dtype conversion on its own device). A CPU tensor with parameters on an accelerator is read
    as a float (host memory: no device sync, but fixed in a captured graph; torch's
    ``_init_optim_state`` sets such an lr of 0 for its one state-creating step); a tensor on
    another accelerator is refused, since moving it would be a copy between devices in the step."""
    lr = group["lr"]
    if not torch.is_tensor(lr):
        return float(lr)
    if lr.device != device and lr.device.type == "cpu":
        return float(lr.item())
    if lr.device != device:
        raise RuntimeError(
            f"capturable step: the learning rate tensor is on {lr.device} but the parameters are on {device}; "
            "create it on the parameters' device (e.g. torch.tensor(lr, device='cuda'))"
        )
    return lr.reshape(()).to(torch.float64)


class _AdamBase(FlashOptimizer):
    family = "adam"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        master_weight_bits: Optional[int] = 24,
        quantize: bool = True,
        group_size: int = 32,
        backend: str = "auto",
        check_numerics: bool = False,
        rounding: str = "stochastic",
        seed: int = 0,
        capturable: bool = False,
        **kwargs,
    ):
        _torch_impl_flags(type(self).__name__, kwargs)
        self.capturable = _capturable(type(self).__name__, capturable, check_numerics)
        if amsgrad:
            raise ValueError(
                f"{type(self).__name__} does not implement amsgrad (it would need a third state); "
                "use torch.optim.AdamW(amsgrad=True)"
            )
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)
        config = _config(master_weight_bits, quantize, group_size, backend, check_numerics, rounding, seed)
        super().__init__(params, defaults, config)

    def _validate_group(self, group):
        lr = _as_float("learning rate", group["lr"])
        _check_range("learning rate", lr, 0.0, math.inf)
        b1, b2 = (_as_float("beta", b) for b in group["betas"])
        _check_range("beta1", b1, 0.0, 1.0)
        _check_range("beta2", b2, 0.0, 1.0)
        _check_range("epsilon", _as_float("epsilon", group["eps"]), 0.0, math.inf)
        _check_range("weight_decay", _as_float("weight_decay", group["weight_decay"]), 0.0, math.inf)

    def _hyper_rows(self, group, steps: np.ndarray) -> np.ndarray:
        lr = float(group["lr"])
        beta1, beta2 = (float(b) for b in group["betas"])
        rows = _rows(len(steps), self._adam_columns(group, lr))
        rows[:, 6] = lr / (1 - np.power(beta1, steps))  # step_size
        rows[:, 7] = 1.0 / np.sqrt(1 - np.power(beta2, steps))  # inv_bc2_sqrt
        if self.config.quantize:  # the outlier bound; fp32 moments stay torch's update exactly
            rows[:, 9] = 1.0 / adam_ratio_bound(beta1, beta2, steps)
        return rows

    def _hyper_rows_t(self, group, steps: torch.Tensor) -> torch.Tensor:
        # _hyper_rows with torch ops on the step tensors' device (the capturable step)
        lr = _lr_t(group, steps.device)
        beta1, beta2 = (float(b) for b in group["betas"])
        rows = _rows_t(steps, self._adam_columns(group, lr))
        rows[:, 6] = lr / (1 - torch.pow(beta1, steps))
        rows[:, 7] = 1.0 / torch.sqrt(1 - torch.pow(beta2, steps))
        if self.config.quantize:
            rows[:, 9] = 1.0 / adam_ratio_bound_t(beta1, beta2, steps)
        return rows

    def _adam_columns(self, group, lr) -> list:
        """The row's step-independent values (columns 6, 7 and 9 are filled per step);
        ``lr`` a float or a 0-d tensor."""
        beta1, beta2 = (float(b) for b in group["betas"])
        wd = float(group["weight_decay"])
        return [
            1 - lr * wd if self.decoupled else 1.0,  # decay
            0.0 if self.decoupled else wd,  # l2
            1 - beta1,  # w1 (lerp weight)
            beta2,
            1 - beta2,  # w2
            float(group["eps"]),
            0.0,
            0.0,
            -1.0 if group["maximize"] else 1.0,
            0.0,
        ]


class FlashAdamW(_AdamBase):
    """AdamW (decoupled weight decay, ``θ ← θ(1 − lr·wd)``) with FlashOptim storage.

    Same hyper-parameters and defaults as :class:`torch.optim.AdamW` (``weight_decay=0.01``).
    State per element with bf16 params: int8 ρ (1 B, 24-bit master) + int8 companded first
    moment (1 B) + uint8 sqrt-companded second moment (1 B) + 2 bf16 scales per 32 elements
    (0.125 B) = 3.125 bytes. ``master_weight_bits=32`` makes ρ int16 (4.125 B);
    ``quantize=False`` keeps fp32 moments (8 B + ρ).
    ``capturable=True``: CUDA-graph-capturable step (device step counters, lr a float or 0-d
    tensor; module doc).
    """

    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, **kwargs):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)


class FlashAdam(_AdamBase):
    """Adam (L2 penalty added to the gradient, ``g ← g + wd·θ``) with FlashOptim storage.

    Same hyper-parameters and defaults as :class:`torch.optim.Adam`; memory as :class:`FlashAdamW`.
    """

    decoupled = False


class _SGDBase(FlashOptimizer):
    family = "sgd"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        master_weight_bits: Optional[int] = 24,
        quantize: bool = True,
        group_size: int = 32,
        backend: str = "auto",
        check_numerics: bool = False,
        rounding: str = "stochastic",
        seed: int = 0,
        capturable: bool = False,
        **kwargs,
    ):
        _torch_impl_flags(type(self).__name__, kwargs)
        self.capturable = _capturable(type(self).__name__, capturable, check_numerics)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )
        super().__init__(
            params, defaults, _config(master_weight_bits, quantize, group_size, backend, check_numerics, rounding, seed)
        )

    def _validate_group(self, group):
        _check_range("learning rate", _as_float("learning rate", group["lr"]), 0.0, math.inf)
        m = _as_float("momentum", group["momentum"])
        _check_range("momentum", m, 0.0, math.inf)
        _check_range("weight_decay", _as_float("weight_decay", group["weight_decay"]), 0.0, math.inf)
        d = _as_float("dampening", group["dampening"])
        if group["nesterov"] and (m <= 0 or d != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def _n_states(self, group) -> int:
        return 1 if float(group["momentum"]) != 0.0 else 0

    def _hyper_rows(self, group, steps: np.ndarray) -> np.ndarray:
        rows = _rows(len(steps), self._sgd_columns(group, float(group["lr"])))
        rows[:, 5] = steps == 1  # first step: buf = grad (torch clones the grad)
        return rows

    def _hyper_rows_t(self, group, steps: torch.Tensor) -> torch.Tensor:
        rows = _rows_t(steps, self._sgd_columns(group, _lr_t(group, steps.device)))
        rows[:, 5] = (steps == 1).to(torch.float64)
        return rows

    def _sgd_columns(self, group, lr) -> list:
        """The row's values but the first-step flag (column 5); ``lr`` a float or a 0-d tensor."""
        wd = float(group["weight_decay"])
        return [
            1 - lr * wd if self.decoupled else 1.0,
            0.0 if self.decoupled else wd,
            float(group["momentum"]),
            1 - float(group["dampening"]),
            1.0 if group["nesterov"] else 0.0,
            0.0,
            lr,
            0.0,
            -1.0 if group["maximize"] else 1.0,
            0.0,
        ]

    def _update_scale(self, group, grad) -> float:
        # SGD moves θ by lr·|g|; use the mean |g| of the tensor as the typical update
        return float(grad.detach().float().abs().mean()) if grad.numel() else 0.0


class FlashSGD(_SGDBase):
    """SGD with momentum, dampening, Nesterov and coupled weight decay, as :class:`torch.optim.SGD`.

    State per element with bf16 params: ρ int8 (1 B) + int8 companded momentum (1 B, only when
    ``momentum > 0``) + one bf16 scale per 32 elements.
    ``capturable=True``: CUDA-graph-capturable step (device step counters, lr a float or 0-d
    tensor; module doc).
    """

    decoupled = False


class FlashSGDW(_SGDBase):
    """SGD whose weight decay is decoupled (``θ ← θ(1 − lr·wd)`` before the step), like AdamW."""

    decoupled = True


class FlashLion(FlashOptimizer):
    """Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

    ``θ ← θ(1 − lr·wd) − lr·sign(β1·m + (1−β1)·g)``, then ``m ← β2·m + (1−β2)·g``. Defaults
    ``lr=1e-4, betas=(0.9, 0.99), weight_decay=0``. State: ρ (1 B) + int8 momentum (1 B) + scales.
    ``capturable=True``: CUDA-graph-capturable step (device step counters, lr a float or 0-d
    tensor; module doc).
    """

    family = "lion"
    decoupled = True

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: Tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        master_weight_bits: Optional[int] = 24,
        quantize: bool = True,
        group_size: int = 32,
        backend: str = "auto",
        check_numerics: bool = False,
        rounding: str = "stochastic",
        seed: int = 0,
        capturable: bool = False,
        **kwargs,
    ):
        _torch_impl_flags(type(self).__name__, kwargs)
        self.capturable = _capturable(type(self).__name__, capturable, check_numerics)
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        super().__init__(
            params, defaults, _config(master_weight_bits, quantize, group_size, backend, check_numerics, rounding, seed)
        )

    def _validate_group(self, group):
        _check_range("learning rate", _as_float("learning rate", group["lr"]), 0.0, math.inf)
        b1, b2 = (_as_float("beta", b) for b in group["betas"])
        _check_range("beta1", b1, 0.0, 1.0)
        _check_range("beta2", b2, 0.0, 1.0)
        _check_range("weight_decay", _as_float("weight_decay", group["weight_decay"]), 0.0, math.inf)

    def _hyper_rows(self, group, steps: np.ndarray) -> np.ndarray:
        return self._lion_rows(group, float(group["lr"]), lambda values: _rows(len(steps), values))

    def _hyper_rows_t(self, group, steps: torch.Tensor) -> torch.Tensor:
        return self._lion_rows(group, _lr_t(group, steps.device), lambda values: _rows_t(steps, values))

    @staticmethod
    def _lion_rows(group, lr, rows):
        beta1, beta2 = (float(b) for b in group["betas"])
        return rows(
            [
                1 - lr * float(group["weight_decay"]),
                0.0,
                beta1,
                1 - beta1,
                beta2,
                1 - beta2,
                lr,
                0.0,
                -1.0 if group["maximize"] else 1.0,
                0.0,
            ],
        )


def _check_names() -> None:
    # flashoptim_dist._names describes these classes to code that must not import them (configs,
    # converters); a class that disagrees with it would be mis-described there, so refuse at import.
    for name in FLASH_OPTIMIZER_NAMES:
        cls = globals()[name]
        if cls.family != FAMILY_OF[name] or cls.decoupled != (name in DECOUPLED_DECAY):
            raise ImportError(
                f"{name} disagrees with flashoptim_dist._names (family {cls.family}, decoupled {cls.decoupled})"
            )


_check_names()
