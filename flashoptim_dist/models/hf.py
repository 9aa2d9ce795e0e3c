"""Load a Hugging Face causal language model from a local directory (needs ``transformers``).

Nothing is downloaded: the directory must hold ``config.json`` and the weights
(``*.safetensors`` or ``pytorch_model*.bin``), as written by ``save_pretrained``.

:class:`HFCausalLM` wraps the model so that it looks like the built-in :class:`~.gpt.GPT` to the
trainer: ``forward(idx) -> logits``, ``fsdp_units()`` (the decoder layers, found through the
model's ``_no_split_modules``) and ``enable_activation_checkpointing()``. After
``enable_sliced_loss()`` (``model.loss_chunks`` > 1), ``forward(idx, targets, loss_chunks)``
returns the mean cross-entropy computed by the head in recomputed token slices, as the built-in
GPT does (:class:`~.gpt.LMHead`).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

__all__ = ["HFCausalLM", "load_hf_causal_lm", "load_hf_tokenizer", "require_transformers", "SLICED_LOSS_MODEL_TYPES"]

SLICED_LOSS_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
"""``config.model_type`` of the causal LMs whose logits are exactly
``lm_head(model(...).last_hidden_state)`` — no scaling or soft-capping after the head (read in
transformers 5.23's modeling files) — so that the sliced loss computes the same function."""


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


def _dtype_kwarg(transformers) -> str:
    """``dtype`` from transformers 4.56 on (``torch_dtype`` is deprecated there), else ``torch_dtype``."""
    try:
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    except ValueError:  # pragma: no cover - unusual version string
        return "dtype"
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


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
        self._sliced_loss = False  # set by enable_sliced_loss()

    @property
    def vocab_size(self) -> int:
        """Size of the model's input vocabulary."""
        return int(self.hf.get_input_embeddings().weight.shape[0])

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, loss_chunks: int = 1) -> torch.Tensor:
        if targets is None:
            return self.hf(input_ids=idx, use_cache=False).logits
        if not self._sliced_loss:
            raise RuntimeError("forward(idx, targets, ...) needs enable_sliced_loss() first (model.loss_chunks > 1)")
        h = self.hf.model(input_ids=idx, use_cache=False).last_hidden_state
        # the head module as the model holds it now (an FSDP1 wrapper of the LMHead under fsdp1)
        return self.hf.get_output_embeddings()(h, targets, loss_chunks) / targets.numel()

    def enable_sliced_loss(self) -> None:
        """Let ``forward(idx, targets, loss_chunks)`` compute head + cross-entropy in token slices.

        The output head (a bias-free ``nn.Linear``) becomes a :class:`~.gpt.LMHead` in place:
        same parameter, same state-dict names, and HF's own forward still gets logits from it;
        head and loss are then one call of the head module, so FSDP and ZeRO-3 gather its weight
        once per pass. Only for the architectures in :data:`SLICED_LOSS_MODEL_TYPES`."""
        from .gpt import LMHead

        model_type = getattr(self.hf.config, "model_type", None)
        if model_type not in SLICED_LOSS_MODEL_TYPES:
            raise ValueError(
                f"model.loss_chunks > 1 is not supported for Hugging Face model_type {model_type!r} (supported: "
                f"{', '.join(sorted(SLICED_LOSS_MODEL_TYPES))}): its logits may be scaled or soft-capped after the "
                "head, which the sliced loss would skip; use model.loss_chunks=1"
            )
        head = self.hf.get_output_embeddings()
        if type(head) is not nn.Linear or head.bias is not None:
            raise ValueError(
                f"model.loss_chunks > 1 needs the output head to be a bias-free nn.Linear, got {type(head).__name__}"
                f"{' with a bias' if getattr(head, 'bias', None) is not None else ''}; use model.loss_chunks=1"
            )
        head.__class__ = LMHead
        self._sliced_loss = True

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
            hf = transformers.AutoModelForCausalLM.from_config(config, **{_dtype_kwarg(transformers): dtype})
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, low_cpu_mem_usage=True,
            **{_dtype_kwarg(transformers): dtype if dtype is not None else "auto"},
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
