"""Config loading, overrides and validation: every error names the key, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flashoptim_dist.train import config as C
from flashoptim_dist.train.config import ConfigError, load_config

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared helpers
from launch_helpers import CONFIGS, clean_env  # noqa: E402


def _err(*overrides, path=None) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(path, list(overrides))
    return str(ei.value)


def test_defaults_are_the_cpu_demo_and_valid():
    cfg = load_config(None)
    assert cfg.model.preset == "tiny" and cfg.engine.name == "fsdp2" and cfg.optim.name == "FlashAdamW"
    assert cfg.data.source == "stdlib"
    # configs/cpu_demo.yaml spells the defaults out (plus 2 ranks and their global batch)
    demo = C.config_to_dict(load_config(str(CONFIGS / "cpu_demo.yaml")))
    default = C.config_to_dict(cfg)
    default["dist"]["nproc_per_node"], default["data"]["global_batch_size"] = 2, 16
    assert demo == default


def test_unknown_key_names_key_value_allowed_and_suggestion():
    msg = _err("optim.lrr=3e-4")
    assert "unknown key 'optim.lrr' (value '3e-4')" in msg
    assert "allowed keys in 'optim'" in msg and "weight_decay" in msg
    assert "did you mean 'optim.lr'" in msg


def test_unknown_section():
    msg = _err("optimizer.lr=1")
    assert "unknown section 'optimizer'" in msg and "allowed sections" in msg and "optim" in msg


def test_bad_literal_lists_choices():
    msg = _err("engine.name=fsdp3")
    assert "engine.name='fsdp3'" in msg
    for name in C.ENGINES:
        assert repr(name) in msg


def test_bad_types():
    assert "train.steps='abc' is invalid: expected an integer" in _err("train.steps=abc")
    assert "optim.lr='fast' is invalid: expected a number" in _err("optim.lr=fast")
    assert "train.resume='maybe' is invalid: expected a boolean" in _err("train.resume=maybe")
    msg = _err("optim.betas=[0.9]")
    assert "optim.betas" in msg and "a list of 2" in msg


def test_ranges():
    assert "train.steps=0 is invalid: must be a positive integer" in _err("train.steps=0")
    assert "optim.betas=[0.9, 1.5] is invalid: each beta must be in [0, 1)" in _err("optim.betas=[0.9,1.5]")
    assert "data.val_fraction=1.5" in _err("data.val_fraction=1.5")
    assert "optim.lr=-1.0 is invalid: must be >= 0" in _err("optim.lr=-1")
    assert "must be a multiple of data.micro_batch_size=8" in _err("data.global_batch_size=12")
    assert "model.loss_chunks=0 is invalid: must be a positive integer" in _err("model.loss_chunks=0")
    assert "train.peak_report_step=0 is invalid: must be a positive integer" in _err("train.peak_report_step=0")


def test_all_errors_reported_at_once():
    msg = _err("optim.lrr=1", "engine.name=nope", "train.steps=x")
    assert msg.startswith("3 config errors")


def test_cross_field_rules_name_the_fix():
    msg = _err("optim.gradient_release=true", "train.max_grad_norm=0", "optim.name=AdamW")
    assert "gradient release is for Flash optimizers" in msg
    msg = _err("optim.gradient_release=true", "train.max_grad_norm=0", "engine.name=ddp")
    assert "allowed engines: single, fsdp2" in msg
    msg = _err("engine.deepspeed_config=/nonexistent.json", "engine.name=zero2")
    assert "engine.deepspeed_config='/nonexistent.json' is invalid: no such file" in msg
    msg = _err("engine.deepspeed_config=configs/ds_zero2.json")
    assert "only used with engine.name=zero1/zero2/zero3" in msg
    msg = _err("model.source=hf")
    assert "model.path=null is invalid with model.source=hf" in msg
    msg = _err("data.source=/no/such/corpus")
    assert "data.source='/no/such/corpus' is invalid: no such file or directory" in msg
    msg = _err("data.tokenizer=hf")
    assert "data.tokenizer='hf' is invalid with model.source=gpt" in msg


def test_override_parsing():
    cfg = load_config(None, ["optim.betas=[0.8,0.9]", "train.steps=1e3", "optim.lr=3e-4", "train.resume=no",
                             "optim.master_weight_bits=32", "optim.master_weight_bits=null", "dist.nproc_per_node=4"])
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.resume is False
    assert cfg.optim.master_weight_bits is None
    assert cfg.dist.nproc_per_node == 4
    assert load_config(None, ["optim.master_weight_bits=32"]).optim.master_weight_bits == 32
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="must be section.key"):
        load_config(None, ["lr=1"])


def test_files_extends_json_and_relative_input_paths(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.5\ntrain:\n  steps: 7\n")
    (tmp_path / "child.yaml").write_text(
        "extends: base.yaml\ntrain:\n  steps: 9\nengine:\n  name: zero2\n  deepspeed_config: ds.json\n"
    )
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert cfg.optim.lr == 0.5 and cfg.train.steps == 9
    assert cfg.engine.deepspeed_config == str(tmp_path / "ds.json")
    (tmp_path / "c.json").write_text(json.dumps({"train": {"steps": 3}, "optim": {"name": "AdamW"}}))
    cfg = load_config(str(tmp_path / "c.json"), ["train.steps=4"])
    assert cfg.train.steps == 4 and cfg.optim.name == "AdamW"
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(str(tmp_path / "loop.yaml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "bad.yaml"))


def test_every_field_has_a_docstring():
    for cls in (C.ModelConfig, C.DataConfig, C.OptimConfig, C.EngineConfig, C.TrainConfig, C.DistConfig,
                C.CompareConfig, C.Config):
        docs = C.field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
    text = C.describe_config()
    assert "optim.gradient_release" in text and "Peak learning rate" in text


def test_shipped_configs_load(tmp_path):
    for name in ("cpu_demo.yaml", "gpt1b_fsdp2.yaml", "slurm_example.yaml", "cpu_zero2.yaml", "cpu_zero3.yaml"):
        load_config(str(CONFIGS / name))
    hf_dir = tmp_path / "model"
    hf_dir.mkdir()
    cfg = load_config(str(CONFIGS / "llama8b_finetune_fsdp2.yaml"), [f"model.path={hf_dir}", f"data.source={tmp_path}"])
    assert cfg.optim.gradient_release and cfg.train.max_grad_norm == 1.0
    assert load_config(str(CONFIGS / "gpt1b_fsdp2.yaml")).model.preset == "1b"


def test_deepspeed_json_files_use_flash_optimizer():
    for name, stage in (("ds_zero2.json", 2), ("ds_zero3.json", 3)):
        ds = json.loads((CONFIGS / name).read_text())
        assert ds["optimizer"]["type"] == "FlashAdamW"
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["bf16"]["enabled"] is True


def test_deepspeed_config_merging():
    from flashoptim_dist.train.engines import EngineError, deepspeed_config

    cfg = load_config(str(CONFIGS / "cpu_zero3.yaml"))
    ds = deepspeed_config(cfg, world_size=2, grad_accum=3)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_micro_batch_size_per_gpu"] == cfg.data.micro_batch_size
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == cfg.data.micro_batch_size * 2 * 3
    assert ds["gradient_clipping"] == cfg.train.max_grad_norm
    with pytest.raises(EngineError, match="zero_optimization.stage=3; make them agree"):
        deepspeed_config(load_config(str(CONFIGS / "cpu_zero3.yaml"), ["engine.name=zero2"]), 2, 1)
    with pytest.raises(EngineError, match="optimizer type 'FlashAdamW' but optim.name='FlashLion'"):
        deepspeed_config(load_config(str(CONFIGS / "cpu_zero2.yaml"), ["optim.name=FlashLion"]), 2, 1)
    # no JSON: a minimal bf16 config with the trainer's optimizer entry
    ds = deepspeed_config(load_config(None, ["engine.name=zero1", "optim.lr=0.01"]), 1, 1)
    assert ds["optimizer"]["type"] == "FlashAdamW" and ds["optimizer"]["params"]["lr"] == 0.01
    assert ds["bf16"]["bf16_master_weights_and_grads"] is True
    # the torch baseline of a Flash JSON: the trainer builds the optimizer, DeepSpeed keeps fp32 masters
    ds = deepspeed_config(load_config(str(CONFIGS / "cpu_zero2.yaml"), ["optim.name=AdamW"]), 2, 1)
    assert "optimizer" not in ds and "bf16_master_weights_and_grads" not in ds["bf16"]


def test_cli_config_error_exit_code_and_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "flashoptim_dist.train", "--config", str(CONFIGS / "cpu_demo.yaml"), "optim.nme=Adam"],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "unknown key 'optim.nme' (value 'Adam')" in proc.stderr and "did you mean 'optim.name'" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "flashoptim_dist.train", "--help-config"], cwd=tmp_path, env=clean_env(),
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0 and "engine.name" in proc.stdout
