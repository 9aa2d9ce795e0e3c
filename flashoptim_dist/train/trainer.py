"""The training loop: data -> model -> engine -> steps, with eval, metrics, checkpoints, summary.

:class:`Trainer` holds a run (built in ``__init__``, looped by ``train()``, in the spirit of
torchtitan's Trainer: override ``train_step``/``forward_backward_step`` or the logging,
evaluation and checkpoint hooks in a subclass); :func:`run_training` is ``Trainer(cfg).train()``.

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
from .config import META_INIT_ENGINES, Config, config_to_dict
from .engines import build_engine, parallel_dims
from .flops import flops_per_token, mfu, peak_flops
from .memory import breakdown, cpu_count, format_table, peak_memory_bytes, peak_report, record_allocations
from .optimizers import baseline_of, is_flash

__all__ = ["Trainer", "run_training", "lr_at", "pick_device", "main_train", "read_metrics"]


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


def read_metrics(path) -> list:
    """The records of a run's ``metrics.jsonl`` (module doc), in order; [] when there is none.
    A line that does not parse (cut by a crash mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class _Metrics:
    def __init__(self, path: Path, enabled: bool, resume_step: Optional[int]) -> None:
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            # a resumed run keeps the records up to its checkpoint's step; a fresh run starts over
            keep = [rec for rec in read_metrics(path) if resume_step is not None and rec.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(k) + "\n" for k in keep))

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
        per_seq = engine.sequence_losses(x, y)
        acc[0] += (per_seq.double() * w.double()).sum()
        acc[1] += w.double().sum()
    if dist.is_initialized():
        dist.all_reduce(acc)
    engine.eval_mode(False)
    return float(acc[0] / acc[1].clamp(min=1.0))


class Trainer:
    """One training run: ``Trainer(cfg).train()`` on every rank, inside a process group.

    ``__init__`` does everything that precedes the first step (output folder, data, model,
    engine, resuming, the start line); :meth:`train` runs the loop and returns :meth:`summary`.
    A step is :meth:`train_step` (learning rate, micro-steps through
    :meth:`forward_backward_step`, clip + optimizer step); after it come three hooks, each a
    ``should_*`` test and an action, for a subclass to override: :meth:`log_metrics`,
    :meth:`run_eval` and :meth:`save_checkpoint`.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.launch = launch_env.detect()
        self.device = pick_device(cfg, self.launch.local_rank)
        torch.set_num_threads(cfg.train.threads or max(1, cpu_count() // max(1, self.launch.local_world_size)))
        self.out_dir = Path(cfg.train.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.is_rank0 = self.rank == 0
        if self.is_rank0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
        self._build_data()
        self._build_model_and_engine()
        self._resume()
        self.metrics = _Metrics(self.out_dir / "metrics.jsonl", self.is_rank0,
                                self.resumed if self.resumed is not None else (0 if cfg.train.resume else None))
        if self.is_rank0:
            self._announce()
        # loop state: the metrics window since the last log line, and what the summary reports
        self.loss_window = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.step_time = 0.0
        self.window_tokens = 0
        self.lr = 0.0
        self.grad_norm: Optional[float] = None
        self.last_loss = float("nan")
        self.last_val: Optional[float] = None
        self.last_ckpt_step: Optional[int] = None
        self.last_ckpt: Optional[dict] = None  # rank 0: step, bytes and seconds of the last save
        self.mem: Optional[dict] = None
        self.final_step = self.start
        self.tps = 0.0
        self.mfu: Optional[float] = None
        self.printer: Optional[_Printer] = None

    # -- setup ----------------------------------------------------------------------------------
    def _build_data(self) -> None:
        """Corpus, batch sampler and eval set, split over the data-parallel ranks (the
        tensor-parallel ranks of a dp group compute one model replica together and read the
        same batch)."""
        cfg = self.cfg
        self.dp_rank, self.dp_size, self.tp = parallel_dims(cfg, self.rank, self.world)
        d = cfg.data
        self.corpus = build_corpus(
            d.source, d.val_fraction, _tokenizer(cfg), d.max_bytes, d.include_tests, d.file_pattern
        )
        self.global_bs = d.global_batch_size or d.micro_batch_size * self.dp_size
        self.sampler = BatchSampler(
            self.corpus.train, d.seq_len, self.global_bs, d.micro_batch_size, self.dp_rank, self.dp_size, cfg.train.seed
        )
        self.evalset = EvalSet(
            self.corpus.val, d.seq_len, d.eval_sequences, d.micro_batch_size, self.dp_rank, self.dp_size
        )
        self.accum = self.sampler.grad_accum
        self.tokens_per_step = self.global_bs * d.seq_len

    def _build_model_and_engine(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        flash = is_flash(cfg.optim.name)
        meta = cfg.model.init_device == "meta"
        if cfg.model.init_device == "auto" and cfg.model.source == "gpt" and cfg.engine.name in META_INIT_ENGINES:
            from ..models import gpt_config_for

            meta = gpt_config_for(cfg.model, self.corpus.vocab_size, cfg.data.seq_len).num_params() >= 1_000_000_000
        hf_dtype = torch.bfloat16 if flash else torch.float32
        model = build_model(cfg.model, self.corpus.vocab_size, cfg.data.seq_len, meta=meta, dtype=hf_dtype)
        self.n_params = count_params(model)
        # MFU as torchtitan reports it (train/flops.py): counted on the unwrapped model (meta works)
        self.flops_token = flops_per_token(model, cfg.data.seq_len)
        self.peak_flops = peak_flops(self.device, cfg.train.peak_tflops)
        self.engine = build_engine(cfg, model, self.device, self.accum, meta=meta)
        self.ck_model, self.ck_opt = self.engine.ckpt_targets()

    def _resume(self) -> None:
        """With train.resume: load the newest checkpoint; ``start`` is the step to train next."""
        self.start, self.resumed, self.resume_s = 0, None, None
        if self.cfg.train.resume:
            t_load = time.perf_counter()
            extra: dict = {}
            self.resumed = ckpt.load_latest(self.ckpt_dir, self.ck_model, self.ck_opt, extra_out=extra)
            clip = extra.get("grad_clip")  # clipping with gradient release: the last measured norm
            if clip is not None and hasattr(self.engine.grad_release, "load_state_dict"):
                self.engine.grad_release.load_state_dict(clip)
            self.resume_s = time.perf_counter() - t_load if self.resumed is not None else None
            self.start = self.resumed or 0

    def _announce(self) -> None:
        """Rank 0: the run's one-line description, the resume line, and the first metrics record."""
        cfg, corpus, engine = self.cfg, self.corpus, self.engine
        print(
            f"[flashoptim-dist] {cfg.model.source}:{cfg.model.preset if cfg.model.source == 'gpt' else cfg.model.path} "
            f"{self.n_params:,} params | engine {cfg.engine.name} x {self.world} ranks ({self.launch.launcher}) on "
            f"{self.device.type} | {cfg.optim.name}{' + gradient release' if cfg.optim.gradient_release else ''} | "
            f"data {corpus.source}: {len(corpus.train):,} train / {len(corpus.val):,} val tokens from "
            f"{corpus.n_files} files | "
            f"global batch {self.global_bs} x {cfg.data.seq_len} tokens ({self.accum} accumulation steps)"
            + "".join(
                f" | {what}"
                for what, on in (
                    (engine.layout, bool(engine.layout)),
                    ("activation checkpointing", cfg.model.activation_checkpointing),
                    (f"loss in {cfg.model.loss_chunks} slices", cfg.model.loss_chunks > 1),
                )
                if on
            ),
            flush=True,
        )
        if self.resumed is not None:
            print(
                f"[flashoptim-dist] resumed from step {self.resumed} ({self.ckpt_dir}) on {self.world} ranks "
                f"in {self.resume_s:.1f} s",
                flush=True,
            )
            self.metrics.write(
                kind="resume", step=self.resumed, world_size=self.world, time=time.time(), load_s=self.resume_s
            )
        else:
            self.metrics.write(kind="start", step=0, world_size=self.world, n_params=self.n_params, time=time.time())

    # -- one step -------------------------------------------------------------------------------
    def forward_backward_step(self, x: torch.Tensor, y: torch.Tensor, is_last: bool) -> torch.Tensor:
        """Forward + backward of one micro-batch (gradient sync only when ``is_last``, the last
        micro-step of the step); returns the micro-batch's mean loss, detached."""
        with self.engine.micro_context(is_last):
            loss = self.engine.loss(x, y)
            self.engine.backward(loss, self.accum)
        return loss.detach()

    def train_step(self, step: int, is_final: bool = False) -> torch.Tensor:
        """The optimizer step made with the batch of (0-based) ``step``: learning rate, every
        micro-step, clip + step (``grad_norm``). On the ``is_final`` step the memory breakdown
        is taken before the gradients are freed. Returns this rank's mean loss (fp64)."""
        self.lr = lr_at(self.cfg, step)
        self.engine.set_lr(self.lr)
        step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro in range(self.accum):
            x, y = self.sampler.get(step, micro)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            step_loss += self.forward_backward_step(x, y, micro == self.accum - 1).double() / self.accum
        self.grad_norm = self.engine.step(
            self.cfg.train.max_grad_norm, before_zero_grad=self._capture_memory if is_final else None
        )
        return step_loss

    def _capture_memory(self) -> None:
        self.mem = breakdown(self.engine)

    def _peak_report_begin(self, completed: int) -> bool:
        """train.peak_report_step: start recording the allocator (CUDA, rank 0); True if it did."""
        report = completed == self.cfg.train.peak_report_step and self.device.type == "cuda" and self.is_rank0
        if report:
            record_allocations(True)
        return report

    def _peak_report_end(self, completed: int, recording: bool) -> None:
        if recording:  # after the timing: replaying the trace takes a while
            snapshot = torch.cuda.memory._snapshot()
            record_allocations(False)
            print(
                peak_report(snapshot, self.device.index or 0, top=24, title=f"of step {completed}, rank 0"), flush=True
            )
        elif completed == self.cfg.train.peak_report_step and self.is_rank0 and self.device.type != "cuda":
            print("[flashoptim-dist] train.peak_report_step: the allocator trace needs CUDA; skipped", flush=True)

    # -- hooks ----------------------------------------------------------------------------------
    def should_log(self, completed: int, is_final: bool) -> bool:
        return completed % self.cfg.train.log_every == 0 or is_final

    def log_metrics(self, completed: int) -> None:
        """A ``train`` metrics line: loss averaged over ranks and the steps since the last line."""
        if dist.is_initialized():
            dist.all_reduce(self.loss_window)
        self.last_loss = float(self.loss_window[0] / self.loss_window[1])
        self.tps = self.window_tokens / max(self.step_time, 1e-9)
        self.mfu = mfu(self.flops_token, self.tps, self.peak_flops, self.world)
        peak = peak_memory_bytes(self.device)
        self.metrics.write(
            kind="train",
            step=completed,
            loss=self.last_loss,
            lr=self.lr,
            grad_norm=self.grad_norm,
            tokens_per_s=self.tps,
            mfu=self.mfu,
            peak_mem_bytes=peak,
            elapsed_s=time.time() - self.t_begin,
        )
        if self.printer.bar is None:
            self.printer.line(
                f"step {completed}/{self.cfg.train.steps} loss {self.last_loss:.4f} lr {self.lr:.2e} "
                f"tok/s {self.tps:,.0f}{'' if self.mfu is None else f' mfu {100 * self.mfu:.1f}%'} "
                f"mem {fmt_bytes(peak, sep='')}"
            )
        self.loss_window.zero_()
        self.step_time, self.window_tokens = 0.0, 0
        self.printer.update(
            0, {"loss": f"{self.last_loss:.3f}", "tok/s": f"{self.tps:,.0f}", "mem": fmt_bytes(peak, sep="")}
        )

    def should_evaluate(self, completed: int, is_final: bool) -> bool:
        every = self.cfg.train.eval_every
        return bool(every and completed % every == 0) or is_final

    def evaluate(self) -> float:
        """Mean validation loss over the fixed eval set (all ranks take part)."""
        return evaluate(self.engine, self.evalset, self.device)

    def run_eval(self, completed: int) -> None:
        self.last_val = self.evaluate()
        self.metrics.write(kind="eval", step=completed, val_loss=self.last_val)
        self.printer.line(f"step {completed}: val_loss {self.last_val:.4f}")

    def should_checkpoint(self, completed: int, is_final: bool) -> bool:
        every = self.cfg.train.ckpt_every
        return bool(every) and (completed % every == 0 or is_final)

    def checkpoint_extra(self) -> dict:
        """The JSON data saved with a checkpoint: the config, the last losses and, with gradient
        release and clipping, the clipping state the next step needs (``_resume`` restores it)."""
        extra = {"config": config_to_dict(self.cfg), "loss": self.last_loss, "val_loss": self.last_val}
        if hasattr(self.engine.grad_release, "state_dict"):
            extra["grad_clip"] = self.engine.grad_release.state_dict()
        return extra

    def save_checkpoint(self, completed: int) -> None:
        """Save the train state of step ``completed`` (see ckpt.py); rank 0 records its size."""
        cfg = self.cfg
        t_save = time.perf_counter()
        saved = ckpt.save_train_state(
            self.ckpt_dir,
            completed,
            self.ck_model,
            self.ck_opt,
            extra=self.checkpoint_extra(),
            keep=cfg.train.keep_checkpoints,
        )
        save_s = time.perf_counter() - t_save
        self.last_ckpt_step = completed
        if self.is_rank0:  # (the save ends with a barrier: every rank's files are there)
            size = ckpt.dir_bytes(saved)
            self.last_ckpt = {"step": completed, "bytes": size, "save_s": save_s}
            self.metrics.write(kind="checkpoint", **self.last_ckpt)
            self.printer.line(
                f"step {completed}: checkpoint saved ({size / 1e9:.2f} GB, "
                f"{size / max(self.n_params, 1):.2f} B/param, {save_s:.1f} s)"
            )

    # -- the loop -------------------------------------------------------------------------------
    def train(self) -> dict:
        """Train from ``start`` up to train.steps (or train.stop_after); return :meth:`summary`."""
        cfg = self.cfg
        steps, stop_after = cfg.train.steps, cfg.train.stop_after
        self.printer = _Printer(self.is_rank0, cfg.train.progress, steps, self.start)
        self.t_begin = time.time()
        # Train mode before the first step: Hugging Face's from_pretrained returns its model in eval
        # mode, where its gradient checkpointing (and dropout) stays off until the first evaluation
        # switches it back (measured: 9.0 GiB of saved activations instead of ~1, docs/PERFORMANCE.md).
        self.engine.eval_mode(False)
        for step in range(self.start, steps):
            completed = step + 1
            is_final = completed == steps or (stop_after is not None and completed >= stop_after)
            t0 = time.perf_counter()
            recording = self._peak_report_begin(completed)
            step_loss = self.train_step(step, is_final)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.step_time += time.perf_counter() - t0
            self._peak_report_end(completed, recording)
            self.window_tokens += self.tokens_per_step
            self.loss_window[0] += step_loss
            self.loss_window[1] += 1
            self.final_step = completed
            if self.should_log(completed, is_final):
                self.log_metrics(completed)
            self.printer.update(1, {})
            if stop_after is not None and completed >= stop_after and completed < steps:
                self.printer.line(f"[flashoptim-dist] stopping after step {completed} (train.stop_after)")
                break
            if self.should_evaluate(completed, is_final):
                self.run_eval(completed)
            if self.should_checkpoint(completed, is_final):
                self.save_checkpoint(completed)
        self.printer.close()
        result = self.summary()
        self.engine.close()
        return result

    def summary(self) -> dict:
        """Gather every rank's memory breakdown; rank 0 prints the table and writes summary.md and
        summary.json. Returns (on every rank) the result dict of :func:`run_training`."""
        cfg = self.cfg
        if self.mem is None:  # nothing trained in this invocation (already at train.steps) or stopped
            self.mem = breakdown(self.engine)
            if self.last_val is None and cfg.train.stop_after is None:
                self.last_val = self.evaluate()
        row = dict(self.mem, rank=self.rank, peak_bytes=peak_memory_bytes(self.device), device=str(self.device))
        rows = [None] * self.world
        if dist.is_initialized() and self.world > 1:
            dist.all_gather_object(rows, row)
        else:
            rows = [row]
        table = format_table(rows, cfg.optim.name, baseline_of(cfg.optim.name), cfg.engine.name, tp_size=self.tp)
        result = {
            "optimizer": cfg.optim.name,
            "engine": cfg.engine.name,
            "world_size": self.world,
            "tp_size": self.tp,
            "layout": self.engine.layout,
            "n_params": self.n_params,
            "final_step": self.final_step,
            "resumed_from": self.resumed,
            "final_loss": self.last_loss,
            "final_val_loss": self.last_val,
            "tokens_per_s": self.tps,
            "mfu": self.mfu,
            "flops_per_token": self.flops_token,
            "rows": rows,
            "last_checkpoint": self.last_ckpt_step,
            "checkpoint": self.last_ckpt,
            "resume_s": self.resume_s,
        }
        if self.is_rank0:
            val = self.last_val if self.last_val is None else round(self.last_val, 4)
            print(
                f"\n[flashoptim-dist] summary ({cfg.optim.name}, {cfg.engine.name} x {self.world}, step "
                f"{self.final_step}, val_loss {val})\n{table}",
                flush=True,
            )
            (self.out_dir / "summary.md").write_text(table + "\n")
            (self.out_dir / "summary.json").write_text(json.dumps(result, indent=1))
        return result


def run_training(cfg: Config) -> dict:
    """Train as ``cfg`` says; every rank calls it inside an initialised process group.

    Returns (on every rank) a dict with ``final_step``, ``resumed_from``, ``final_loss``,
    ``final_val_loss``, ``tokens_per_s``, ``rows`` (per-rank memory) and ``n_params``.
    """
    return Trainer(cfg).train()


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
