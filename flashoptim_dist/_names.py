"""Optimizer names and families: the one table that every layer reads.

A leaf (no imports): the DeepSpeed config, the trainer's config, the checkpoint converter and the
integrations need the names without importing the optimizer classes, and
:mod:`flashoptim_dist.optim.flash` checks at import that its classes agree with this table.

* ``FLASH_OPTIMIZER_NAMES`` — the Flash optimizers, in the order the docs and choices list them;
* ``TORCH_BASELINE_NAMES`` — their fp32 ``torch.optim``-style baselines, position by position
  (``SGDW`` and ``Lion`` are the trainer's own baselines, :mod:`flashoptim_dist.train.optimizers`);
* ``BASELINE_OF`` — Flash name → its baseline (``FlashAdamW`` → ``AdamW``);
* ``FAMILY_OF`` — any of those names → its update family (``"adam"``, ``"sgd"``, ``"lion"``: the
  kernel and state layout, :data:`flashoptim_dist.reference.FAMILIES`);
* ``DECOUPLED_DECAY`` — the Flash optimizers whose weight decay is decoupled (θ ← θ(1 − lr·wd));
  the others add it to the gradient (L2), like ``torch.optim.Adam``/``SGD``;
* ``DEFAULT_OF_FAMILY`` — the Flash optimizer assumed for a family when only the family is known
  (a DeepSpeed checkpoint whose config does not name its optimizer).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

__all__ = [
    "FLASH_OPTIMIZER_NAMES",
    "TORCH_BASELINE_NAMES",
    "OPTIMIZER_NAMES",
    "BASELINE_OF",
    "FAMILY_OF",
    "DECOUPLED_DECAY",
    "DEFAULT_OF_FAMILY",
    "flash_optimizer_name",
]

FLASH_OPTIMIZER_NAMES: Tuple[str, ...] = ("FlashAdamW", "FlashAdam", "FlashSGD", "FlashSGDW", "FlashLion")
TORCH_BASELINE_NAMES: Tuple[str, ...] = ("AdamW", "Adam", "SGD", "SGDW", "Lion")
#: Every optimizer name the trainer accepts: the Flash optimizers, then their baselines.
OPTIMIZER_NAMES: Tuple[str, ...] = FLASH_OPTIMIZER_NAMES + TORCH_BASELINE_NAMES
BASELINE_OF: Dict[str, str] = dict(zip(FLASH_OPTIMIZER_NAMES, TORCH_BASELINE_NAMES))

_FAMILIES = ("adam", "adam", "sgd", "sgd", "lion")
FAMILY_OF: Dict[str, str] = {
    **dict(zip(FLASH_OPTIMIZER_NAMES, _FAMILIES)),
    **dict(zip(TORCH_BASELINE_NAMES, _FAMILIES)),
}
DECOUPLED_DECAY = frozenset({"FlashAdamW", "FlashSGDW", "FlashLion"})
DEFAULT_OF_FAMILY: Dict[str, str] = {"adam": "FlashAdamW", "sgd": "FlashSGD", "lion": "FlashLion"}


def flash_optimizer_name(name) -> Optional[str]:
    """The Flash optimizer's canonical name for any spelling of it (case-insensitive), else ``None``."""
    if not isinstance(name, str):
        return None
    for canon in FLASH_OPTIMIZER_NAMES:
        if name.lower() == canon.lower():
            return canon
    return None
