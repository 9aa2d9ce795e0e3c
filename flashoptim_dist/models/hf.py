"""Load a Hugging Face causal language model from a local directory (needs ``transformers``).

Nothing is downloaded: the directory must hold ``config.json`` and the weights
(``*.safetensors`` or ``pytorch_model*.bin``), as written by ``save_pretrained``.

:class:`HFCausalLM` wraps the model so that it looks like the built-in :class:`~.gpt.GPT` to the
trainer: ``forward(idx) -> logits``, ``fsdp_units()`` (the decoder layers, found through the
model's ``_no_split_modules``) and ``enable_activation_checkpointing()``.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

__all__ = ["HFCausalLM", "load_hf_causal_lm", "load_hf_tokenizer", "require_transformers"]


def require_transformers():
    """Import and return ``transformers``, or raise an ImportError that says how to install it."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "model.source=hf needs the 'transformers' package; install it with "
            "`pip install transformers safetensors` (or use model.source=gpt)"
        ) from e
    return transformers


def _check_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model.path={path!r} is not a directory; point it at a save_pretrained() folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"model.path={path!r} has no config.json; it must be a Hugging Face model folder "
            "(written by save_pretrained, or a downloaded snapshot)"
        )


class HFCausalLM(nn.Module):
    """A Hugging Face ``*ForCausalLM`` behind the trainer's model interface."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model

    @property
    def vocab_size(self) -> int:
        """Size of the model's input vocabulary."""
        return int(self.hf.get_input_embeddings().weight.shape[0])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=idx, use_cache=False).logits

    def fsdp_units(self) -> list[nn.Module]:
        """The decoder layers: modules whose class is named in ``_no_split_modules``."""
        names = set(getattr(self.hf, "_no_split_modules", None) or [])
        units = [m for m in self.hf.modules() if type(m).__name__ in names]
        return units

    def fsdp_embedding_units(self) -> list[nn.Module]:
        """Input embedding and output head, to shard as FSDP units of their own; none when they
        share a weight (tied) or the model does not expose both."""
        inp, out = self.hf.get_input_embeddings(), self.hf.get_output_embeddings()
        if inp is None or out is None or getattr(out, "weight", None) is getattr(inp, "weight", None):
            return []
        return [inp, out]

    def enable_activation_checkpointing(self) -> None:
        """Turn on the model's own gradient checkpointing (non-reentrant)."""
        enable = getattr(self.hf, "activation_checkpointing_enable", None)  # transformers >= 5
        if enable is None:
            enable = self.hf.gradient_checkpointing_enable
        try:
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        except TypeError:
            enable()


def load_hf_causal_lm(
    path: str,
    dtype: Optional[torch.dtype] = None,
    activation_checkpointing: bool = False,
    meta: bool = False,
) -> HFCausalLM:
    """Load ``AutoModelForCausalLM`` from the local folder ``path``.

    ``dtype``: the parameter dtype to load in (None keeps the checkpoint's, usually bf16/fp32).
    ``meta``: build the architecture on the meta device without reading weights (for ranks that
    receive weights by broadcast).
    """
    transformers = require_transformers()
    _check_dir(path)
    if meta:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):
            hf = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, torch_dtype=dtype if dtype is not None else "auto", low_cpu_mem_usage=True
        )
    hf.config.use_cache = False
    model = HFCausalLM(hf)
    if activation_checkpointing:
        model.enable_activation_checkpointing()
    return model


def load_hf_tokenizer(path: str):
    """Load the tokenizer stored next to the model in ``path`` (``AutoTokenizer``)."""
    transformers = require_transformers()
    _check_dir(path)
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise FileNotFoundError(
            f"data.tokenizer=hf but no tokenizer could be loaded from model.path={path!r} ({e}); "
            "save one there with tokenizer.save_pretrained(path) or use data.tokenizer=bytes"
        ) from e
