"""flashoptim_dist: FlashOptim's ~7-byte AdamW, sharded across FSDP2, FSDP1, DDP and DeepSpeed.

Public API::

    from flashoptim_dist import FlashAdamW, FlashAdam, FlashSGD, FlashSGDW, FlashLion
    from flashoptim_dist import FlashConfig, enable_gradient_release, cast_model, numerics
"""

from . import numerics
from ._version import __version__  # noqa: F401  (re-exported)
from .config import FlashConfig
from .optim import FlashAdam, FlashAdamW, FlashLion, FlashOptimizer, FlashSGD, FlashSGDW
from .release import GradientReleaseHandle, enable_gradient_release
from .utils import cast_model
from . import distributed  # noqa: F401  (imported to register the FSDP2/FSDP1 shard adapters and release checks)


__all__ = [
    "FlashAdamW",
    "FlashAdam",
    "FlashSGD",
    "FlashSGDW",
    "FlashLion",
    "FlashOptimizer",
    "FlashConfig",
    "enable_gradient_release",
    "GradientReleaseHandle",
    "cast_model",
    "numerics",
]
