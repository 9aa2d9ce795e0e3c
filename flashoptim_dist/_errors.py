"""Checkpoint errors, in a leaf so that both readers of checkpoints raise the same classes.

:mod:`flashoptim_dist.checkpoint` (canonical checkpoints) and :mod:`flashoptim_dist.deepspeed`
(which reads DeepSpeed's ZeRO files, below the checkpoint package) both raise these; the public
names are ``flashoptim_dist.checkpoint.CheckpointError`` and its subclasses.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "IncompleteCheckpointError",
    "CorruptCheckpointError",
    "VersionMismatchError",
    "ModelMismatchError",
    "NumericConfigMismatchError",
]


class CheckpointError(RuntimeError):
    """Base class of every checkpoint problem found by flashoptim_dist.checkpoint."""


class IncompleteCheckpointError(CheckpointError):
    """The directory is not a complete checkpoint (missing, interrupted save, or not ours)."""


class CorruptCheckpointError(CheckpointError):
    """A file of the checkpoint is truncated, altered or missing."""


class VersionMismatchError(CheckpointError):
    """The checkpoint was written in a format this version cannot read."""


class ModelMismatchError(CheckpointError):
    """The checkpoint belongs to a model with other parameter names or shapes."""


class NumericConfigMismatchError(CheckpointError):
    """Loading needs a numeric conversion that was not asked for (``convert=True``)."""
