"""model.init_device=meta with engine.name=single: built on meta, materialised on the device in the
final dtype (no fp32 copy of the model, no host copy on CUDA), with the weights of init_device=cpu."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared helpers
from launch_helpers import TINY, checkpoint_steps, preserved_environ, train_losses  # noqa: E402

from flashoptim_dist.models import build_model, count_params  # noqa: E402
from flashoptim_dist.models.gpt import GPT  # noqa: E402
from flashoptim_dist.train import trainer as trainer_mod  # noqa: E402
from flashoptim_dist.train.config import ConfigError, load_config  # noqa: E402
from flashoptim_dist.train.engines import build_engine  # noqa: E402
from flashoptim_dist.train.trainer import main_train  # noqa: E402

_CPU = torch.device("cpu")


def _cfg(init_device: str, *extra: str, engine: str = "single"):
    return load_config(None, ["model.preset=tiny", f"engine.name={engine}", f"model.init_device={init_device}",
                              *extra])


def _build(cfg, seed: int = 7):
    """What the trainer does (Trainer._build_model_and_engine) for a byte-level 64-token run."""
    meta = cfg.model.init_device == "meta"
    torch.manual_seed(seed)
    model = build_model(cfg.model, 256, 64, meta=meta)
    return model, build_engine(cfg, model, _CPU, 1, meta=meta)


class _LiveFP32(TorchDispatchMode):
    """Peak bytes of fp32 host/device storage alive at once, over every op run under the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        for t in tree_iter(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type != "meta":
                s = t.untyped_storage()
                self.live.setdefault(s._cdata, (StorageWeakRef(s), s.nbytes()))
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


@pytest.mark.parametrize("optim", ["FlashAdamW", "AdamW"])
@pytest.mark.parametrize("tie", ["true", "false"])
def test_meta_init_is_bit_identical_to_cpu_init(optim, tie):
    """Same seed: the same weights bit for bit, the same dtypes (bf16 for Flash, fp32 for the
    baseline), the head still tied to the embedding, and the CPU generator left in the same state
    (replay_constructor_rng draws what GPT(cfg) on the CPU draws before init_weights)."""
    extra = (f"optim.name={optim}", f"model.tie_embeddings={tie}")
    ref, _ = _build(_cfg("cpu", *extra))
    after_ref = torch.rand(4)
    model, eng = _build(_cfg("meta", *extra))
    after = torch.rand(4)
    assert torch.equal(after, after_ref)
    assert not any(p.is_meta for p in model.parameters())
    want = torch.bfloat16 if optim == "FlashAdamW" else torch.float32
    a, b = ref.state_dict(), model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == a[k].dtype == want, k
        assert torch.equal(a[k], b[k]), k
    assert (model.head.weight is model.tok_emb.weight) == (tie == "true")
    assert count_params(model) == count_params(ref)
    # the optimizer holds the model's parameters (once each, tied or not)
    opt_params = [p for g in eng.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in opt_params} == {id(p) for p in model.parameters()}


def test_meta_init_never_holds_an_fp32_copy():
    """Peak fp32 storage alive while building model + engine: the whole model on the old path
    (init_device=cpu: built in fp32, then cast), one module's fp32 scratch (the RNG replay of the
    largest of them, here the embedding or the head, ~12% of the tiny model) with init_device=meta."""
    n = None
    peaks = {}
    for init in ("cpu", "meta"):
        with _LiveFP32() as mode:
            model, _ = _build(_cfg(init, "optim.name=FlashAdamW", "model.tie_embeddings=false"))
        n = count_params(model)
        peaks[init] = mode.peak / (4 * n)  # in units of "one fp32 copy of the model"
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert peaks["cpu"] >= 1.0, peaks  # the check sees the old path's fp32 copy
    largest = max(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)))
    assert peaks["meta"] <= largest / n + 1e-6, peaks


def test_single_meta_builds_the_gpt_on_meta(monkeypatch):
    """The GPT constructor runs on the meta device (no parameter storage) and every parameter is
    first allocated in bf16."""
    seen = []
    init = GPT.__init__

    def spy(self, cfg):
        init(self, cfg)
        seen.append({(p.device.type, p.dtype) for p in self.parameters()})

    monkeypatch.setattr(GPT, "__init__", spy)
    with _LiveFP32() as mode:
        model, _ = _build(_cfg("meta", "optim.name=FlashAdamW", "model.tie_embeddings=true"))
    assert seen == [{("meta", torch.float32)}]
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cpu", torch.bfloat16)}
    assert mode.peak < 4 * count_params(model) / 2


def test_auto_picks_meta_for_single_at_1b(monkeypatch, tmp_path):
    """init_device=auto: meta for presets of >= 1B parameters under single as under fsdp2; cpu below
    and under ddp. The model build is intercepted (nothing is allocated)."""
    picked = []

    class Stop(Exception):
        pass

    def fake_build(model_cfg, vocab, seq_len, meta=False, dtype=None):
        picked.append(meta)
        raise Stop

    monkeypatch.setattr(trainer_mod, "build_model", fake_build)
    for preset, engine, want in (("1b", "single", True), ("small", "single", False), ("1b", "fsdp2", True)):
        cfg = load_config(None, [*TINY, f"model.preset={preset}", f"engine.name={engine}", "model.init_device=auto",
                                 f"train.out_dir={tmp_path / preset}", "train.threads=1"])
        with preserved_environ(), pytest.raises(Stop):
            trainer_mod.Trainer(cfg)
        assert picked[-1] is want, (preset, engine)


@pytest.mark.parametrize("engine", ["ddp", "fsdp1", "zero2"])
def test_meta_init_still_refused_elsewhere(engine):
    with pytest.raises(ConfigError, match="init_device='meta' is invalid with engine.name="):
        _cfg("meta", engine=engine)
    with pytest.raises(ConfigError, match="model.source"):
        load_config(None, ["model.source=hf", f"model.path={Path(__file__).parent}", "model.init_device=meta"])


def _train(out: Path, *extra: str) -> dict:
    cfg = load_config(None, [*TINY, "engine.name=single", f"train.out_dir={out}", "train.threads=1",
                             "optim.gradient_release=true", "data.global_batch_size=4", "train.max_grad_norm=0",
                             *extra])
    with preserved_environ():
        return main_train(cfg)


def test_gradient_release_meta_trains_and_resumes(tmp_path):
    """Gradient release + single + init_device=meta: trains, resumes from a checkpoint to the
    uninterrupted run's losses, and (weights bit-identical at init on the CPU) matches the
    init_device=cpu run. Without clipping: with it the release hooks clip with the previous step's
    norm, which a checkpoint does not hold, so a resumed run differs from the step after the resume
    on (init_device=cpu as well)."""
    full, part, cpu = tmp_path / "full", tmp_path / "part", tmp_path / "cpu"
    _train(full, "model.init_device=meta", "train.steps=6", "train.ckpt_every=3")
    _train(cpu, "model.init_device=cpu", "train.steps=6", "train.ckpt_every=0")
    _train(part, "model.init_device=meta", "train.steps=6", "train.ckpt_every=3", "train.stop_after=4")
    assert checkpoint_steps(part) == [3]
    res = _train(part, "model.init_device=meta", "train.steps=6", "train.ckpt_every=3")
    assert res["resumed_from"] == 3 and res["final_step"] == 6
    a, b, c = train_losses(full), train_losses(part), train_losses(cpu)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert a[6] < a[1]
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], abs=1e-5), (step, a, b)
    for step in a:
        assert a[step] == pytest.approx(c[step], abs=1e-6), (step, a, c)
