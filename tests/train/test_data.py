"""The corpus, its split and the per-rank batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashoptim_dist.data import (
    MIN_FILES_FOR_FILE_SPLIT,
    BatchSampler,
    ByteTokenizer,
    EvalSet,
    build_corpus,
    stdlib_files,
    text_files,
)


@pytest.fixture(scope="module")
def corpus():
    return build_corpus("stdlib", val_fraction=0.05, max_bytes=3_000_000)


def test_stdlib_corpus_is_real_python_deterministic_and_split(corpus):
    root, files = stdlib_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any(part in ("site-packages", "test", "tests") for f in files for part in f.parts)
    assert len(corpus.train) > 1_000_000 and len(corpus.val) > 10_000
    assert corpus.vocab_size == 256 and corpus.n_val_files > 0
    text = ByteTokenizer().decode(corpus.train[:20000])
    assert "def " in text and "import " in text
    again = build_corpus("stdlib", val_fraction=0.05, max_bytes=3_000_000)
    assert np.array_equal(again.train, corpus.train) and np.array_equal(again.val, corpus.val)
    frac = len(corpus.val) / (len(corpus.val) + len(corpus.train))
    assert 0.005 < frac < 0.2


def test_split_is_by_file(tmp_path):
    for i in range(MIN_FILES_FOR_FILE_SPLIT * 5):
        (tmp_path / f"doc{i:03d}.txt").write_text(f"<doc {i:03d}>" + "x" * 50 + "\n")
    c = build_corpus(str(tmp_path), val_fraction=0.2)
    train, val = bytes(c.train), bytes(c.val)

    def ids(b):
        return {b[i + 5 : i + 8] for i in range(len(b)) if b[i : i + 5] == b"<doc "}

    assert ids(train) and ids(val) and not ids(train) & ids(val)
    assert len(ids(train)) + len(ids(val)) == MIN_FILES_FOR_FILE_SPLIT * 5


def test_single_text_file_split_by_position_and_binaries_skipped(tmp_path):
    (tmp_path / "book.txt").write_text("abcdefghij" * 1000)
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2" * 100)
    c = build_corpus(str(tmp_path / "book.txt"), val_fraction=0.1)
    assert len(c.val) == 1000 and len(c.train) == 9000
    root, files = text_files(tmp_path)
    assert [f.name for f in files] == ["book.txt"]
    with pytest.raises(FileNotFoundError, match="no text files matching"):
        text_files(tmp_path, "*.md")
    with pytest.raises(FileNotFoundError, match="neither a file nor a directory"):
        build_corpus(str(tmp_path / "nope"))


def _global_batch(tokens, step, world, micro, global_bs):
    seqs = []
    for rank in range(world):
        s = BatchSampler(tokens, 16, global_bs, micro, rank, world, seed=3)
        for m in range(s.grad_accum):
            x, y = s.get(step, m)
            assert x.shape == (micro, 16) and x.dtype == torch.int64
            assert torch.equal(x[:, 1:], y[:, :-1])
            seqs.extend(tuple(r.tolist()) for r in x)
    return sorted(seqs)


def test_global_batch_is_independent_of_world_size_and_accumulation(corpus):
    tokens = corpus.train
    a = _global_batch(tokens, 5, world=1, micro=2, global_bs=8)
    b = _global_batch(tokens, 5, world=2, micro=2, global_bs=8)
    c = _global_batch(tokens, 5, world=4, micro=1, global_bs=8)
    assert a == b == c and len(a) == 8
    assert _global_batch(tokens, 6, world=2, micro=2, global_bs=8) != a


def test_ranks_get_disjoint_windows(corpus):
    s0 = BatchSampler(corpus.train, 32, 8, 4, 0, 2, seed=0)
    s1 = BatchSampler(corpus.train, 32, 8, 4, 1, 2, seed=0)
    starts = np.concatenate([s0.micro_starts(0, 0), s1.micro_starts(0, 0)])
    assert np.array_equal(np.sort(starts), np.sort(s0.global_starts(0)))


def test_batch_size_errors_name_the_keys(corpus):
    with pytest.raises(ValueError,
                       match=r"data.global_batch_size=10 is not a multiple of data.micro_batch_size=4 x 2 ranks"):
        BatchSampler(corpus.train, 16, 10, 4, 0, 2)
    with pytest.raises(ValueError, match="data.seq_len"):
        BatchSampler(np.zeros(10, dtype=np.uint8), 16, 2, 1, 0, 1)


def test_eval_set_same_forward_count_per_rank_and_weights(corpus):
    sets = [EvalSet(corpus.val, 32, eval_sequences=7, micro_batch_size=2, rank=r, world_size=3) for r in range(3)]
    batches = [list(s.batches()) for s in sets]
    assert len({len(b) for b in batches}) == 1
    assert sum(float(w.sum()) for b in batches for _, _, w in b) == 7
    seqs = sorted(tuple(x[i].tolist()) for b in batches for x, _, w in b for i in range(len(w)) if w[i] > 0)
    one = sorted(tuple(x[i].tolist()) for x, _, w in EvalSet(corpus.val, 32, 7, 4, 0, 1).batches()
                 for i in range(len(w)))
    assert seqs == one
