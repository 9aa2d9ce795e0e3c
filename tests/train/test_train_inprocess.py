"""The trainer in this process (one rank, engine=single): loop, memory table, checkpoints, compare."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared helpers
from launch_helpers import (  # noqa: E402
    TINY, bytes_per_param, checkpoint_steps, preserved_environ, read_metrics, summary, train_losses,
)

from flashoptim_dist.train import ckpt  # noqa: E402
from flashoptim_dist.train.config import load_config  # noqa: E402
from flashoptim_dist.train.trainer import lr_at, main_train  # noqa: E402


def _cfg(out: Path, *extra: str):
    return load_config(None, [*TINY, "engine.name=single", f"train.out_dir={out}", "train.threads=1", *extra])


def _train(out: Path, *extra: str) -> dict:
    with preserved_environ():
        return main_train(_cfg(out, *extra))


def test_lr_schedule():
    cfg = load_config(None, ["optim.lr=1.0", "optim.warmup_steps=10", "train.steps=110", "optim.min_lr_ratio=0.1"])
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(cfg, 110) == pytest.approx(0.1)
    lin = load_config(None, ["optim.lr=1.0", "optim.schedule=linear", "train.steps=100", "optim.min_lr_ratio=0",
                             "optim.warmup_steps=0"])
    assert lr_at(lin, 50) == pytest.approx(0.5)
    const = load_config(None, ["optim.lr=2.0", "optim.schedule=constant"])
    assert lr_at(const, 77) == 2.0


def test_flash_training_learns_and_reports_bytes_per_param(tmp_path, capsys):
    out = tmp_path / "run"
    res = _train(out, "train.steps=30", "optim.lr=3e-3", "train.eval_every=15", "train.ckpt_every=0",
                 "train.peak_report_step=3")
    assert "train.peak_report_step: the allocator trace needs CUDA; skipped" in capsys.readouterr().out
    losses = train_losses(out)
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses.values())
    assert losses[30] < losses[1] - 0.8, losses
    evals = [r for r in read_metrics(out) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [15, 30] and evals[1]["val_loss"] < evals[0]["val_loss"]
    rec = [r for r in read_metrics(out) if r["kind"] == "train"][-1]
    assert rec["tokens_per_s"] > 0 and rec["peak_mem_bytes"] > 0 and rec["grad_norm"] > 0
    s = summary(out)
    row = s["rows"][0]
    assert row["local_params"] == s["n_params"] == res["n_params"]
    # bf16 params and grads (2 + 2 B) and Flash state (int8 ρ + int8/uint8 moments + scales ≈ 3.1 B)
    assert row["param_bytes"] == 2 * s["n_params"] and row["grad_bytes"] == 2 * s["n_params"]
    assert 3.0 * s["n_params"] <= row["optim_bytes"] <= 3.3 * s["n_params"]
    assert 7.0 <= bytes_per_param(s) <= 7.3
    table = (out / "summary.md").read_text()
    assert "vs the torch AdamW baseline on fp32 params: 16 bytes/param (4 param + 4 grad + 8 state)" in table


def test_torch_baseline_is_16_bytes_per_param(tmp_path):
    out = tmp_path / "run"
    _train(out, "optim.name=AdamW", "train.steps=2", "train.ckpt_every=0")
    row = summary(out)["rows"][0]
    n = row["local_params"]
    assert (row["param_bytes"], row["grad_bytes"]) == (4 * n, 4 * n)
    assert 8 * n <= row["optim_bytes"] <= 8 * n + 4 * 64  # exp_avg + exp_avg_sq (+ 'step' scalars)


def test_gradient_release_with_clipping(tmp_path):
    out = tmp_path / "run"
    _train(out, "optim.gradient_release=true", "train.max_grad_norm=0.5", "train.steps=4", "train.ckpt_every=0",
           "data.global_batch_size=4")
    recs = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert recs[-1]["grad_norm"] is not None and recs[-1]["grad_norm"] > 0  # measured by the release hooks
    assert summary(out)["rows"][0]["grad_bytes"] == 0


def test_gradient_release_frees_gradients(tmp_path):
    out = tmp_path / "run"
    _train(out, "optim.gradient_release=true", "train.max_grad_norm=0", "train.steps=10", "train.ckpt_every=0",
           "data.global_batch_size=4")
    losses = train_losses(out)
    assert losses[10] < losses[1]
    row = summary(out)["rows"][0]
    assert row["grad_bytes"] == 0
    assert 5.0 <= bytes_per_param(summary(out)) <= 5.3


def test_resume_continues_identically_and_rewrites_metrics(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    _train(full, "train.steps=6", "train.ckpt_every=3")
    _train(part, "train.steps=6", "train.ckpt_every=3", "train.stop_after=4")  # interrupted after step 4
    assert checkpoint_steps(part) == [3]
    assert max(train_losses(part)) == 4
    res = _train(part, "train.steps=6", "train.ckpt_every=3")
    assert res["resumed_from"] == 3 and res["final_step"] == 6
    # the summary reports the last save (size counted from its files) and how long resuming took
    last = res["checkpoint"]
    assert last["step"] == 6 and last["save_s"] > 0 and res["resume_s"] > 0
    step6 = part / "checkpoints" / "step_00000006"
    assert last["bytes"] == sum(f.stat().st_size for f in step6.rglob("*") if f.is_file()) > 0
    a, b = train_losses(full), train_losses(part)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]  # step 4 of the interrupted run was dropped and redone
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], abs=1e-5), (step, a, b)
    assert [r["kind"] for r in read_metrics(part)].count("resume") == 1
    assert checkpoint_steps(part) == [3, 6]


def test_resume_with_release_and_clipping_continues_identically(tmp_path):
    """Gradient release clips each step with the previous step's global norm: the checkpoint
    carries that norm (train state ``grad_clip``), so the first step after resuming is clipped as
    in the uninterrupted run. Without it the first resumed step is unclipped: step 5's loss was
    5.0012 instead of 5.0678 here (code before the fix, 2026-12-03)."""
    common = ["optim.gradient_release=true", "train.max_grad_norm=0.05", "train.steps=5", "train.ckpt_every=3",
              "data.global_batch_size=4"]
    full, part = tmp_path / "full", tmp_path / "part"
    _train(full, *common)
    _train(part, *common, "train.stop_after=4")  # interrupted after step 4, before its save
    res = _train(part, *common)
    assert res["resumed_from"] == 3
    a, b = train_losses(full), train_losses(part)
    for step in (4, 5):
        assert b[step] == pytest.approx(a[step], abs=1e-6), (step, a, b)


def test_nothing_to_do_when_already_at_the_last_step(tmp_path):
    out = tmp_path / "run"
    _train(out, "train.steps=2", "train.ckpt_every=2")
    res = _train(out, "train.steps=2", "train.ckpt_every=2")
    assert res["resumed_from"] == 2 and res["final_step"] == 2 and res["final_val_loss"] is not None


def test_checkpoint_is_complete_or_absent(tmp_path):
    """A crash while writing leaves a .tmp-* directory that is ignored; the previous one loads."""
    out = tmp_path / "run"
    _train(out, "train.steps=2", "train.ckpt_every=1", "train.keep_checkpoints=5")
    d = out / "checkpoints"
    assert checkpoint_steps(out) == [1, 2]
    # simulate a crash in the middle of saving step 3, and a step dir without its state file
    (d / ".tmp-step_00000003").mkdir()
    (d / ".tmp-step_00000003" / "__0_0.distcp").write_bytes(b"partial")
    assert [s for s, _ in ckpt.list_checkpoints(d)] == [1, 2]
    state = ckpt.read_train_state(d / "step_00000002")
    assert state["step"] == 2 and state["world_size"] == 1
    res = _train(out, "train.steps=3", "train.ckpt_every=1", "train.keep_checkpoints=2")
    assert res["resumed_from"] == 2
    assert checkpoint_steps(out) == [2, 3]  # pruned to the newest two; the stale tmp dir is gone
    assert not list(d.glob(".tmp-*"))


def test_compare_writes_png_and_table(tmp_path):
    from flashoptim_dist.train.compare import main_compare

    out = tmp_path / "cmp"
    cfg = _cfg(tmp_path / "train", "train.steps=40", "optim.lr=3e-3", "train.eval_every=20", "train.ckpt_every=0",
               f"compare.out_dir={out}")
    with preserved_environ():
        report = main_compare(cfg)
    png = out / "compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    table = (out / "compare.md").read_text()
    assert "| FlashAdamW |" in table and "| AdamW |" in table and "validation loss: FlashAdamW" in table
    flash, base = report["runs"]
    assert flash["optimizer"] == "FlashAdamW" and base["optimizer"] == "AdamW"
    # same data, seed and schedule: the validation losses agree closely
    assert abs(flash["final_val_loss"] - base["final_val_loss"]) < 0.1, (
        flash["final_val_loss"], base["final_val_loss"])
    assert json.loads((out / "compare.json").read_text())["runs"][1]["optimizer"] == "AdamW"


def test_hugging_face_model_trains_in_train_mode(tmp_path, monkeypatch):
    """from_pretrained returns an HF model in eval mode, where its gradient checkpointing and
    dropout are off; the trainer must switch it to train mode before the first step, not only
    after the first evaluation."""
    from optional_deps import require_module

    import flashoptim_dist.train.trainer as trainer_mod

    transformers = require_module("transformers")
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    modes = []  # (training, gradient checkpointing on) of the decoder stack at each forward
    build = trainer_mod.build_model

    def recording_build(*args, **kwargs):
        model = build(*args, **kwargs)
        assert not model.hf.training  # what from_pretrained hands over
        model.hf.model.register_forward_pre_hook(
            lambda m, a: modes.append((m.training, m.training and m.gradient_checkpointing)))
        return model

    monkeypatch.setattr(trainer_mod, "build_model", recording_build)
    _train(tmp_path / "run", "model.source=hf", f"model.path={tmp_path / 'hf'}", "model.activation_checkpointing=true",
           "optim.name=FlashAdamW", "train.steps=2", "train.eval_every=0", "train.ckpt_every=0",
           "data.eval_sequences=4")
    # 2 steps x 2 micro-batches (global batch 8 of 4 on one rank) with checkpointing on, then the
    # final evaluation's forwards in eval mode
    assert modes[:4] == [(True, True)] * 4, modes
    assert modes[4:] and all(m == (False, False) for m in modes[4:]), modes


def test_evaluation_with_sliced_loss_matches_full_logits(tmp_path, monkeypatch):
    """With model.loss_chunks > 1 the evaluation computes each sequence's loss in slices instead
    of materialising the (B, T, V) logits; the validation loss is the same."""
    from flashoptim_dist.data import EvalSet
    from flashoptim_dist.models import build_model
    from flashoptim_dist.train.engines import build_engine
    from flashoptim_dist.train.trainer import evaluate

    cfg = _cfg(tmp_path, "model.loss_chunks=3")
    torch.manual_seed(0)
    engine = build_engine(cfg, build_model(cfg.model, 256, 64), torch.device("cpu"), 1)
    tokens = torch.randint(0, 256, (5000,)).numpy()
    evalset = EvalSet(tokens, 64, 6, 4, 0, 1)  # 6 sequences in micro-batches of 4 (the last one short)
    from flashoptim_dist.models.gpt import LMHead

    rows = []  # token rows per loss slice computed by the head
    inner = LMHead._loss_sum
    monkeypatch.setattr(LMHead, "_loss_sum", lambda self, h, t: (rows.append(h.shape[0]), inner(self, h, t))[1])
    sliced = evaluate(engine, evalset, torch.device("cpu"))
    assert rows == [22, 22, 20] * 6, rows  # 6 sequences one by one, 64 tokens in 3 slices each
    engine.loss_chunks = 1
    rows.clear()
    full = evaluate(engine, evalset, torch.device("cpu"))
    assert rows == []  # logits of whole micro-batches, loss outside the model
    assert math.isfinite(full) and abs(sliced - full) <= 1e-6 * full, (sliced, full)
