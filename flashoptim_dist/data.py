"""Training data: a corpus of token ids, a train/validation split, and per-rank batches.

**Default corpus**: the Python standard library's own source files on this machine
(``sysconfig.get_paths()['stdlib']``, ``*.py``, without ``site-packages``/``dist-packages`` and,
unless asked, without the ``test``/``tests``/``idle_test`` packages). Real text that is always
there. Files are read in sorted order of their relative path, so the corpus is deterministic
for a given Python installation. A user's text file or directory can be used instead.

**Tokenizer**: byte-level by default (vocabulary 256, the token id is the byte). With a
Hugging Face model, the tokenizer stored beside the model can be used (``data.tokenizer=hf``).

**Split** (no file is in both halves): with at least :data:`MIN_FILES_FOR_FILE_SPLIT` files,
a file goes to validation when ``crc32(relative path) % 10000 < val_fraction * 10000`` (stable
when files are added or removed). With fewer files (e.g. one text file) the last
``val_fraction`` of the concatenated text is validation. Documents are joined with a blank line.

**Batches** (:class:`BatchSampler`): step ``s`` of training uses ``global_batch_size`` windows of
``seq_len + 1`` tokens whose start offsets are drawn from ``numpy.random.Generator(PCG64([seed,
s]))``. The global batch is therefore a pure function of (seed, step) — independent of the
number of ranks, of gradient accumulation and of resuming — and rank ``r`` at micro-step ``m``
takes windows ``[(m * world + r) * micro, (m * world + r + 1) * micro)`` of it. Resuming at step
``s`` needs no data state beyond ``s``.

**Validation** (:class:`EvalSet`): the first ``eval_sequences`` non-overlapping windows of the
validation split (wrapping if it is short), dealt round-robin over ranks; every rank runs the
same number of forward passes (padding windows carry weight 0) so collective engines stay in step.
"""

from __future__ import annotations

import fnmatch
import math
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = [
    "ByteTokenizer",
    "Corpus",
    "BatchSampler",
    "EvalSet",
    "stdlib_files",
    "text_files",
    "build_corpus",
    "MIN_FILES_FOR_FILE_SPLIT",
]

#: Fewer files than this are split by position instead of by file.
MIN_FILES_FOR_FILE_SPLIT = 20
_SEPARATOR = b"\n\n"
_TEST_DIRS = {"test", "tests", "idle_test"}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class ByteTokenizer:
    """Byte-level tokenizer: token id == byte value, vocabulary 256, lossless for any input."""

    vocab_size = 256
    name = "bytes"

    def encode(self, data: bytes | str) -> np.ndarray:
        """Bytes (UTF-8 for str) to a uint8 array of token ids."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        return np.frombuffer(data, dtype=np.uint8).copy()

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids back to text (invalid UTF-8 is replaced)."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """Adapter around a Hugging Face tokenizer with the ByteTokenizer interface."""

    name = "hf"

    def __init__(self, tok) -> None:
        self.tok = tok
        self.vocab_size = len(tok)

    def encode(self, data: bytes | str) -> np.ndarray:
        if isinstance(data, bytes):
            data = data.decode("utf-8", errors="replace")
        ids = self.tok(data, add_special_tokens=False)["input_ids"]
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])


def stdlib_files(include_tests: bool = False) -> tuple[Path, list[Path]]:
    """The standard library's ``*.py`` files: ``(root, sorted relative paths)``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():  # pragma: no cover - broken installation
        raise FileNotFoundError(f"the Python standard library directory {root} does not exist; use data.source=<path>")
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        skip = set(_SKIP_DIRS) | (set() if include_tests else _TEST_DIRS)
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for f in sorted(filenames):
            if f.endswith(".py"):
                files.append(Path(dirpath, f).relative_to(root))
    files.sort(key=lambda p: p.as_posix())
    return root, files


def text_files(path: Path, pattern: str = "*") -> tuple[Path, list[Path]]:
    """A user's text source: one file, or every file under a directory matching ``pattern``.

    Hidden files/directories and files containing NUL bytes in their first 8 KiB (binary) are
    skipped. Returns ``(root, sorted relative paths)``.
    """
    path = Path(path)
    if path.is_file():
        return path.parent, [Path(path.name)]
    if not path.is_dir():
        raise FileNotFoundError(f"data.source={str(path)!r} is neither a file nor a directory")
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS)
        for f in sorted(filenames):
            if f.startswith(".") or not fnmatch.fnmatch(f, pattern):
                continue
            full = Path(dirpath, f)
            with open(full, "rb") as fh:
                if b"\0" in fh.read(8192):
                    continue
            files.append(full.relative_to(path))
    files.sort(key=lambda p: p.as_posix())
    if not files:
        raise FileNotFoundError(f"data.source={str(path)!r} holds no text files matching data.file_pattern={pattern!r}")
    return path, files


@dataclass
class Corpus:
    """Token ids of the training and validation halves plus where they came from."""

    train: np.ndarray
    """Training token ids (1-D)."""
    val: np.ndarray
    """Validation token ids (1-D)."""
    vocab_size: int
    """Size of the tokenizer's vocabulary."""
    source: str
    """Human-readable description of the source."""
    n_files: int
    """Number of files read."""
    n_val_files: int
    """Number of those that went to validation (0 for a position split)."""


def _is_val(rel: Path, val_fraction: float) -> bool:
    return zlib.crc32(rel.as_posix().encode()) % 10000 < round(val_fraction * 10000)


def build_corpus(
    source: str = "stdlib",
    val_fraction: float = 0.05,
    tokenizer=None,
    max_bytes: Optional[int] = None,
    include_tests: bool = False,
    file_pattern: str = "*",
) -> Corpus:
    """Read, tokenize and split a corpus (see the module docstring for the exact rules).

    ``source``: ``"stdlib"`` or a path to a text file or directory.
    ``max_bytes``: stop reading once this many bytes were read (files in sorted order; the
    file that crosses the limit is truncated). None reads everything.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction} must be in (0, 1)")
    tokenizer = tokenizer or ByteTokenizer()
    if source == "stdlib":
        root, files = stdlib_files(include_tests)
        desc = f"python stdlib ({root})"
    else:
        root, files = text_files(Path(source), file_pattern)
        desc = str(source)
    by_file = len(files) >= MIN_FILES_FOR_FILE_SPLIT
    train_parts: list[bytes] = []
    val_parts: list[bytes] = []
    total = 0
    n_read = n_val = 0
    for rel in files:
        if max_bytes is not None and total >= max_bytes:
            break
        data = (root / rel).read_bytes()
        if max_bytes is not None:
            data = data[: max_bytes - total]
        total += len(data)
        n_read += 1
        if by_file and _is_val(rel, val_fraction):
            val_parts.append(data)
            n_val += 1
        else:
            train_parts.append(data)
    if by_file and (not val_parts or not train_parts):
        # Too few files to fall on both sides of the hash: split by position instead.
        train_parts, val_parts, n_val, by_file = train_parts + val_parts, [], 0, False
    if not by_file:
        text = _SEPARATOR.join(train_parts)
        cut = int(len(text) * (1.0 - val_fraction))
        train_bytes, val_bytes = text[:cut], text[cut:]
    else:
        train_bytes, val_bytes = _SEPARATOR.join(train_parts), _SEPARATOR.join(val_parts)
    train = tokenizer.encode(train_bytes)
    val = tokenizer.encode(val_bytes)
    return Corpus(train=train, val=val, vocab_size=tokenizer.vocab_size, source=desc, n_files=n_read, n_val_files=n_val)


class BatchSampler:
    """Deterministic per-rank training batches (see the module docstring for the rule).

    ``tokens``: 1-D array of token ids; ``seq_len``: tokens per example (inputs and targets are
    shifted by one, so windows hold ``seq_len + 1`` tokens); ``global_batch_size``: examples per
    optimizer step summed over ranks and micro-steps; ``micro_batch_size``: examples per forward
    on one rank; ``rank``/``world_size``: this rank's place among the data-parallel ranks.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int = 0,
    ) -> None:
        if global_batch_size % (micro_batch_size * world_size):
            raise ValueError(
                f"data.global_batch_size={global_batch_size} is not a multiple of data.micro_batch_size="
                f"{micro_batch_size} x {world_size} ranks; choose a global batch divisible by "
                f"{micro_batch_size * world_size}"
            )
        if len(tokens) < seq_len + 2:
            raise ValueError(
                f"the training split has {len(tokens)} tokens, fewer than data.seq_len+2={seq_len + 2}; "
                "use more data or a shorter data.seq_len"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.grad_accum = global_batch_size // (micro_batch_size * world_size)

    def global_starts(self, step: int) -> np.ndarray:
        """Start offsets of the ``global_batch_size`` windows of ``step``."""
        rng = np.random.Generator(np.random.PCG64([self.seed, step]))
        return rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.global_batch_size)

    def micro_starts(self, step: int, micro: int) -> np.ndarray:
        """Start offsets of this rank's windows at micro-step ``micro`` of ``step``."""
        if not 0 <= micro < self.grad_accum:
            raise IndexError(f"micro-step {micro} outside 0..{self.grad_accum - 1}")
        lo = (micro * self.world_size + self.rank) * self.micro_batch_size
        return self.global_starts(step)[lo : lo + self.micro_batch_size]

    def get(self, step: int, micro: int = 0):
        """``(inputs, targets)`` int64 tensors of shape ``(micro_batch_size, seq_len)``."""
        import torch

        starts = self.micro_starts(step, micro)
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        windows = torch.from_numpy(self.tokens[idx].astype(np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class EvalSet:
    """The fixed validation windows, dealt over ranks (see the module docstring)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, eval_sequences: int, micro_batch_size: int, rank: int,
                 world_size: int) -> None:
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"the validation split has {len(tokens)} tokens, fewer than data.seq_len+1={seq_len + 1}; "
                "raise data.val_fraction or shorten data.seq_len"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        n_windows = max(1, (len(tokens) - 1) // seq_len)
        self.starts = (np.arange(eval_sequences) % n_windows) * seq_len
        mine = list(range(rank, eval_sequences, world_size))
        per_rank = math.ceil(eval_sequences / world_size)
        self.weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
        self.mine = mine + [0] * (per_rank - len(mine))
        self.micro_batch_size = micro_batch_size

    def batches(self):
        """Yield ``(inputs, targets, weights)`` micro-batches; weights are 1.0 or 0.0 (padding)."""
        import torch

        for lo in range(0, len(self.mine), self.micro_batch_size):
            sel = self.mine[lo : lo + self.micro_batch_size]
            starts = self.starts[sel]
            idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
            w = torch.from_numpy(self.tokens[idx].astype(np.int64))
            yield (w[:, :-1].contiguous(), w[:, 1:].contiguous(),
                   torch.tensor(self.weights[lo : lo + self.micro_batch_size]))
