"""The main job: a trainer for Flash optimizers under single/DDP/FSDP2/FSDP1/ZeRO.

Entry points: ``flashoptim-dist train|compare`` (:mod:`.cli`), ``python -m flashoptim_dist.train``,
and from Python :func:`load_config` + :func:`main_train` (which starts and ends the process
group) or :func:`run_training` (inside an existing one), which is ``Trainer(cfg).train()``:
subclass :class:`Trainer` to change a step or the logging/evaluation/checkpoint hooks.
"""

from .config import Config, ConfigError, load_config

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "main_train",
    "run_training",
    "Trainer",
    "main_compare",
    "run_compare",
]


def __getattr__(name):  # lazy: importing the config must not import torch.distributed machinery
    if name in ("main_train", "run_training", "Trainer"):
        from . import trainer

        return getattr(trainer, name)
    if name in ("main_compare", "run_compare"):
        from . import compare

        return getattr(compare, name)
    raise AttributeError(name)
