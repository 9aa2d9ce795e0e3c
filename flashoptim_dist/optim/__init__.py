"""Flash optimizers: public classes (:mod:`.flash`), core (:mod:`.base`).

The math they run is :mod:`flashoptim_dist.reference`."""

from .base import STATE_FORMAT_VERSION, FlashOptimizer
from .flash import FlashAdam, FlashAdamW, FlashLion, FlashSGD, FlashSGDW

__all__ = ["FlashOptimizer", "FlashAdamW", "FlashAdam", "FlashSGD", "FlashSGDW", "FlashLion", "STATE_FORMAT_VERSION"]
