"""GPU time per optimizer step under sustained load, with the SM clock, power and throttle reasons
sampled alongside (``nvidia-smi``, every 250 ms).

    python bench/power.py [--optimizers copy FlashAdamW-24 torch-AdamW-fused-fp32] [--series 6] [--steps 150]

Why: the fused step is issue-bound on the H200, so its time follows the SM clock, and under a
sustained load the card's power cap (throttle reason 0x4, SW power cap) lowers that clock —
short timings taken after an idle moment (``bench/step.py``'s sweeps) see the boost clock,
longer ones a lower clock. Each optimizer gets ``--series`` back-to-back measurements of
``--steps`` queued steps (``bench/step.py``'s ``time_pipelined``, same llama shapes); per series
the script prints the GPU time per step and the median SM clock, peak power and throttle reasons
sampled during it, and the energy per step: NVML's total-energy counter read around the series
(``pynvml`` / nvidia-ml-py, when importable), else the mean of the sampled power times the time.

``copy`` is not an optimizer: a device-to-device copy moving the bytes FlashAdamW-24's step moves
(``step.TRAFFIC``, half read, half written), the yardstick of "% of copy" under the same load.
Energy per step is what the power cap turns into time: at the cap, a step cannot take less than
its energy divided by the power limit (docs/PERFORMANCE.md, ninth session). The device image has
no ``pynvml``: ``pip download nvidia-ml-py --no-deps`` into a carried folder, ``pip install
--no-deps --target /tmp/nvml`` it there and run with ``PYTHONPATH=/tmp/nvml``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from step import TRAFFIC, llama_shapes, make, time_pipelined  # noqa: E402


class CopyStep:
    """``step()`` copies ``nbytes`` from one device buffer to another: 2·nbytes of traffic."""

    def __init__(self, nbytes: int):
        self.src = torch.empty(nbytes // 4, device="cuda")
        self.dst = torch.empty_like(self.src)

    def step(self) -> None:
        self.dst.copy_(self.src)


def _energy_counter():
    """A function returning the GPU's energy counter in joules (NVML, millijoules since the driver
    loaded), or None where pynvml is not importable."""
    try:
        import pynvml
    except ImportError:
        return None
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    return lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3


def _energy_per_step(joules, seconds, samples, steps):
    """(J per step, mean W, source): from the counter's difference when there is one, else the
    mean sampled power times the series' duration."""
    if joules is not None:
        return joules / steps, joules / seconds, "nvml"
    if not samples:
        return float("nan"), float("nan"), "none"
    watts = statistics.mean(x[1] for x in samples)
    return watts * seconds / steps, watts, "samples"


def _sampler(rows, stop):
    """Append nvidia-smi samples (local timestamp, SM MHz, W, throttle reasons) until ``stop``."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,"
                                 "clocks_throttle_reasons.active", "--format=csv,noheader,nounits", "-lms", "250"],
                                stdout=log)
        stop.wait()
        proc.terminate()
        proc.wait()
        log.seek(0)
        rows.extend(log.read().strip().splitlines())


def _during(rows, t0, t1):
    """The samples taken between the local times ``t0`` and ``t1``: (SM MHz, W, reasons)."""
    out = []
    for r in rows:
        ts, mhz, w, reasons = (x.strip() for x in r.split(","))
        t = datetime.datetime.strptime(ts, "%Y/%m/%d %H:%M:%S.%f")
        if t0 <= t <= t1:
            out.append((float(mhz), float(w), reasons))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizers", nargs="+",
                    default=["copy", "FlashAdamW-24", "FlashSGD-mom", "torch-AdamW-fused-fp32"])
    ap.add_argument("--series", type=int, default=6)
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    shapes = llama_shapes()
    print(f"device: {torch.cuda.get_device_name()}")
    energy = _energy_counter()
    print("| optimizer | series | GPU ms/step | SM MHz (median of samples) | peak W | mean W | J/step (source) | "
          "throttle reasons |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    n = sum(torch.Size(s).numel() for s in shapes)
    for name in args.optimizers:
        if name == "copy":
            params, opt = None, CopyStep(int(TRAFFIC["FlashAdamW-24"] * n / 2))
        else:
            params, opt = make(name, shapes)
        for _ in range(2):
            opt.step()
        torch.cuda.synchronize()
        rows, stop = [], threading.Event()
        th = threading.Thread(target=_sampler, args=(rows, stop))
        th.start()
        time.sleep(1.0)  # nvidia-smi's start and an idle sample
        spans = []
        for _ in range(args.series):  # back to back: a sustained load
            t0, j0, c0 = datetime.datetime.now(), energy() if energy else None, time.perf_counter()
            ms = time_pipelined(opt, warmup=0, steps=args.steps)
            j1, c1 = energy() if energy else None, time.perf_counter()
            spans.append((t0, datetime.datetime.now(), ms, None if energy is None else j1 - j0, c1 - c0))
        time.sleep(0.6)
        stop.set()
        th.join()
        for i, (t0, t1, ms, joules, seconds) in enumerate(spans):
            samples = _during(rows, t0, t1)
            mhz = statistics.median(x[0] for x in samples) if samples else float("nan")
            watts = max((x[1] for x in samples), default=float("nan"))
            reasons = " ".join(sorted({x[2] for x in samples}))
            j_step, mean_w, source = _energy_per_step(joules, seconds, samples, args.steps)
            print(f"| {name} | {i} | {ms:.3f} | {mhz:.0f} | {watts:.0f} | {mean_w:.0f} | {j_step:.3f} ({source}) | "
                  f"{reasons} |", flush=True)
        del params, opt
        torch.cuda.empty_cache()
        time.sleep(3)  # let the card cool between optimizers


if __name__ == "__main__":
    main()
