"""Typed configuration of a training run, loaded from YAML/JSON with ``key=value`` overrides.

A config file has one mapping per section (``model``, ``data``, ``optim``, ``engine``,
``train``, ``dist``, ``compare``); every key is a field of the dataclass of that section, with
the type, default and meaning documented on the field below. A file may start with
``extends: other.yaml`` (resolved relative to the file) to start from another file. Input paths
in a file (``engine.deepspeed_config``, ``data.source``, ``model.path``) are relative to the
file's folder; on the command line they are relative to the working directory, as are outputs
(``train.out_dir``) everywhere.

Overrides on the command line use dotted keys and YAML-style values::

    flashoptim-dist train --config configs/cpu_demo.yaml optim.lr=3e-4 train.steps=50 optim.betas=[0.9,0.95]

:func:`load_config` validates once, after merging: an unknown key, a value of the wrong type, a
value outside its allowed set or range, and contradicting settings all raise
:class:`ConfigError`, whose message names the key, the value given and what is allowed. All
problems are reported at once.

``python -m flashoptim_dist.train --help-config`` prints every key with its type, default and
docstring (read from this file).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import os
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

# Optimizer names, the torch (fp32) baseline of each Flash optimizer: one table for the package.
from .._names import BASELINE_OF, OPTIMIZER_NAMES
from .._names import FLASH_OPTIMIZER_NAMES as FLASH_OPTIMIZERS
from .._names import TORCH_BASELINE_NAMES as TORCH_OPTIMIZERS
from ._config_parse import ConfigError, _Bad, _coerce, _parse_scalar_or_list, _type_desc
from ._config_validate import META_INIT_ENGINES, _format_errors, validate

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "EngineConfig",
    "TrainConfig",
    "DistConfig",
    "CompareConfig",
    "Config",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "parse_overrides",
    "field_docs",
    "describe_config",
    "FLASH_OPTIMIZERS",
    "TORCH_OPTIMIZERS",
    "BASELINE_OF",
    "ENGINES",
    "META_INIT_ENGINES",
]

ENGINES = ("single", "ddp", "fsdp2", "fsdp1", "zero1", "zero2", "zero3")

OptimizerName = Literal[OPTIMIZER_NAMES]
EngineName = Literal["single", "ddp", "fsdp2", "fsdp1", "zero1", "zero2", "zero3"]
PresetName = Literal["tiny", "mini", "small", "125m", "350m", "1b", "3b", "8b"]


@dataclass
class ModelConfig:
    """What model to train."""

    source: Literal["gpt", "hf"] = "gpt"
    """'gpt': the built-in GPT family (see model.preset); 'hf': a Hugging Face causal LM from the local folder
    model.path."""
    preset: PresetName = "tiny"
    """Size preset of the built-in GPT: tiny (0.14M params), mini, small, 125m, 350m, 1b (Llama-3.2-1B shapes), 3b, 8b
    (Llama-3-8B shapes)."""
    path: Optional[str] = None
    """Folder of a Hugging Face model (config.json + weights) when model.source=hf; nothing is downloaded."""
    vocab_size: Optional[int] = None
    """Override the preset's vocabulary size; null: the tokenizer's (tiny/mini/small) or the preset's own."""
    d_model: Optional[int] = None
    """Override the preset's width of the residual stream."""
    n_layers: Optional[int] = None
    """Override the preset's number of transformer blocks."""
    n_heads: Optional[int] = None
    """Override the preset's number of attention heads."""
    n_kv_heads: Optional[int] = None
    """Override the preset's number of key/value heads (grouped-query attention)."""
    d_ff: Optional[int] = None
    """Override the preset's MLP hidden width."""
    max_seq_len: Optional[int] = None
    """Override the preset's maximum sequence length; null: at least data.seq_len."""
    norm: Optional[Literal["rmsnorm", "layernorm"]] = None
    """Override the preset's normalisation."""
    pos_embedding: Optional[Literal["rope", "learned"]] = None
    """Override the preset's positions: rotary or learned absolute."""
    mlp: Optional[Literal["swiglu", "gelu"]] = None
    """Override the preset's MLP type."""
    tie_embeddings: Optional[bool] = None
    """Override whether the output head shares the token embedding's weight."""
    activation_checkpointing: bool = False
    """Recompute block activations in backward (less memory, ~30% more compute)."""
    loss_chunks: int = 1
    """Compute the output head and the cross-entropy in this many slices of the micro-batch's tokens, each recomputed
    in backward (built-in GPT; Hugging Face llama, mistral, qwen2, qwen3). The logits with their fp32 copy and
    gradients take ~14 bytes x tokens x vocab at once with 1 slice (7 GiB at 4096 tokens and vocab 128256), 1/k of
    that with k; costs a second forward of the head (recomputed in backward)."""
    init_device: Literal["auto", "cpu", "meta"] = "auto"
    """Where the built-in GPT is first built. 'cpu': in fp32 on the host, then moved to the device and cast (bf16 for
    Flash optimizers). 'meta': without memory, then allocated on the device in the final dtype and initialised there
    (engine.name=fsdp2: after sharding, each rank its shards; engine.name=single: the whole model, so no fp32 copy and,
    on CUDA, no host copy exists; on the CPU the weights equal init_device=cpu's bit for bit). Not with ddp, fsdp1,
    zero* or model.source=hf. 'auto': meta for presets of 1B parameters and more under single and fsdp2, else cpu."""


@dataclass
class DataConfig:
    """Where tokens come from and how they are batched."""

    source: str = "stdlib"
    """'stdlib': the Python standard library's own source files on this machine; otherwise a path to a text file or a
    directory of text files."""
    file_pattern: str = "*"
    """Glob (on file names) selecting files when data.source is a directory."""
    include_tests: bool = False
    """With data.source=stdlib, also read the standard library's test packages (~19 MB more)."""
    max_bytes: Optional[int] = None
    """Read at most this many bytes of text (null: all)."""
    tokenizer: Literal["bytes", "hf"] = "bytes"
    """'bytes': byte-level, 256 ids; 'hf': the tokenizer saved in model.path."""
    val_fraction: float = 0.05
    """Share of the corpus held out for validation, in (0, 1)."""
    seq_len: int = 128
    """Tokens per training example."""
    micro_batch_size: int = 8
    """Examples per forward/backward on one rank."""
    global_batch_size: Optional[int] = None
    """Examples per optimizer step over all ranks; a multiple of micro_batch_size x data-parallel ranks (ranks /
    engine.tp_size), the quotient being the gradient-accumulation steps. null: micro_batch_size x data-parallel
    ranks (no accumulation). Keep it fixed to resume on a different number of ranks with identical data."""
    eval_sequences: int = 64
    """Validation examples per evaluation (the same set every time, split over ranks)."""


@dataclass
class OptimConfig:
    """The optimizer and its schedule."""

    name: OptimizerName = "FlashAdamW"
    """Flash optimizers (bf16 params + int8 error correction, 8-bit states) or their torch baselines on fp32 params."""
    lr: float = 3e-3
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas / Lion (beta1, beta2); each in [0, 1)."""
    eps: float = 1e-8
    """Adam epsilon (outside the square root)."""
    weight_decay: float = 0.1
    """Weight decay (decoupled for AdamW/SGDW/Lion, L2 for Adam/SGD); applied to >=2-D params unless optim.decay_all."""
    decay_all: bool = False
    """Also decay 1-D parameters (norm weights, biases)."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """SGD Nesterov momentum."""
    master_weight_bits: Optional[Literal[24, 32]] = 24
    """Flash only: 24 keeps an int8 error-correction term per bf16 param, 32 an int16 one, null none (plain bf16
    weights)."""
    quantize: bool = True
    """Flash only: store optimizer states as companded 8-bit codes (false: full precision states)."""
    rounding: Literal["stochastic", "nearest"] = "stochastic"
    """Flash only: how the 8-bit codes and the error-correction term are re-rounded each step. stochastic: unbiased, so
    slow decays (beta2 0.999), stopped gradients and fine-tuning learning rates move like fp32 AdamW; nearest: the
    FlashOptim paper's rounding, which stalls in those regimes (docs/QUALITY.md)."""
    rounding_seed: int = 0
    """Flash only: seed of the stochastic-rounding dither (a run and its resume are bit-reproducible on any number of
    ranks)."""
    check_numerics: bool = True
    """Flash only: on each tensor's first step with a non-zero learning rate (the schedule's peak, not its warm-up,
    where known), fail if that rate cannot move the tensor's largest weights at all with the chosen
    master_weight_bits and rounding."""
    fused: bool = False
    """torch AdamW/Adam/SGD only: torch's fused implementation (one kernel, no per-step temporaries: the baseline at
    its leanest, as torchtitan runs it); false: torch's default (foreach on CUDA, which allocates temporaries of the
    size of a parameter group)."""
    gradient_release: bool = False
    """Flash only: step each parameter in its post-accumulate-grad hook and free its gradient at once (engines: single,
    fsdp2; no gradient accumulation). With train.max_grad_norm > 0 each step is clipped with the previous step's
    global gradient norm."""
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    """Learning-rate decay after warmup, down to lr x min_lr_ratio at train.steps."""
    warmup_steps: int = 20
    """Steps of linear warmup from 0 to lr."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr, in [0, 1]."""


@dataclass
class EngineConfig:
    """How the model is distributed over ranks."""

    name: EngineName = "fsdp2"
    """single (1 rank), ddp, fsdp2 (fully_shard per block), fsdp1 (FullyShardedDataParallel, use_orig_params),
    zero1/zero2/zero3 (DeepSpeed)."""
    deepspeed_config: Optional[str] = None
    """DeepSpeed JSON for zero1/2/3 (e.g. configs/ds_zero3.json). Batch sizes, accumulation and clipping are filled in
    from this config; null builds a minimal bf16 config."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype of gradient reduction under fsdp2/fsdp1."""
    shard_embeddings: bool = True
    """fsdp2/fsdp1: the token embedding and the output head (when not tied) are FSDP units of their own instead of
    parts of the root unit. Both FSDP versions keep the root unit's parameters gathered from the end of forward to
    the end of backward and its unsharded gradients until the root's reduce-scatter; out of the root, embedding and
    head (2 x vocab x d_model x 2 bytes gathered, plus the head's gradient) are held only while used. Other engines
    ignore it."""
    replicas: Union[int, Literal["nodes"]] = 1
    """fsdp2 only: HSDP when > 1 — the ranks form this many model replicas, each sharding the model over its
    consecutive ranks (reduce-scatter inside a replica, all-reduce across replicas); 'nodes': one replica per node,
    so only the cheap all-reduce crosses the network (needs the same number of ranks on every node); 1: plain FSDP2
    over all ranks."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; auto: nccl with CUDA, gloo on CPU."""
    timeout_minutes: float = 30.0
    """Collective timeout."""
    tp_size: int = 1
    """Tensor-parallel degree (engine.name=fsdp2, the built-in GPT): the ranks form a (ranks / tp_size) x tp_size mesh
    ("dp", "tp"), with engine.replicas a (replicas, shards, tp_size) one (HSDP + TP; tp_size consecutive ranks,
    inside one replica); attention, MLP, embedding and head weights are split tp_size ways with torchtitan's plan
    (GPT.tensor_parallel_plan, no sequence parallelism) and FSDP2 shards over "dp". Must divide the number of ranks
    and the model's n_heads, n_kv_heads, d_ff and vocab_size; with a Flash optimizer the column split of wo and w2
    must be a multiple of 32 (e.g. tiny: tp_size 2). The tp_size ranks of a dp group read the same batch, so
    data.global_batch_size counts data-parallel ranks only. 1: no tensor parallelism."""


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 300
    """Optimizer steps to train for (a resumed run continues up to this number)."""
    seed: int = 0
    """Seed of the model initialisation and of the data order."""
    out_dir: str = "runs/cpu_demo"
    """Folder for metrics.jsonl, checkpoints/ and summary.json (relative to the working directory)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    log_every: int = 10
    """Write a metrics line (loss averaged over ranks and steps since the last line) every N steps."""
    eval_every: int = 100
    """Evaluate validation loss every N steps and at the end; 0: only at the end."""
    ckpt_every: int = 100
    """Checkpoint every N steps and at the end; 0 disables checkpoints."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    resume: bool = True
    """Resume from the newest complete checkpoint in out_dir/checkpoints, if any."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda:<local rank> when CUDA is available, else cpu."""
    threads: int = 0
    """torch CPU threads per rank; 0: cores / ranks on this node (at least 1)."""
    stop_after: Optional[int] = None
    """Leave the loop after this step as if interrupted (no final checkpoint); for demos of resuming."""
    peak_tflops: Optional[float] = None
    """Dense bf16 peak TFLOP/s of one device, for the MFU on the log line (train/flops.py counts model FLOPs as
    torchtitan does); null: from the CUDA device name (H100/H200 SXM 989, A100 312), no MFU on CPU or unknown cards."""
    peak_report_step: Optional[int] = None
    """CUDA: record the allocator during this step on rank 0 and print the largest allocations alive at the step's peak
    (what to shrink first; sizes only, FLASHOPTIM_PEAK_STACKS=1 adds Python stacks). null: off."""


@dataclass
class DistConfig:
    """Starting ranks when the command is run without a launcher."""

    nproc_per_node: Union[int, Literal["auto"]] = "auto"
    """Without torchrun/mpirun/srun/deepspeed around it, the command starts this many local ranks itself (through
    torchrun); auto: one per GPU, 2 on CPU, 1 for engine.name=single."""


@dataclass
class CompareConfig:
    """The `compare` command."""

    baseline: Optional[OptimizerName] = None
    """Optimizer to compare against; null: the torch baseline of optim.name (FlashAdamW -> AdamW)."""
    out_dir: Optional[str] = None
    """Where the PNG and table go; null: <train.out_dir>/compare."""


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """The distribution engine."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Self-launching."""
    compare: CompareConfig = field(default_factory=CompareConfig)
    """The compare command."""

    def to_dict(self) -> dict:
        """Plain nested dict (JSON/YAML-serialisable)."""
        return config_to_dict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_CLASSES = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "engine": EngineConfig,
    "train": TrainConfig,
    "dist": DistConfig,
    "compare": CompareConfig,
}


# ----------------------------------------------------------------------------------------------
# Field documentation (attribute docstrings read from this file's source)
# ----------------------------------------------------------------------------------------------


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of dataclass ``cls`` (from its source)."""
    src = textwrap.dedent(inspect.getsource(cls))
    body = ast.parse(src).body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=False)


def describe_config() -> str:
    """Human-readable list of every key: type, default and meaning."""
    lines = []
    for section, cls in _SECTION_CLASSES.items():
        lines.append(f"[{section}]  {inspect.getdoc(cls)}")
        docs = field_docs(cls)
        hints = _hints(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            default = getattr(defaults, f.name)
            lines.append(f"  {section}.{f.name} = {json.dumps(default)}    ({_type_desc(hints[f.name])})")
            lines.append(
                textwrap.fill(docs.get(f.name, ""), width=96, initial_indent="      ", subsequent_indent="      ")
            )
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _read_file(path: Path, seen: tuple = ()) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing file to --config (see configs/)")
    if path.resolve() in seen:
        raise ConfigError(f"config file {str(path)!r} extends itself through {[str(s) for s in seen]}")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid JSON: {e}") from None
    else:
        try:
            import yaml
        except ImportError:
            raise ConfigError(
                f"reading {str(path)!r} needs PyYAML: `pip install pyyaml` (or write the config as .json)"
            ) from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    _resolve_input_paths(data, path.parent)
    base = data.pop("extends", None)
    if base is not None:
        parent = _read_file(path.parent / base, seen + (path.resolve(),))
        data = _deep_merge(parent, data)
    return data


#: Input paths that a config file gives relative to its own folder (outputs such as
#: train.out_dir stay relative to the working directory).
INPUT_PATH_KEYS = (("engine", "deepspeed_config"), ("data", "source"), ("model", "path"))


def _resolve_input_paths(data: dict, base_dir: Path) -> None:
    for section, key in INPUT_PATH_KEYS:
        sec = data.get(section)
        if not isinstance(sec, dict) or not isinstance(sec.get(key), str):
            continue
        value = sec[key]
        if (section, key) == ("data", "source") and value == "stdlib":
            continue
        if not os.path.isabs(value) and not value.startswith("~"):
            sec[key] = os.path.normpath(os.path.join(base_dir, value))


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(items: list[str]) -> dict:
    """Turn ``["optim.lr=3e-4", "train.steps=5"]`` into a nested dict; values parsed like YAML."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form section.key=value (e.g. optim.lr=3e-4 or train.steps=100)"
            )
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(
                f"override key {key!r} must be section.key with section one of {', '.join(_SECTION_CLASSES)} "
                f"(e.g. optim.lr=3e-4)"
            )
        value = _parse_scalar_or_list(raw) if raw.strip() != "" else ""
        out.setdefault(parts[0], {})[parts[1]] = value
    return out


def _suggest(name: str, options, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def config_from_dict(data: dict) -> Config:
    """Build and validate a :class:`Config` from a nested dict; raises ConfigError listing every problem."""
    errors: list[str] = []
    sections = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if section not in _SECTION_CLASSES:
            errors.append(
                f"unknown section {section!r}; allowed sections: "
                f"{', '.join(_SECTION_CLASSES)}{_suggest(section, _SECTION_CLASSES)}"
            )
            continue
        if values is None:
            values = {}
        if not isinstance(values, dict):
            errors.append(f"section {section!r} must be a mapping of key: value, got {values!r}")
            continue
        cls = _SECTION_CLASSES[section]
        hints = _hints(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                errors.append(
                    f"unknown key '{section}.{key}' (value {value!r}); allowed keys in '{section}': "
                    f"{', '.join(hints)}{_suggest(str(key), hints, section + '.')}"
                )
                continue
            try:
                kwargs[key] = _coerce(value, hints[key])
            except _Bad:
                errors.append(f"{section}.{key}={value!r} is invalid: expected {_type_desc(hints[key])}")
        sections[section] = kwargs
    if errors:
        raise ConfigError(_format_errors(errors))
    cfg = Config(**{name: _SECTION_CLASSES[name](**sections.get(name, {})) for name in _SECTION_CLASSES})
    validate(cfg)
    return cfg


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read ``path`` (YAML or JSON; None: all defaults), apply ``key=value`` overrides, validate."""
    data = _read_file(Path(path)) if path else {}
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
    return config_from_dict(data)


def config_to_dict(cfg: Config) -> dict:
    """Nested dict of a Config (tuples become lists)."""

    def conv(v):
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return {s: {k: conv(v) for k, v in dataclasses.asdict(getattr(cfg, s)).items()} for s in _SECTION_CLASSES}
