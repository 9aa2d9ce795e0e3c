"""FlashAdamW under Accelerate's FSDP2 plugin and the Hugging Face Trainer (2 gloo CPU ranks).

What each case proves (all against accelerate 1.15 / transformers 5.23, the real code paths;
the one CPU adaptation is tests/integration_helpers.accelerate_fsdp_on_cpu):

* ``accelerator.prepare(model, opt)`` with the FSDP2 plugin: the optimizer, built on the
  unsharded bf16 parameters, is remapped by ``data_ptr`` to the DTensor shards and holds no
  state until the first step (nothing created in ``__init__`` goes stale); after the step every
  state entry belongs to a shard; bf16 params and grads, ~3.1 bytes of int8/uint8/bf16 state per
  element, no fp32 tensor; ``save_state``/``load_state`` (sharded DCP) continue bit-exactly on 2
  ranks, and on 1 rank (resharded) within rel 5e-4 of the uninterrupted run (measured 1.8e-5);
* the Trainer with ``optimizer_cls_and_kwargs=(FlashAdamW, ...)`` and ``fsdp_config
  {"fsdp_version": 2}``: same memory, and ``resume_from_checkpoint`` (Accelerate's full
  optimizer state dict, ``optimizer.bin``) continues with identical losses;
* ``mixed_precision="bf16"`` (Trainer ``bf16=True``): Accelerate upcasts the bf16 model to fp32
  inside ``prepare``; the first step refuses with the fix. Without the check in
  ``FlashOptimizer._check_upcast`` this case trains silently on fp32 parameters and fails.
"""

from __future__ import annotations

import os

import pytest
import torch

from dist_utils import run_distributed
from optional_deps import require_module

require_module("accelerate", "accelerate==1.15.0", module_level=True)
require_module("transformers", "transformers==5.23.0", module_level=True)

pytestmark = pytest.mark.slow

STEPS, SAVE_AT, LR = 6, 3, 1e-2


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    # every row length (64, 128) and every 1-D norm's half (32) is a multiple of the group size:
    # 2-rank row shards cut no quantization group, so a resumed step is bit-identical (a cut
    # group is agreed to one scale on save, docs/checkpoints.md, and then differs by one
    # re-quantization)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


def _plugin():
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")


def _prepared(mixed_precision="no"):
    from accelerate import Accelerator

    import flashoptim_dist as fo

    acc = Accelerator(cpu=True, mixed_precision=mixed_precision, fsdp_plugin=_plugin())
    model = _model()
    opt = fo.FlashAdamW(model.parameters(), lr=LR, weight_decay=0.01)
    model, opt = acc.prepare(model, opt)
    return acc, model, opt


def _steps(acc, model, opt, steps, rank, world, mem=None):
    from integration_helpers import batch, memory_per_param

    losses = []
    for s in steps:
        # on one rank, the batches of both ranks of the 2-rank run: the same mean loss
        x = torch.cat([batch(s, r) for r in range(2)]) if world == 1 else batch(s, rank)
        loss = model(input_ids=x, labels=x).loss
        acc.backward(loss)
        if mem is not None and not mem and opt.optimizer.state:  # grads and state both alive
            mem.update(memory_per_param(model.parameters(), [opt.optimizer]))
        opt.step()
        opt.zero_grad()
        t = loss.detach().float()
        if world > 1:
            torch.distributed.all_reduce(t)
            t /= world
        losses.append(float(t))
    return losses


def _accelerate_2ranks(rank, world, tmp):
    from integration_helpers import accelerate_fsdp_on_cpu, memory_per_param
    from torch.distributed.tensor import DTensor

    accelerate_fsdp_on_cpu()
    out = {}
    # ---- plain accelerator.prepare with the FSDP2 plugin
    acc, model, opt = _prepared()
    inner = opt.optimizer
    params = [p for g in inner.param_groups for p in g["params"]]
    out["remapped"] = all(isinstance(p, DTensor) for p in params) and {p.dtype for p in params} == {torch.bfloat16}
    out["model_params_are_opt_params"] = {id(p) for p in model.parameters()} == {id(p) for p in params}
    out["state_before_step"] = len(inner.state)
    mem = {}
    first = _steps(acc, model, opt, range(SAVE_AT), rank, world, mem)
    out["mem"] = mem
    out["state_keys_are_shards"] = {id(p) for p in inner.state} == {id(p) for p in params}
    acc.save_state(os.path.join(tmp, "acc"))
    out["ref"] = first + _steps(acc, model, opt, range(SAVE_AT, STEPS), rank, world)
    acc2, model2, opt2 = _prepared()
    acc2.load_state(os.path.join(tmp, "acc"))
    out["resumed"] = _steps(acc2, model2, opt2, range(SAVE_AT, STEPS), rank, world)

    # ---- the Trainer: optimizer_cls_and_kwargs, FULL_STATE_DICT checkpoints, resume
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import flashoptim_dist as fo

    class Tokens(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.rows = torch.randint(0, 96, (48, 16), generator=g)

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return {"input_ids": self.rows[i], "labels": self.rows[i].clone()}

    class Memory(TrainerCallback):
        def __init__(self):
            self.mem = {}

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
            opt = getattr(optimizer, "optimizer", optimizer)
            if not self.mem and opt.state:
                self.mem.update(memory_per_param(model.parameters(), [opt]))
                self.mem["optimizer"] = type(opt).__name__

    def trainer_run(resume=None, bf16=False):
        args = TrainingArguments(
            output_dir=os.path.join(tmp, "hf"), per_device_train_batch_size=2, max_steps=STEPS,
            save_strategy="steps", save_steps=SAVE_AT, logging_steps=1, use_cpu=True, bf16=bf16,
            fsdp="full_shard", fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
            report_to=[], disable_tqdm=True, dataloader_num_workers=0, seed=0)
        cb = Memory()
        tr = Trainer(model=_model(), args=args, train_dataset=Tokens(), callbacks=[cb],
                     optimizer_cls_and_kwargs=(fo.FlashAdamW, {"lr": LR}))
        tr.train(resume_from_checkpoint=resume)
        return [h["loss"] for h in tr.state.log_history if "loss" in h], cb.mem

    out["hf_ref"], out["hf_mem"] = trainer_run()
    out["hf_files"] = sorted(os.listdir(os.path.join(tmp, "hf", f"checkpoint-{SAVE_AT}")))
    out["hf_resumed"], _ = trainer_run(resume=os.path.join(tmp, "hf", f"checkpoint-{SAVE_AT}"))

    # ---- mixed_precision != "no": Accelerate upcasts the bf16 model; the first step refuses
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    try:
        trainer_run(bf16=True)
        out["upcast_error"] = None
    except RuntimeError as e:
        out["upcast_error"] = str(e)
    return out


def _accelerate_1rank(rank, world, tmp):
    from integration_helpers import accelerate_fsdp_on_cpu

    accelerate_fsdp_on_cpu()
    acc, model, opt = _prepared()
    acc.load_state(os.path.join(tmp, "acc"))
    return _steps(acc, model, opt, range(SAVE_AT, STEPS), rank, world)


def test_accelerate_fsdp2_and_hf_trainer(tmp_path):
    r0, r1 = run_distributed(_accelerate_2ranks, 2, str(tmp_path), timeout=600)
    for r in (r0, r1):
        assert r["remapped"] and r["model_params_are_opt_params"], r
        assert r["state_before_step"] == 0 and r["state_keys_are_shards"], r
        assert_mem(r["mem"])
        assert r["resumed"] == r["ref"][SAVE_AT:], (r["resumed"], r["ref"])
    # the Trainer
    for r in (r0, r1):
        assert r["hf_mem"]["optimizer"] == "FlashAdamW"
        assert_mem(r["hf_mem"])
        assert len(r["hf_ref"]) == STEPS
        assert r["hf_resumed"][-(STEPS - SAVE_AT):] == r["hf_ref"][SAVE_AT:], (r["hf_resumed"], r["hf_ref"])
        assert "optimizer.bin" in r["hf_files"]
    err = r0["upcast_error"]
    assert err is not None, "a bf16 model under mixed_precision='bf16' trained on fp32 parameters silently"
    assert "float32 at the first step" in err and 'mixed_precision="no"' in err and "bf16=False" in err, err

    # the 2-rank checkpoint on 1 rank (DCP reshards model and Flash state)
    (one,) = run_distributed(_accelerate_1rank, 1, str(tmp_path), timeout=300)
    ref = r0["ref"][SAVE_AT:]
    assert one == pytest.approx(ref, rel=5e-4), (one, ref)  # measured: <= 1.8e-5


def assert_mem(mem):
    from integration_helpers import assert_flash_memory

    assert_flash_memory(mem)
    assert mem["total"] <= 7.13, mem  # 2 + 2 + 3.125
