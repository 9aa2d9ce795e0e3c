"""Flash optimizers in Lightning (written against lightning 2.6).

``ModelParallelStrategy`` (FSDP2, optional TP) needs nothing from here: the model is sharded in
``configure_model`` (``fully_shard`` on ``self.device_mesh["data_parallel"]``), the optimizer is
made in ``configure_optimizers`` from the DTensor parameters, and both checkpoint forms go
through torch's ``get_optimizer_state_dict`` / ``set_optimizer_state_dict``
(``save_distributed_checkpoint=True``: DCP, loads on another world size; ``False``: one file with
the full state, rekeyed by FSDP1's ``rekey_optim_state_dict``), which a Flash optimizer's
DTensor state dict supports. Use ``precision="bf16-true"`` so the parameters are bf16; with
``"bf16-mixed"`` they stay fp32 and the optimizer keeps no ρ (≈ 10 bytes/param instead of 7).

``FSDPStrategy`` wraps the model in FSDP1 (``use_orig_params=True`` by default), whose
parameters are 1-D slices of a flat parameter: a Flash optimizer needs each slice's offset in its
parameter, attached by :func:`flashoptim_dist.distributed.prepare_fsdp1` after wrapping and
before the optimizer is built. Lightning builds the optimizer right after wrapping
(``FSDPStrategy.setup``), so :class:`FlashFSDPStrategy` — ``FSDPStrategy`` plus that one call —
is the strategy to use; everything else (``state_dict_type="sharded"``/``"full"``, auto-wrap
policies, activation checkpointing) is Lightning's.
"""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy

from ..distributed import prepare_fsdp1

__all__ = ["FlashFSDPStrategy"]


class FlashFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` for Flash optimizers: after Lightning wraps the model in
    FSDP1 and before ``configure_optimizers`` runs, every original parameter gets its shard
    layout (:func:`~flashoptim_dist.distributed.prepare_fsdp1`). Same arguments as
    ``FSDPStrategy``; other optimizers are unaffected by the layout."""

    strategy_name = "flash_fsdp"

    def setup_optimizers(self, trainer) -> None:
        if self.model is not None:
            prepare_fsdp1(self.model)
        return super().setup_optimizers(trainer)
