"""Typed numeric configuration shared by every Flash optimizer (validated once, at construction)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

__all__ = ["FlashConfig"]

_BACKENDS = ("auto", "triton", "reference")
_ROUNDING = ("stochastic", "nearest")  # = numerics.ROUNDING_MODES (config stays import-free)


@dataclass(frozen=True)
class FlashConfig:
    """How a Flash optimizer stores its state. Decides the canonical layout together with the
    parameters' global shapes (see :mod:`flashoptim_dist.layout`); it is written into checkpoints.
    """

    group_size: int = 32
    """Elements per quantization group (one bf16 scale each). Groups are contiguous runs of the
    flattened *global* parameter. 32 costs 2/32 = 0.0625 bytes per element per state in scales."""

    quantize: bool = True
    """8-bit companded moments (1 byte + scales per element per state) instead of fp32 (4 bytes)."""

    master_weight_bits: Optional[int] = 24
    """Error-correction width for bf16/fp16 params: 24 → int8 ρ (1 byte/element, master error
    ≤ ULP/508), 32 → int16 ρ (2 bytes, ≈ fp32 master), None → no ρ (plain narrow updates).
    fp32 params never get ρ."""

    backend: str = "auto"
    """"auto": fused Triton kernel on CUDA tensors, reference math on CPU; "triton": always the
    kernel (on CPU only under TRITON_INTERPRET=1, for tests); "reference": always PyTorch."""

    check_numerics: bool = False
    """On the first step of each tensor, raise if the learning rate is below the resolution of
    the master weights at the tensor's largest |θ| (updates would be lost entirely; with
    stochastic rounding the resolution is 2^16 times finer, that of the dither)."""

    rounding: str = "stochastic"
    """How ρ and the 8-bit moment codes are re-rounded every step. "stochastic" (default):
    unbiased in expectation (ρ and m in the code domain, v in v itself), with dithers that are a
    pure function of (seed, step, parameter size, canonical element index), so sharding does not
    change a bit. "nearest": round half to even, bit-compatible with the FlashOptim paper and
    flashoptim_dist < 0.2; it stalls where an update is below half a code per step — second
    moments decaying at β2 ≥ 0.99, the momentum of elements whose gradient stopped, and
    lr·update below ρ's resolution (lr ≲ 2^-9·|θ|·2^-8 with 24-bit masters: fine-tuning
    rates on weights near 1). docs/QUALITY.md has the measurements."""

    seed: int = 0
    """Seed of the stochastic-rounding dither (any integer; only its low 32 bits are used). Two
    runs with the same seed and gradients are bit-identical, on any number of ranks."""

    def __post_init__(self):
        if not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size must be a positive power of two (default 32), got {self.group_size!r}")
        if self.group_size > 1024:
            raise ValueError(f"group_size must be at most 1024, got {self.group_size}")
        if self.master_weight_bits not in (24, 32, None):
            raise ValueError(
                f"master_weight_bits must be 24 (int8 correction), 32 (int16 correction) or None "
                f"(no correction), got {self.master_weight_bits!r}"
            )
        if not isinstance(self.quantize, bool):
            raise TypeError(f"quantize must be True or False, got {self.quantize!r}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")
        if self.rounding not in _ROUNDING:
            raise ValueError(f"rounding must be one of {_ROUNDING} (default 'stochastic'), got {self.rounding!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an integer, got {self.seed!r}")

    @property
    def stochastic(self) -> bool:
        """Whether codes and ρ are rounded with the dither (``rounding == "stochastic"``)."""
        return self.rounding == "stochastic"

    def to_dict(self) -> dict:
        return asdict(self)
