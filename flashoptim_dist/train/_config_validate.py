"""Range and cross-field checks of a :class:`~.config.Config` (split out of :mod:`.config`,
which calls :func:`validate` from ``config_from_dict`` and re-exports it).

Every problem is collected, then one :class:`ConfigError` lists them all: a user fixing a config
file sees every bad key at once, each with the value given and what is allowed.
"""

from __future__ import annotations

import os

from .._names import FLASH_OPTIMIZER_NAMES as FLASH_OPTIMIZERS
from ._config_parse import ConfigError

#: Engines under which gradient release (step in the post-accumulate-grad hook) is supported:
#: the hook must see the final, reduced gradient of the parameter.
GRADIENT_RELEASE_ENGINES = ("single", "fsdp2")
#: torch optimizers with a ``fused=True`` implementation (optim.fused)
TORCH_FUSED = ("AdamW", "Adam", "SGD")
#: engines that materialise a model built on the meta device (model.init_device=meta)
META_INIT_ENGINES = ("single", "fsdp2")

#: Integer keys (in whichever of model/data/train has them) that must be >= 1 when set.
_POSITIVE_INTS = (
    "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len", "seq_len",
    "micro_batch_size", "global_batch_size", "eval_sequences", "steps", "log_every",
    "keep_checkpoints", "max_bytes", "stop_after", "peak_report_step",
)


def _format_errors(errors: list[str]) -> str:
    if len(errors) == 1:
        return "config error: " + errors[0]
    return f"{len(errors)} config errors:\n" + "\n".join(f"  - {e}" for e in errors)


def validate(cfg) -> None:
    """Check ranges and cross-field rules; raise ConfigError listing every problem."""
    e: list[str] = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            e.append(msg)

    m, d, o, en, t = cfg.model, cfg.data, cfg.optim, cfg.engine, cfg.train
    for sec, obj in (("model", m), ("data", d), ("train", t)):
        for name in _POSITIVE_INTS:
            if hasattr(obj, name):
                v = getattr(obj, name)
                if v is not None:
                    need(v >= 1, f"{sec}.{name}={v} is invalid: must be a positive integer")
    for name in ("eval_every", "ckpt_every", "threads"):
        v = getattr(t, name)
        need(v >= 0, f"train.{name}={v} is invalid: must be >= 0 (0 disables)")
    if cfg.dist.nproc_per_node != "auto":
        need(
            cfg.dist.nproc_per_node >= 1,
            f"dist.nproc_per_node={cfg.dist.nproc_per_node} is invalid: must be >= 1 or 'auto'",
        )
    need(0.0 < d.val_fraction < 1.0, f"data.val_fraction={d.val_fraction} is invalid: must be in (0, 1)")
    need(o.lr >= 0.0, f"optim.lr={o.lr} is invalid: must be >= 0")
    need(all(0.0 <= b < 1.0 for b in o.betas), f"optim.betas={list(o.betas)} is invalid: each beta must be in [0, 1)")
    need(o.eps > 0.0, f"optim.eps={o.eps} is invalid: must be > 0")
    need(o.weight_decay >= 0.0, f"optim.weight_decay={o.weight_decay} is invalid: must be >= 0")
    need(0.0 <= o.momentum < 1.0, f"optim.momentum={o.momentum} is invalid: must be in [0, 1)")
    need(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={o.min_lr_ratio} is invalid: must be in [0, 1]")
    need(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} is invalid: must be >= 0")
    need(
        t.max_grad_norm >= 0.0, f"train.max_grad_norm={t.max_grad_norm} is invalid: must be >= 0 (0 disables clipping)"
    )
    need(
        t.peak_tflops is None or t.peak_tflops > 0,
        f"train.peak_tflops={t.peak_tflops} is invalid: must be > 0 (TFLOP/s of one device) or null (from the device)",
    )
    need(en.timeout_minutes > 0, f"engine.timeout_minutes={en.timeout_minutes} is invalid: must be > 0")
    if en.replicas != "nodes":
        need(en.replicas >= 1, f"engine.replicas={en.replicas} is invalid: must be a positive integer or 'nodes'")
    need(
        en.replicas == 1 or en.name == "fsdp2",
        f"engine.replicas={en.replicas!r} is invalid with engine.name={en.name!r}: HSDP replicas need "
        "engine.name=fsdp2",
    )
    need(
        en.tp_size >= 1,
        f"engine.tp_size={en.tp_size} is invalid: must be a positive integer (1: no tensor parallelism)",
    )
    if en.tp_size > 1:
        need(
            en.name == "fsdp2",
            f"engine.tp_size={en.tp_size} is invalid with engine.name={en.name!r}: tensor parallelism composes with "
            "fsdp2 only (FSDP2 shards over the data-parallel mesh dim); use engine.name=fsdp2 or engine.tp_size=1",
        )
        need(
            m.source == "gpt",
            f"engine.tp_size={en.tp_size} is invalid with model.source={m.source!r}: the tensor-parallel plan is the "
            "built-in GPT's (GPT.tensor_parallel_plan); use model.source=gpt or engine.tp_size=1",
        )
        need(
            m.loss_chunks == 1,
            f"model.loss_chunks={m.loss_chunks} is invalid with engine.tp_size={en.tp_size}: the sliced loss computes "
            "the head inside its own forward, which the colwise head cannot split; use model.loss_chunks=1",
        )
    if d.global_batch_size is not None:
        need(
            d.global_batch_size % d.micro_batch_size == 0,
            f"data.global_batch_size={d.global_batch_size} is invalid: must be a multiple of "
            f"data.micro_batch_size={d.micro_batch_size}",
        )

    if m.source == "hf":
        need(
            m.path is not None,
            "model.path=null is invalid with model.source=hf: set model.path to a Hugging Face model folder",
        )
        if m.path is not None:
            need(os.path.isdir(m.path), f"model.path={m.path!r} is invalid: no such directory")
    else:
        need(
            m.path is None, f"model.path={m.path!r} is only used with model.source=hf; remove it or set model.source=hf"
        )
    if d.tokenizer == "hf":
        need(
            m.source == "hf",
            "data.tokenizer='hf' is invalid with model.source=gpt: the tokenizer is read from model.path; use "
            "data.tokenizer=bytes",
        )
    if d.source != "stdlib":
        need(
            os.path.exists(d.source),
            f"data.source={d.source!r} is invalid: no such file or directory (or use 'stdlib')",
        )
    need(
        m.loss_chunks >= 1, f"model.loss_chunks={m.loss_chunks} is invalid: must be a positive integer (1: no slicing)"
    )
    if m.init_device == "meta":
        need(
            en.name in META_INIT_ENGINES and m.source == "gpt",
            f"model.init_device='meta' is invalid with engine.name={en.name!r}/model.source={m.source!r}: it needs "
            f"engine.name in ({', '.join(META_INIT_ENGINES)}) and model.source=gpt (Hugging Face models load their "
            "weights; ddp, fsdp1 and zero* are not wired for it: use init_device=cpu there, or fsdp2)",
        )

    flash = o.name in FLASH_OPTIMIZERS
    need(
        not o.fused or o.name in TORCH_FUSED,
        f"optim.fused=true is invalid with optim.name={o.name!r}: torch has a fused implementation of "
        f"{', '.join(TORCH_FUSED)} only (Flash optimizers always run their own fused kernel); remove optim.fused",
    )
    if o.gradient_release:
        need(
            flash,
            f"optim.gradient_release=true is invalid with optim.name={o.name!r}: gradient release is for Flash "
            f"optimizers ({', '.join(FLASH_OPTIMIZERS)})",
        )
        need(
            en.name in GRADIENT_RELEASE_ENGINES,
            f"optim.gradient_release=true is invalid with engine.name={en.name!r}: allowed engines: "
            f"{', '.join(GRADIENT_RELEASE_ENGINES)}",
        )
    if en.name.startswith("zero"):
        if en.deepspeed_config is not None:
            need(
                os.path.isfile(en.deepspeed_config),
                f"engine.deepspeed_config={en.deepspeed_config!r} is invalid: no such file",
            )
    else:
        need(
            en.deepspeed_config is None,
            f"engine.deepspeed_config={en.deepspeed_config!r} is only used with engine.name=zero1/zero2/zero3 (got "
            f"{en.name!r}); remove it",
        )
    if cfg.compare.baseline is not None:
        need(
            cfg.compare.baseline != o.name,
            f"compare.baseline={cfg.compare.baseline!r} is the same as optim.name; pick another optimizer or null",
        )
    if e:
        raise ConfigError(_format_errors(e))
