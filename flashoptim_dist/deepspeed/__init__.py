"""DeepSpeed ZeRO-1/2/3 integration for the Flash optimizers.

::

    import flashoptim_dist.deepspeed as fds
    engine, optimizer, _, _ = fds.initialize(model=model, config="ds_config.json")
    # ds_config.json: {"optimizer": {"type": "FlashAdamW", "params": {"lr": 1e-3}},
    #                  "bf16": {"enabled": true}, "zero_optimization": {"stage": 3}, ...}

    fds.register()   # opt-in: plain deepspeed.initialize (HF Trainer, Accelerate) accepts the entry too

    sd = fds.get_fp32_state_dict_from_zero_checkpoint("checkpoints/")  # fp32 = bf16 + ρ
    fds.convert_to_plain_checkpoint("checkpoints/", "plain/")  # then DeepSpeed's ds_to_universal
    ck = fds.read_zero_checkpoint("checkpoints/")  # every rank's partitions + the segments they hold

On the CPU accelerator DeepSpeed leaves a ~66 MiB /dev/shm segment per rank behind after every
run; ``initialize`` removes it, and ``release_cpu_comm_buffer()`` does for plain
``deepspeed.initialize`` callers (collective; call on every rank after initializing).

With ``bf16`` enabled and DeepSpeed >= 0.18.3 the ZeRO partitions handed to the optimizer are
bf16 and the optimizer's ρ plus 8-bit states are the only optimizer state. Importing this module
does not import DeepSpeed; the functions do. DeepSpeed facts this relies on, with source line
references: docs/deepspeed-internals.md.
"""

from ._config import (
    FLASH_OPTIMIZER_NAMES,
    MIN_BF16_MASTER_VERSION,
    FlashDeepSpeedConfigError,
    prepare_config,
)
from ._initialize import initialize, is_registered, register, unregister
from ._shards import DeepSpeedInternalsError, attach_shard_specs, flat_partitions, zero_stage_of
from ._shm import release_cpu_comm_buffer
from .plain_checkpoint import convert_to_plain_checkpoint
from .zero_checkpoint import read_zero_checkpoint
from .zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict, get_fp32_state_dict_from_zero_checkpoint

__all__ = [
    "initialize",
    "release_cpu_comm_buffer",
    "register",
    "unregister",
    "is_registered",
    "attach_shard_specs",
    "flat_partitions",
    "zero_stage_of",
    "prepare_config",
    "get_fp32_state_dict_from_zero_checkpoint",
    "convert_zero_checkpoint_to_fp32_state_dict",
    "convert_to_plain_checkpoint",
    "read_zero_checkpoint",
    "FLASH_OPTIMIZER_NAMES",
    "MIN_BF16_MASTER_VERSION",
    "FlashDeepSpeedConfigError",
    "DeepSpeedInternalsError",
]
