"""The training loop: data -> model -> engine -> steps, with eval, metrics, checkpoints, summary.

Outputs in ``train.out_dir``:

* ``metrics.jsonl``: one JSON object per line, ``kind`` = ``train`` (step, loss averaged over
  ranks and the steps since the previous line, lr, grad_norm, tokens_per_s, peak_mem_bytes of
  rank 0, elapsed_s), ``eval`` (step, val_loss), ``resume`` (step, world_size) or ``start``.
  On resume, lines of steps after the checkpoint (written by the interrupted run) are dropped
  first, so the file always describes one consistent history.
* ``checkpoints/step_XXXXXXXX/`` every ``train.ckpt_every`` steps and at the end (see ckpt.py).
* ``summary.json`` and ``summary.md``: per-rank bytes/param of params, grads and optimizer state
  and the comparison with the baseline's bytes/param (see memory.py).

Step numbers count completed optimizer steps: the batch of step ``s`` (0-based) is used to
reach step ``s + 1``. The learning rate of step ``s``: linear warmup over ``optim.warmup_steps``
(``lr * (s + 1) / warmup``), then constant, cosine or linear decay to ``lr * min_lr_ratio`` at
``train.steps``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from .. import launch_env
from ..data import BatchSampler, ByteTokenizer, EvalSet, build_corpus
from ..models import build_model, count_params
from ..utils import fmt_bytes
from . import ckpt
from .config import Config, config_to_dict
from .engines import build_engine, cross_entropy, parallel_dims
from .memory import breakdown, cpu_count, format_table, peak_memory_bytes, peak_report, record_allocations
from .optimizers import baseline_of, is_flash

__all__ = ["run_training", "lr_at", "pick_device", "main_train"]


def lr_at(cfg: Config, step: int) -> float:
    """Learning rate for the update made with the batch of (0-based) ``step``."""
    o, total = cfg.optim, cfg.train.steps
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    span = max(1, total - o.warmup_steps)
    progress = min(1.0, max(0.0, (step - o.warmup_steps) / span))
    if o.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    return o.lr * (o.min_lr_ratio + (1.0 - o.min_lr_ratio) * factor)


def pick_device(cfg: Config, local_rank: int) -> torch.device:
    """cuda:<local rank> with CUDA (train.device auto/cuda), else cpu."""
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but CUDA is not available; use train.device=auto or cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


class _Printer:
    """Rank-0 output: a tqdm progress bar when available, plain lines otherwise."""

    def __init__(self, enabled: bool, bar: bool, total: int, initial: int) -> None:
        self.enabled = enabled
        self.bar = None
        self.tty = sys.stderr.isatty()
        if enabled and bar and self.tty:  # in a log file a bar is noise: plain lines instead
            try:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                    mininterval=0.5, file=sys.stderr, leave=True,
                )
            except ImportError:
                self.bar = None

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)
        sys.stdout.flush()

    def update(self, n: int, postfix: dict) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Metrics:
    def __init__(self, path: Path, enabled: bool, resume_step: Optional[int]) -> None:
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                if resume_step is None or rec.get("step", 0) > resume_step:
                    continue
                keep.append(json.dumps(rec))
            path.write_text("".join(k + "\n" for k in keep))

    def write(self, **rec) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")


def _tokenizer(cfg: Config):
    if cfg.data.tokenizer == "hf":
        from ..data import HFTokenizer
        from ..models.hf import load_hf_tokenizer

        return HFTokenizer(load_hf_tokenizer(cfg.model.path))
    return ByteTokenizer()


@torch.no_grad()
def evaluate(engine, evalset: EvalSet, device: torch.device) -> float:
    """Mean validation loss over the fixed eval set (all ranks)."""
    engine.eval_mode(True)
    acc = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y, w in evalset.batches():
        x, y, w = x.to(device), y.to(device), w.to(device)
        with engine._autocast():
            if engine.loss_chunks > 1:  # sequence by sequence, head + loss in slices: no full logits
                per_seq = torch.stack([engine.model(x[i : i + 1], targets=y[i : i + 1], loss_chunks=engine.loss_chunks)
                                       for i in range(x.shape[0])])
            else:
                per_seq = cross_entropy(engine.model(x), y, reduction="none").view(y.shape).mean(dim=1)
        acc[0] += (per_seq.double() * w.double()).sum()
        acc[1] += w.double().sum()
    if dist.is_initialized():
        dist.all_reduce(acc)
    engine.eval_mode(False)
    return float(acc[0] / acc[1].clamp(min=1.0))


def run_training(cfg: Config) -> dict:
    """Train as ``cfg`` says; every rank calls it inside an initialised process group.

    Returns (on every rank) a dict with ``final_step``, ``resumed_from``, ``final_loss``,
    ``final_val_loss``, ``tokens_per_s``, ``rows`` (per-rank memory) and ``n_params``.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    le = launch_env.detect()
    device = pick_device(cfg, le.local_rank)
    torch.set_num_threads(cfg.train.threads or max(1, cpu_count() // max(1, le.local_world_size)))
    out_dir = Path(cfg.train.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    is0 = rank == 0
    if is0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))

    # ---- data: split over the data-parallel ranks (the tensor-parallel ranks of a dp group
    # compute one model replica together and read the same batch)
    dp_rank, dp_size, tp = parallel_dims(cfg, rank, world)
    tok = _tokenizer(cfg)
    corpus = build_corpus(cfg.data.source, cfg.data.val_fraction, tok, cfg.data.max_bytes, cfg.data.include_tests, cfg.data.file_pattern)
    global_bs = cfg.data.global_batch_size or cfg.data.micro_batch_size * dp_size
    sampler = BatchSampler(corpus.train, cfg.data.seq_len, global_bs, cfg.data.micro_batch_size, dp_rank, dp_size, cfg.train.seed)
    evalset = EvalSet(corpus.val, cfg.data.seq_len, cfg.data.eval_sequences, cfg.data.micro_batch_size, dp_rank, dp_size)
    accum = sampler.grad_accum

    # ---- model + engine
    torch.manual_seed(cfg.train.seed)
    flash = is_flash(cfg.optim.name)
    meta = cfg.model.init_device == "meta"
    if cfg.model.init_device == "auto" and cfg.model.source == "gpt" and cfg.engine.name == "fsdp2":
        from ..models import gpt_config_for

        meta = gpt_config_for(cfg.model, corpus.vocab_size, cfg.data.seq_len).num_params() >= 1_000_000_000
    hf_dtype = torch.bfloat16 if flash else torch.float32
    model = build_model(cfg.model, corpus.vocab_size, cfg.data.seq_len, meta=meta, dtype=hf_dtype)
    n_params = count_params(model)
    engine = build_engine(cfg, model, device, accum, meta=meta)
    ck_model, ck_opt = engine.ckpt_targets()

    start = 0
    resumed = None
    resume_s = None
    if cfg.train.resume:
        t_load = time.perf_counter()
        resumed = ckpt.load_latest(ckpt_dir, ck_model, ck_opt)
        resume_s = time.perf_counter() - t_load if resumed is not None else None
        start = resumed or 0
    metrics = _Metrics(out_dir / "metrics.jsonl", is0, resumed if resumed is not None else (0 if cfg.train.resume else None))
    tokens_per_step = global_bs * cfg.data.seq_len
    if is0:
        print(
            f"[flashoptim-dist] {cfg.model.source}:{cfg.model.preset if cfg.model.source == 'gpt' else cfg.model.path} "
            f"{n_params:,} params | engine {cfg.engine.name} x {world} ranks ({le.launcher}) on {device.type} | "
            f"{cfg.optim.name}{' + gradient release' if cfg.optim.gradient_release else ''} | "
            f"data {corpus.source}: {len(corpus.train):,} train / {len(corpus.val):,} val tokens from {corpus.n_files} files | "
            f"global batch {global_bs} x {cfg.data.seq_len} tokens ({accum} accumulation steps)"
            + "".join(f" | {what}" for what, on in (
                (engine.layout, bool(engine.layout)),
                ("activation checkpointing", cfg.model.activation_checkpointing),
                (f"loss in {cfg.model.loss_chunks} slices", cfg.model.loss_chunks > 1)) if on),
            flush=True,
        )
        if resumed is not None:
            print(f"[flashoptim-dist] resumed from step {resumed} ({ckpt_dir}) on {world} ranks "
                  f"in {resume_s:.1f} s", flush=True)
            metrics.write(kind="resume", step=resumed, world_size=world, time=time.time(), load_s=resume_s)
        else:
            metrics.write(kind="start", step=0, world_size=world, n_params=n_params, time=time.time())

    printer = _Printer(is0, cfg.train.progress, cfg.train.steps, start)
    loss_window = torch.zeros(2, dtype=torch.float64, device=device)
    step_time = 0.0
    window_tokens = 0
    last_loss = float("nan")
    last_val: Optional[float] = None
    last_ckpt_step = None
    last_ckpt = None  # rank 0: step, bytes and seconds of the last save
    mem = None
    grad_norm = None
    t_begin = time.time()
    final_step = start
    stop_after = cfg.train.stop_after
    tps = 0.0
    # Train mode before the first step: Hugging Face's from_pretrained returns its model in eval
    # mode, where its gradient checkpointing (and dropout) stays off until the first evaluation
    # switches it back (measured: 9.0 GiB of saved activations instead of ~1, docs/PERFORMANCE.md).
    engine.eval_mode(False)

    for step in range(start, cfg.train.steps):
        completed = step + 1
        is_final = completed == cfg.train.steps or (stop_after is not None and completed >= stop_after)
        t0 = time.perf_counter()
        lr = lr_at(cfg, step)
        engine.set_lr(lr)
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        report_peak = completed == cfg.train.peak_report_step and device.type == "cuda" and is0
        if report_peak:
            record_allocations(True)
        for micro in range(accum):
            x, y = sampler.get(step, micro)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with engine.micro_context(micro == accum - 1):
                loss = engine.loss(x, y)
                engine.backward(loss, accum)
            step_loss += loss.detach().double() / accum

        def capture():
            nonlocal mem
            mem = breakdown(engine)

        grad_norm = engine.step(cfg.train.max_grad_norm, before_zero_grad=capture if is_final else None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_time += time.perf_counter() - t0
        if report_peak:  # after the timing: replaying the trace takes a while
            snapshot = torch.cuda.memory._snapshot()
            record_allocations(False)
            print(peak_report(snapshot, device.index or 0, top=24, title=f"of step {completed}, rank 0"), flush=True)
        elif completed == cfg.train.peak_report_step and is0 and device.type != "cuda":
            print("[flashoptim-dist] train.peak_report_step: the allocator trace needs CUDA; skipped", flush=True)
        window_tokens += tokens_per_step
        loss_window[0] += step_loss
        loss_window[1] += 1
        final_step = completed

        if completed % cfg.train.log_every == 0 or is_final:
            if dist.is_initialized():
                dist.all_reduce(loss_window)
            last_loss = float(loss_window[0] / loss_window[1])
            tps = window_tokens / max(step_time, 1e-9)
            peak = peak_memory_bytes(device)
            metrics.write(
                kind="train", step=completed, loss=last_loss, lr=lr, grad_norm=grad_norm,
                tokens_per_s=tps, peak_mem_bytes=peak, elapsed_s=time.time() - t_begin,
            )
            if printer.bar is None:
                printer.line(
                    f"step {completed}/{cfg.train.steps} loss {last_loss:.4f} lr {lr:.2e} "
                    f"tok/s {tps:,.0f} mem {fmt_bytes(peak, sep='')}"
                )
            loss_window.zero_()
            step_time, window_tokens = 0.0, 0
            printer.update(0, {"loss": f"{last_loss:.3f}", "tok/s": f"{tps:,.0f}", "mem": fmt_bytes(peak, sep='')})
        printer.update(1, {})

        interrupted = stop_after is not None and completed >= stop_after and completed < cfg.train.steps
        if interrupted:
            printer.line(f"[flashoptim-dist] stopping after step {completed} (train.stop_after)")
            break
        if (cfg.train.eval_every and completed % cfg.train.eval_every == 0) or is_final:
            last_val = evaluate(engine, evalset, device)
            metrics.write(kind="eval", step=completed, val_loss=last_val)
            printer.line(f"step {completed}: val_loss {last_val:.4f}")
        if cfg.train.ckpt_every and (completed % cfg.train.ckpt_every == 0 or is_final):
            t_save = time.perf_counter()
            saved = ckpt.save_train_state(
                ckpt_dir, completed, ck_model, ck_opt,
                extra={"config": config_to_dict(cfg), "loss": last_loss, "val_loss": last_val},
                keep=cfg.train.keep_checkpoints,
            )
            save_s = time.perf_counter() - t_save
            last_ckpt_step = completed
            if is0:  # (the save ends with a barrier: every rank's files are there)
                size = ckpt.dir_bytes(saved)
                last_ckpt = {"step": completed, "bytes": size, "save_s": save_s}
                metrics.write(kind="checkpoint", **last_ckpt)
                printer.line(f"step {completed}: checkpoint saved ({size / 1e9:.2f} GB, "
                             f"{size / max(n_params, 1):.2f} B/param, {save_s:.1f} s)")
    printer.close()

    if mem is None:  # nothing trained in this invocation (already at train.steps) or stopped
        mem = breakdown(engine)
        if last_val is None and cfg.train.stop_after is None:
            last_val = evaluate(engine, evalset, device)
    row = dict(mem, rank=rank, peak_bytes=peak_memory_bytes(device), device=str(device))
    rows = [None] * world
    if dist.is_initialized() and world > 1:
        dist.all_gather_object(rows, row)
    else:
        rows = [row]
    table = format_table(rows, cfg.optim.name, baseline_of(cfg.optim.name), cfg.engine.name, tp_size=tp)
    result = {
        "optimizer": cfg.optim.name,
        "engine": cfg.engine.name,
        "world_size": world,
        "tp_size": tp,
        "layout": engine.layout,
        "n_params": n_params,
        "final_step": final_step,
        "resumed_from": resumed,
        "final_loss": last_loss,
        "final_val_loss": last_val,
        "tokens_per_s": tps,
        "rows": rows,
        "last_checkpoint": last_ckpt_step,
        "checkpoint": last_ckpt,
        "resume_s": resume_s,
    }
    if is0:
        print(f"\n[flashoptim-dist] summary ({cfg.optim.name}, {cfg.engine.name} x {world}, step {final_step}, "
              f"val_loss {last_val if last_val is None else round(last_val, 4)})\n{table}", flush=True)
        (out_dir / "summary.md").write_text(table + "\n")
        (out_dir / "summary.json").write_text(json.dumps(result, indent=1))
    engine.close()
    return result


def in_process_group(fn, cfg: Config):
    """Start the process group, return ``fn(cfg)``, end cleanly (barrier + destroy)."""
    launch_env.init_distributed(cfg.engine.backend, cfg.engine.timeout_minutes)
    try:
        result = fn(cfg)
    except BaseException:
        # No barrier here: another rank may be stuck in a collective and would never arrive.
        shutdown(clean=False)
        raise
    shutdown()
    return result


def main_train(cfg: Config) -> dict:
    """Start the process group, run :func:`run_training`, end cleanly (barrier + destroy)."""
    return in_process_group(run_training, cfg)


def shutdown(clean: bool = True) -> None:
    """End the process group: ``barrier`` (when ``clean``) then ``destroy_process_group``."""
    if dist.is_initialized():
        try:
            if clean:
                dist.barrier()
        finally:
            dist.destroy_process_group()
