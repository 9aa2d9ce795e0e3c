"""Offline conversion of a DeepSpeed ZeRO checkpoint written with a Flash optimizer
(``engine.save_checkpoint``) into a flashoptim_dist checkpoint (canonical layout, any world size,
any engine).

The DeepSpeed files are read by :func:`flashoptim_dist.deepspeed.read_zero_checkpoint` (its
module says what DeepSpeed stores and how each parameter's fragments are found). The segments
rebuilt from them are the ones the optimizer used (so scales line up), and every rank's data goes
through the same code as :func:`flashoptim_dist.checkpoint.save` (cut groups agreed, canonical
keys). Memory: the whole checkpoint is held in host memory (≈5 bytes/param).
"""

from __future__ import annotations

from typing import Dict, List

import torch

from .. import layout as lay
from .._names import DECOUPLED_DECAY, flash_optimizer_name
from ..config import FlashConfig
from ..deepspeed import read_zero_checkpoint
from ..reference import FAMILIES
from . import _format as F
from ._views import ParamInfo, SegInfo, TensorInfo, View


class _OfflineClient:
    """Stands in for the Flash optimizer of one saved rank (state, groups, config)."""

    def __init__(self, cls_name: str, family: str, config: FlashConfig, groups: List[dict]):
        self.family = family
        self.config = config
        self.param_groups = groups
        # the DeepSpeed config may spell the name in any case
        self.decoupled = (flash_optimizer_name(cls_name) or cls_name) in DECOUPLED_DECAY
        self.state: Dict[torch.Tensor, dict] = {}
        self.cls_name = cls_name

    def n_state_slots(self, group) -> int:
        if self.family == "sgd":
            return 1 if float(group.get("momentum", 0.0)) != 0.0 else 0
        return len(FAMILIES[self.family])


def convert_deepspeed_checkpoint(path, out, *, tag=None, overwrite: bool = False) -> dict:
    """Convert DeepSpeed checkpoint ``path`` (written with a Flash optimizer) into ``out``."""
    from . import _save

    ck = read_zero_checkpoint(path, tag)
    stage, world, fmeta, cfg = ck["stage"], ck["world"], ck["fmeta"], ck["config"]
    groups, all_shapes, frozen, model_sd = ck["groups"], ck["shapes"], ck["frozen"], ck["model_sd"]
    if stage == 3 and len(groups) != 1:
        raise F.CheckpointError("converting ZeRO-3 checkpoints with several param groups is not supported")
    views: List[View] = []
    for r, (osd, tensors) in enumerate(ck["ranks"]):
        client = _OfflineClient(ck["cls_name"], fmeta["family"], cfg, [dict(g) for g in groups])
        params = {n: ParamInfo(n, None, s, torch.bfloat16, []) for n, s in all_shapes.items()}
        tis = []
        for local, segs, gi, st in tensors:
            layout = lay.state_layout_for(local, segs, cfg)
            seginfos = [SegInfo(s.key, s, o) for s, o in zip(layout.segments, layout.scale_offsets)
                        if s.key is not None and s.length > 0]
            for k, v in st.items():
                if (
                    torch.is_tensor(v)
                    and v.dim() > 0
                    and k != "rho"
                    and not k.endswith("_scales")
                    and v.numel() != local.numel()
                ):
                    raise F.CheckpointError(
                        f"{ck['optim_files'][r]}: state {k!r} has {v.numel()} elements, the partition {local.numel()}"
                    )
            client.state[local] = st
            tis.append(TensorInfo(local, local, layout, gi, seginfos))
        if stage in (1, 2):
            module = model_sd.get("module") or {}
            for n, s in frozen.items():
                runs = [(0, module[n].reshape(-1))] if r == 0 else []
                params[n] = ParamInfo(n, None, tuple(s), module[n].dtype, runs)
        views.append(View(f"zero{stage}", None, client, True, params, {}, tis, list(FAMILIES[fmeta["family"]])))
    buffers = {}
    module = model_sd.get("module") or {}
    for b in model_sd.get("buffer_names") or []:
        if b in module and torch.is_tensor(module[b]):
            buffers[b] = module[b]
    views[0].buffers.update(buffers)
    return _save.save_offline(
        out,
        views,
        overwrite=overwrite,
        stage=stage,
        world=world,
        step=model_sd.get("global_steps"),
        lr_scheduler_state=model_sd.get("lr_scheduler"),
    )
