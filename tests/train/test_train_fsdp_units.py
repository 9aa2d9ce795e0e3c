"""The trainer's FSDP engines on 2 gloo ranks: which modules become FSDP units
(engine.shard_embeddings) and the sliced loss (model.loss_chunks) through Engine.loss."""

from __future__ import annotations

import torch

from dist_utils import run_distributed


def _engine(*overrides, engine="fsdp2"):
    from flashoptim_dist.models.gpt import GPT, preset
    from flashoptim_dist.train.config import load_config
    from flashoptim_dist.train.engines import build_engine

    cfg = load_config(None, ["model.preset=tiny", f"engine.name={engine}", *overrides])
    torch.manual_seed(0)
    tie = "model.tie_embeddings=true" in overrides
    model = GPT(preset("tiny", vocab_size=96, max_seq_len=32, tie_embeddings=tie))
    return build_engine(cfg, model, torch.device("cpu"), 1)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A copy of this rank's part of ``t`` (the local shard of a DTensor, else ``t``)."""
    return getattr(t, "_local_tensor", t).detach().clone()


def _train_steps(eng, x: torch.Tensor, steps: int, max_grad_norm: float = 1.0) -> list:
    """``steps`` optimizer steps on the micro-batch ``x`` through the engine; the losses."""
    losses = []
    for _ in range(steps):
        loss = eng.loss(x[:, :-1], x[:, 1:])
        eng.backward(loss, 1)
        eng.step(max_grad_norm)
        losses.append(float(loss))
    return losses


def _units_worker(rank, world):
    from torch.distributed.fsdp import FSDPModule

    out = {}
    for name, overrides in {
        "default": (),
        "off": ("engine.shard_embeddings=false",),
        "tied": ("model.tie_embeddings=true",),
    }.items():
        m = _engine(*overrides).module
        out[name] = (isinstance(m.tok_emb, FSDPModule), isinstance(m.head, FSDPModule),
                     all(isinstance(b, FSDPModule) for b in m.blocks))
    # the same micro-batch through Engine.loss with 1 and with 3 slices: same loss and gradients
    g = torch.Generator().manual_seed(7 + rank)
    x = torch.randint(0, 96, (2, 17), generator=g)
    from flashoptim_dist.models.gpt import LMHead

    calls = []
    inner = LMHead._loss_sum
    LMHead._loss_sum = lambda self, h, t: (calls.append(h.shape[0]), inner(self, h, t))[1]
    losses, grads = [], []
    for k in (1, 3):
        eng = _engine(f"model.loss_chunks={k}")
        calls.clear()
        loss = eng.loss(x[:, :-1], x[:, 1:])
        out[f"slices{k}"] = list(calls)  # token rows per call of the head's loss in forward
        eng.backward(loss, 1)
        losses.append(float(loss))
        grads.append({n: p.grad.to_local().float().clone() for n, p in eng.module.named_parameters()})
    out["losses"] = losses
    out["grad_err"] = max(float((grads[0][n] - grads[1][n]).abs().max() / grads[0][n].abs().max().clamp_min(1e-30))
                          for n in grads[0])
    return out


def test_fsdp2_units_and_sliced_loss():
    for r in run_distributed(_units_worker, 2):
        assert r["default"] == (True, True, True)  # embedding, head, blocks: units of their own
        assert r["off"] == (False, False, True)  # engine.shard_embeddings=false: in the root unit
        assert r["tied"] == (False, False, True)  # a tied weight stays in the root unit
        assert r["slices1"] == [] and r["slices3"] == [11, 11, 10]  # full logits; 32 tokens in 3 slices
        full, sliced = r["losses"]
        # same per-token losses, summed in another order (fp32)
        assert abs(full - sliced) <= 1e-5 * abs(full), r["losses"]
        # bf16 grads: the head's weight gradient is summed over 3 slices instead of in one matmul
        assert r["grad_err"] <= 2**-6, r["grad_err"]


def _resume_worker(rank, world, ckpt_dir):
    """A checkpoint written with embedding and head in the root unit (the layout before
    engine.shard_embeddings) resumes into units of their own, and back: same params and state."""
    import torch.distributed as dist

    from flashoptim_dist.train import ckpt

    x = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(3 + rank))

    def snapshot(eng):  # this rank's params and optimizer state, by parameter name
        snap = {}
        for n, p in eng.module.named_parameters():
            snap[n] = _local(p)
            for k, v in eng.optimizer.state.get(p, {}).items():
                if torch.is_tensor(v):
                    snap[f"{n}/{k}"] = _local(v)
        return snap

    out = {}
    for name, save_with, load_with in (("root_to_units", ("engine.shard_embeddings=false",), ()),
                                       ("units_to_root", (), ("engine.shard_embeddings=false",))):
        src = _engine(*save_with)
        _train_steps(src, x, 1, max_grad_norm=0.0)
        ckpt.save_train_state(f"{ckpt_dir}/{name}", 1, src.module, src.optimizer)
        dst = _engine(*load_with)
        assert ckpt.load_latest(f"{ckpt_dir}/{name}", dst.module, dst.optimizer) == 1
        a, b = snapshot(src), snapshot(dst)
        out[name] = (sorted(a) == sorted(b), [k for k in a if not torch.equal(a[k], b[k])])
        dist.barrier()
    return out


def test_checkpoint_moves_between_unit_layouts(tmp_path):
    for r in run_distributed(_resume_worker, 2, str(tmp_path)):
        for name, (same_keys, differing) in r.items():
            assert same_keys and not differing, (name, differing)


def _hf_worker(rank, world, path):
    """A Hugging Face Llama (untied head) through the trainer's FSDP2 engine: embedding and head
    become units of their own and training is bit-identical to the root-unit layout; the sliced
    loss under FSDP2 and FSDP1 (where the head is an FSDP1 wrapper around the LMHead)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from flashoptim_dist.models import build_model
    from flashoptim_dist.train.config import load_config
    from flashoptim_dist.train.engines import build_engine

    x = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(5 + rank))
    out = {}
    for name, extra in (("units", ()), ("root", ("engine.shard_embeddings=false",)),
                        ("sliced", ("model.loss_chunks=3",)),
                        ("fsdp1_sliced", ("model.loss_chunks=3", "engine.name=fsdp1"))):
        cfg = load_config(None, ["model.source=hf", f"model.path={path}", "engine.name=fsdp2", *extra])
        torch.manual_seed(0)
        eng = build_engine(cfg, build_model(cfg.model, vocab_size=256, seq_len=16, dtype=torch.bfloat16),
                           torch.device("cpu"), 1)
        hf = eng.module.hf
        unit = FSDP if cfg.engine.name == "fsdp1" else FSDPModule
        out[name + "_wrapped"] = (isinstance(hf.get_input_embeddings(), unit),
                                  isinstance(hf.get_output_embeddings(), unit))
        out[name] = (_train_steps(eng, x, 3), {n: _local(p) for n, p in eng.module.named_parameters()})
    return out


def test_fsdp2_units_of_a_hugging_face_model(tmp_path):
    from optional_deps import require_module

    transformers = require_module("transformers")
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    for r in run_distributed(_hf_worker, 2, str(tmp_path)):
        assert r["units_wrapped"] == (True, True) and r["root_wrapped"] == (False, False)
        (la, pa), (lb, pb) = r["units"], r["root"]
        assert la == lb and la[-1] < la[0], (la, lb)
        assert all(torch.equal(pa[n], pb[n]) for n in pa)
        # head + loss in 3 slices (the head unit's weight gathered once per pass): the same loss
        # on the same weights; later steps differ by the bf16 rounding of the sliced head gradient
        lu, lsl = r["units"][0], r["sliced"][0]
        assert r["sliced_wrapped"] == (True, True)
        assert abs(lsl[0] - lu[0]) <= 1e-5 * lu[0], (lu, lsl)  # measured: equal
        assert max(abs(a - b) for a, b in zip(lu, lsl)) <= 1e-3, (lu, lsl)  # measured: ≤ 1.1e-4
        l1 = r["fsdp1_sliced"][0]
        assert r["fsdp1_sliced_wrapped"] == (True, True)
        assert abs(l1[0] - lu[0]) <= 1e-5 * lu[0] and max(abs(a - b) for a, b in zip(lu, l1)) <= 1e-3, (lu, l1)


def _fsdp1_worker(rank, world):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    x = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(11 + rank))
    out = {}
    for name, extra in (("units", ()), ("root", ("engine.shard_embeddings=false",))):
        eng = _engine(*extra, engine="fsdp1")
        inner = eng.model.module
        out[name + "_wrapped"] = (isinstance(inner.tok_emb, FSDP), isinstance(inner.head, FSDP),
                                  all(isinstance(b, FSDP) for b in inner.blocks))
        out[name] = _train_steps(eng, x, 3)
    return out


def test_fsdp1_units():
    """FSDP1 keeps its root unit gathered through backward too: embedding and untied head get
    units of their own by default, and training follows the root-unit layout (the flat
    parameters differ, so the Flash groups cut at their edges differ: close, not bitwise)."""
    for r in run_distributed(_fsdp1_worker, 2):
        assert r["units_wrapped"] == (True, True, True) and r["root_wrapped"] == (False, False, True)
        assert r["units"][0] == r["root"][0], r  # same weights, same first loss
        assert max(abs(a - b) for a, b in zip(r["units"], r["root"])) <= 1e-3, r
