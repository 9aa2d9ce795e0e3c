"""Canonical, compressed, reshardable checkpoints for Flash optimizers (docs/design.md §6).

::

    import flashoptim_dist.checkpoint as fckpt

    fckpt.save("ckpt/step_1000", model, optimizer, lr_scheduler=sched, extra={"data": loader_state}, step=1000)
    info = fckpt.load("ckpt/step_1000", model, optimizer, lr_scheduler=sched)   # any world size / engine
    fckpt.export_safetensors("export/", model, optimizer, dtype=torch.bfloat16)  # HF layout, θ' + ρ merged

What is on disk is a ``torch.distributed.checkpoint`` (DCP) directory in the *canonical* layout
(see :mod:`flashoptim_dist.checkpoint._format`): every tensor in the global coordinates of its
parameter, keyed by FQN — bf16 parameters, ρ as 1 byte, 8-bit state codes as 1 byte, one bf16
scale per 32-element group — plus ``flashoptim.json`` (format version, numeric config, model
fingerprint, param groups, step counters, world size and engine) and a ``COMPLETE`` manifest
with the size and CRC-32 of every file. FlashAdamW-24: 5.125 bytes per parameter for model and
optimizer (plain fp32 AdamW through DCP: 12).

* **Engines.** One device, DDP, FSDP2, FSDP1 (``use_orig_params=True``) and DeepSpeed ZeRO-1/2/3;
  each rank writes only the runs of each parameter it holds (``ShardSpec`` segments), nothing is
  gathered. Loading reads, on each rank, the runs it holds now: N ranks → M ranks and engine A →
  engine B are the same operation.
* **Never incomplete.** FSDP2 units left unsharded when ``save``/``load`` is called (the root
  after an evaluation forward without backward) are resharded first with the public
  ``FSDPModule.reshard()``; an optimizer tensor that is not a parameter of the model raises
  :class:`CheckpointError` naming it, before anything is written or loaded.
* **Canonical scales.** A quantization group cut by a shard boundary has one scale per side at
  run time; at save the sides agree on the larger one (an exchange of those scales only) and
  re-quantize their codes of that group against it, so the bytes on disk do not depend on the
  world size. The live optimizer state is not modified by a save.
* **Atomic.** Written into ``.<name>.tmp-<id>`` beside ``path``; after every rank has written and
  fsync'ed, rank 0 writes ``COMPLETE`` and renames the directory to ``path``. A crash leaves the
  previous checkpoint intact and no directory at ``path``; a directory without ``COMPLETE`` is
  refused at load.
* **Verified before use.** ``load`` checks the manifest, every file's size and CRC-32 (the ranks
  share the work), the format version, the model fingerprint (FQNs and global shapes) and the
  numeric config *before* modifying anything; errors name the file and the problem.
* **Explicit conversions.** Another ρ width, quantization setting, group size or param dtype,
  a plain ``torch.optim`` target, or a plain DCP checkpoint written with ``torch.optim`` need
  ``convert=True``; otherwise :class:`NumericConfigMismatchError`.
* **Building blocks for other writers** (the trainer's torch-baseline checkpoints use them):
  :func:`commit_directory` (the atomic rename into place) and :func:`write_json_durable`.
"""

from ._export import export_checkpoint, export_safetensors, load_weights
from ._format import (
    FORMAT_VERSION,
    CheckpointError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    ModelMismatchError,
    NumericConfigMismatchError,
    VersionMismatchError,
    write_json_durable,
)
from ._inspect import inspect_checkpoint, latest_checkpoint
from ._load import load
from ._save import commit_directory, save

__all__ = [
    "save",
    "load",
    "export_safetensors",
    "export_checkpoint",
    "load_weights",
    "inspect_checkpoint",
    "latest_checkpoint",
    "FORMAT_VERSION",
    "CheckpointError",
    "CorruptCheckpointError",
    "IncompleteCheckpointError",
    "ModelMismatchError",
    "NumericConfigMismatchError",
    "VersionMismatchError",
    "commit_directory",
    "write_json_durable",
]
