"""bench/power.py's reading of its measurements (docs/PERFORMANCE.md's power and energy tables
come from it): a series gets exactly the nvidia-smi samples taken while it ran, with their clock,
power and throttle reasons, and its energy per step comes from NVML's counter when there is one."""

from __future__ import annotations

import datetime
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _power_module():
    sys.path.insert(0, str(ROOT / "bench"))  # power.py imports its sibling step.py
    try:
        spec = importlib.util.spec_from_file_location("bench_power", ROOT / "bench" / "power.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_samples_are_assigned_to_the_series_that_was_running():
    power = _power_module()
    rows = [
        "2026/12/04 15:13:49.366, 1980, 123.25, 0x0000000000000000",
        "2026/12/04 15:13:49.616, 1740, 182.90, 0x0000000000000004",
        "2026/12/04 15:13:49.866, 1755, 379.40, 0x0000000000000004",
        "2026/12/04 15:13:50.116, 1365, 677.79, 0x0000000000000004",
        "2026/12/04 15:13:50.366, 1980, 124.00, 0x0000000000000000",
    ]
    t = datetime.datetime(2026, 12, 4, 15, 13, 49, 500000)
    got = power._during(rows, t, t + datetime.timedelta(milliseconds=700))
    assert got == [(1740.0, 182.9, "0x0000000000000004"), (1755.0, 379.4, "0x0000000000000004"),
                   (1365.0, 677.79, "0x0000000000000004")]
    assert power._during(rows, t + datetime.timedelta(seconds=5), t + datetime.timedelta(seconds=6)) == []


def test_energy_per_step_from_the_counter_or_else_from_the_samples():
    power = _power_module()
    # the NVML counter's difference wins: 30 J over 150 steps in 0.6 s
    assert power._energy_per_step(30.0, 0.6, [(1500.0, 700.0, "0x4")], 150) == (0.2, 50.0, "nvml")
    # without it, the mean sampled power times the duration: (600 + 700)/2 W · 0.6 s / 150 steps
    j, w, src = power._energy_per_step(None, 0.6, [(1500.0, 600.0, "0x4"), (1400.0, 700.0, "0x4")], 150)
    assert (round(j, 6), w, src) == (2.6, 650.0, "samples")
    j, w, src = power._energy_per_step(None, 0.6, [], 150)
    assert src == "none" and j != j and w != w  # NaN: nothing was measured
