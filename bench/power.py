"""GPU time per optimizer step under sustained load, with the SM clock, power and throttle reasons
sampled alongside (``nvidia-smi``, every 250 ms).

    python bench/power.py [--optimizers FlashAdamW-24 torch-AdamW-fused-fp32] [--series 6] [--steps 150]

Why: the fused step is issue-bound on the H200, so its time follows the SM clock, and under a
sustained load the card's power cap (throttle reason 0x4, SW power cap) lowers that clock —
short timings taken after an idle moment (``bench/step.py``'s sweeps) see the boost clock,
longer ones a lower clock. Each optimizer gets ``--series`` back-to-back measurements of
``--steps`` queued steps (``bench/step.py``'s ``time_pipelined``, same llama shapes); per series
the script prints the GPU time per step and the median SM clock, peak power and throttle reasons
sampled during it.
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
from step import llama_shapes, make, time_pipelined  # noqa: E402


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
    ap.add_argument("--optimizers", nargs="+", default=["FlashAdamW-24", "FlashSGD-mom", "torch-AdamW-fused-fp32"])
    ap.add_argument("--series", type=int, default=6)
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    shapes = llama_shapes()
    print(f"device: {torch.cuda.get_device_name()}")
    print("| optimizer | series | GPU ms/step | SM MHz (median of samples) | peak W | throttle reasons |")
    print("|---|---|---:|---:|---:|---|")
    for name in args.optimizers:
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
            t0 = datetime.datetime.now()
            ms = time_pipelined(opt, warmup=0, steps=args.steps)
            spans.append((t0, datetime.datetime.now(), ms))
        time.sleep(0.6)
        stop.set()
        th.join()
        for i, (t0, t1, ms) in enumerate(spans):
            samples = _during(rows, t0, t1)
            mhz = statistics.median(x[0] for x in samples) if samples else float("nan")
            watts = max((x[1] for x in samples), default=float("nan"))
            reasons = " ".join(sorted({x[2] for x in samples}))
            print(f"| {name} | {i} | {ms:.3f} | {mhz:.0f} | {watts:.0f} | {reasons} |", flush=True)
        del params, opt
        torch.cuda.empty_cache()
        time.sleep(3)  # let the card cool between optimizers


if __name__ == "__main__":
    main()
