"""Flash optimizers in torchtitan 0.3.0, on 2 gloo CPU ranks, from the command line in
docs/integrations.md.

torchtitan's ``Trainer`` does not run on a CPU machine: ``torchtitan/tools/utils.py`` picks the
device type with ``_get_available_device_type() or "cuda"`` and the trainer calls
``torch.cuda.set_device``. So these tests run every torchtitan component the trainer builds,
each through torchtitan's own code, in the order ``Trainer.__init__`` builds them, and the
training step as ``Trainer.train_step`` does it:

* the config: ``ConfigManager().parse_args`` of the documented command line (``--module llama3
  --config llama3_debugmodel --training.dtype bfloat16 --override.imports
  flashoptim_dist.integrations.torchtitan.flash_optimizers ...``) and ``apply_overrides`` — the
  optimizer config becomes ``FlashOptimizersContainer.Config`` with a ``FlashAdamW`` group;
* the model: the llama3 debug model (6.2M parameters) built on meta under the training dtype,
  sharded by torchtitan's ``apply_fsdp_to_decoder`` (FSDP2, bf16 param / fp32 reduce policy),
  ``init_weights``;
* ``config.optimizer.build``, ``config.lr_scheduler.build`` (warm-up + linear decay),
  ``config.checkpoint.build`` (torchtitan's DCP ``CheckpointManager``, with a Stateful data
  position standing in for the dataloader);
* a step: ``zero_grad(set_to_none=False)`` (grads kept as buffers, the CUDA-graph default),
  sum-reduced loss over the global token count, torchtitan's ``clip_grad_norm_``,
  ``optimizers.step()``, ``lr_schedulers.step()``, ``checkpointer.save(step)``.

Proved: bf16 params and grads and int8/uint8/bf16 state (~3.1 B/element); the checkpoint of
step 3 resumed on 2 ranks continues bit-exactly (steps 4-6), and on 1 rank (DCP reshards the
flat FQN-keyed Flash state) within float tolerance; FlashAdam/FlashLion/FlashSGD selectable by
override kwargs; the ``config_registry`` example of the doc selects FlashAdamW; fp32 parameters
(no ``--training.dtype bfloat16``) refused with the fix.

CPU adaptations, both through torchtitan's own mechanisms: FlexAttention has no CPU backward,
so a test override (tests/integration_tt_cpu.py) swaps in causal SDPA; gloo has no PREMUL_SUM,
which FSDP2 uses for torchtitan's gradient divide factor 1.0, so the FSDP units are set to
``set_force_sum_reduction_for_comms(True)`` (the same sum, issued as SUM).
bench/integrations_gpu.sh runs the real trainer with the same command on a GPU.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from dist_utils import run_distributed
from optional_deps import require_module

if sys.version_info < (3, 11):  # torchtitan 0.3.0 requires Python >= 3.11 (setup.cfg installs it there only)
    pytest.skip("torchtitan 0.3.0 needs Python >= 3.11", allow_module_level=True)
require_module("torchtitan", "torchtitan==0.3.0", module_level=True)

pytestmark = pytest.mark.slow

STEPS, SAVE_AT, SEQ, ROWS = 6, 3, 32, 2


def _config(tmp, extra=()):
    from doc_examples import command_args
    from torchtitan.config import ConfigManager
    from torchtitan.config.override import apply_overrides

    args = command_args("torchtitan-command", "torchtitan.train")
    args += ["--training.steps", str(STEPS), "--checkpoint.interval", str(SAVE_AT), "--dump_folder", tmp,
             "--training.seq_len", str(SEQ), *extra]
    cfg = ConfigManager().parse_args(args)
    cfg.override.imports.append("integration_tt_cpu.causal_sdpa")
    apply_overrides(cfg.override, cfg)
    return cfg


class _Counter:
    """A Stateful int that torchtitan's checkpointer saves and restores: the data position
    (standing in for torchtitan's dataloader) and the train state's step."""

    def __init__(self, key):
        self.key, self.value = key, 0

    def state_dict(self):
        return {self.key: self.value}

    def load_state_dict(self, sd):
        self.value = sd[self.key]


def _build(cfg, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torchtitan.config import TORCH_DTYPE_MAP
    from torchtitan.distributed.fsdp import apply_fsdp_to_decoder
    from torchtitan.tools import utils as tt_utils

    with torch.device("meta"), tt_utils.set_default_dtype(TORCH_DTYPE_MAP[cfg.training.dtype]):
        model = cfg.model_spec.model.build()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    apply_fsdp_to_decoder(model, mesh, param_dtype=TORCH_DTYPE_MAP[cfg.training.mixed_precision_param],
                          reduce_dtype=TORCH_DTYPE_MAP[cfg.training.mixed_precision_reduce], pp_enabled=False)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_force_sum_reduction_for_comms(True)  # gloo: no PREMUL_SUM (see module doc)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()
    opts = cfg.optimizer.build(model_parts=[model])
    lrs = cfg.lr_scheduler.build(optimizers=opts, training_steps=cfg.training.steps)
    data, state = _Counter("pos"), _Counter("step")
    ckpt = cfg.checkpoint.build(dataloader=data, model_parts=[model], optimizers=opts, lr_schedulers=lrs,
                                states={"train_state": state}, sd_adapter=None, base_folder=cfg.dump_folder)
    return model, opts, lrs, ckpt, data, state


def _tokens(step, rank, vocab):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, vocab, (ROWS, SEQ + 1), generator=g)


def _train(cfg, parts, rank, world, until, emulate=1, mem=None):
    """Trainer.train_step, one batch per step; ``emulate`` > 1 runs the batches of that many
    ranks on this one (the same global batch and token count)."""
    import torch.nn.functional as F
    from integration_helpers import memory_per_param
    from torchtitan.distributed import utils as dist_utils

    model, opts, lrs, ckpt, data, state = parts
    vocab = cfg.model_spec.model.vocab_size
    losses = []
    while state.value < until:
        state.value += 1
        opts.zero_grad(set_to_none=False)
        ranks = range(emulate) if world == 1 else [rank]
        toks = torch.cat([_tokens(data.value, r, vocab) for r in ranks])
        data.value += 1
        logits = model(toks[:, :-1], torch.arange(SEQ).expand(len(toks), SEQ))
        global_tokens = ROWS * SEQ * max(world, emulate)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), toks[:, 1:].flatten(), reduction="sum") / global_tokens
        loss.backward()
        dist_utils.clip_grad_norm_([p for m in opts.model_parts for p in m.parameters()], cfg.training.max_norm,
                                   foreach=True)
        if mem is not None and not mem and any(o.state for o in opts):
            mem.update(memory_per_param(model.parameters(), list(opts)))
        ckpt.maybe_wait_for_staging()
        opts.step()
        lrs.step()
        t = loss.detach()
        if world > 1:
            torch.distributed.all_reduce(t)
        losses.append(float(t))
        ckpt.save(curr_step=state.value, last_step=state.value == cfg.training.steps)
    return losses


def _torchtitan_2ranks(rank, world, tmp):
    cfg = _config(tmp)
    out = {"optimizer_config": type(cfg.optimizer).__qualname__,
           "groups": [(g.pattern, g.optimizer_name, sorted(g.optimizer_kwargs)) for g in cfg.optimizer.param_groups]}
    parts = _build(cfg, world)
    opts = parts[1]
    out["optimizers"] = [type(o).__name__ for o in opts]
    out["container"] = type(opts).__name__
    mem = {}
    out["ref"] = _train(cfg, parts, rank, world, STEPS, mem=mem)
    out["mem"] = mem
    out["saved"] = sorted(os.listdir(os.path.join(tmp, cfg.checkpoint.folder)))
    parts = _build(_config(tmp), world)
    assert parts[3].load(step=SAVE_AT)
    out["resumed_step"] = parts[5].value
    out["resumed"] = _train(cfg, parts, rank, world, STEPS)
    return out


def _torchtitan_1rank(rank, world, tmp):
    cfg = _config(tmp)
    parts = _build(cfg, world)
    assert parts[3].load(step=SAVE_AT)
    out = {"resumed": _train(cfg, parts, rank, world, STEPS, emulate=2)}

    # the other Flash optimizers, by override kwargs, on a small model
    from flashoptim_dist.integrations.torchtitan import flash_optimizers  # noqa: F401  (registers)

    small = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32)).to(torch.bfloat16)
    out["by_name"] = {}
    for name, kw in (("FlashAdam", {}), ("FlashLion", {"lr": 1e-4}), ("FlashSGD", {"momentum": 0.9}),
                     ("FlashSGDW", {"momentum": 0.9})):
        c = _config(tmp, ["--override.imports",
                          'flashoptim_dist.integrations.torchtitan.flash_optimizers='
                          + repr_json({"optimizer": name, **kw})])
        opts = c.optimizer.build(model_parts=[small])
        small(torch.randn(4, 64, dtype=torch.bfloat16)).float().pow(2).mean().backward()
        opts.step()
        opts.zero_grad()
        out["by_name"][name] = ([type(o).__name__ for o in opts], sorted(c.optimizer.param_groups[0].optimizer_kwargs),
                                sorted(opts.state_dict())[-1])
    # the config_registry example of docs/integrations.md, selected with --module/--config
    import sys

    from doc_examples import example
    from torchtitan.config import ConfigManager

    with open(os.path.join(tmp, "my_configs.py"), "w") as f:
        f.write(example("torchtitan-config"))
    sys.path.insert(0, tmp)
    c = ConfigManager().parse_args(["--module", "my_configs", "--config", "llama3_debug_flash"])
    out["registry_example"] = (type(c.optimizer).__qualname__, c.optimizer.param_groups[0].optimizer_name,
                               c.training.dtype, type(c.optimizer.build(model_parts=[small])).__name__)
    # fp32 parameters (no --training.dtype bfloat16): refused with the fix
    fp32 = torch.nn.Sequential(torch.nn.Linear(64, 64))
    try:
        _config(tmp).optimizer.build(model_parts=[fp32])
        out["fp32_error"] = None
    except ValueError as e:
        out["fp32_error"] = str(e)
    return out


def repr_json(d):
    import json

    return json.dumps(d)


def test_torchtitan_flash_optimizers(tmp_path):
    from integration_helpers import assert_flash_memory

    r0, r1 = run_distributed(_torchtitan_2ranks, 2, str(tmp_path), timeout=600)
    assert r0["optimizer_config"] == "FlashOptimizersContainer.Config", r0
    assert r0["groups"] == [(".*", "FlashAdamW", ["betas", "eps", "lr", "weight_decay"])], r0
    assert r0["container"] == "FlashOptimizersContainer" and r0["optimizers"] == ["FlashAdamW"], r0
    assert r0["saved"] == [f"step-{SAVE_AT}", f"step-{STEPS}"], r0
    for r in (r0, r1):
        assert_flash_memory(r["mem"], state_bytes=(3.125, 3.13))  # measured 3.125
        assert r["resumed_step"] == SAVE_AT
        assert r["resumed"] == r["ref"][SAVE_AT:], (r["resumed"], r["ref"])
    assert r0["ref"] == r1["ref"]  # all-reduced: one global loss

    (one,) = run_distributed(_torchtitan_1rank, 1, str(tmp_path), timeout=600)
    # measured <= 5.2e-5
    assert one["resumed"] == pytest.approx(r0["ref"][SAVE_AT:], rel=5e-4), (one["resumed"], r0["ref"])
    by_name = one["by_name"]
    assert by_name["FlashAdam"][0] == ["FlashAdam"]
    assert by_name["FlashLion"][:2] == (["FlashLion"], ["betas", "lr", "weight_decay"])  # eps dropped
    assert by_name["FlashSGD"][:2] == (["FlashSGD"], ["lr", "momentum", "weight_decay"])
    assert by_name["FlashSGDW"][0] == ["FlashSGDW"]
    assert all(v[2].startswith("state.") for v in by_name.values())  # the flat FQN-keyed state dict
    assert one["registry_example"] == ("FlashOptimizersContainer.Config", "FlashAdamW", "bfloat16",
                                       "FlashOptimizersContainer"), one
    err = one["fp32_error"]
    assert err is not None and "--training.dtype bfloat16" in err and "allow_fp32_params" in err, err
