"""Hyper-parameter rows of one launch: what the kernel (and the reference) reads per tensor.

A row holds a parameter's ``N_HYPER`` fp32 hyper-parameters for this step (the family's columns
from its ``_hyper_rows``: decay, betas, lr / bias correction, the outlier bound, ... and the step
count for the stochastic-rounding dither, split so both halves are exact in fp32). Two ways to
build the table, same values:

* :func:`host_table` — the normal step: float64 numpy rows from the states' Python step counts,
  one vectorized ``hyper_rows`` call per param group; the launch copies them to the device.
* :func:`capturable_rows` / :func:`device_table` — ``capturable=True``: the states' step counters
  are 0-d float32 device tensors, incremented on the device, and the rows are computed there by the
  family's ``hyper_rows_t`` (the same float64 operations in the same order), rounded to fp32 once.
  Nothing is read on the host, so a CUDA graph replay recomputes them (docs/design.md §4.4).

Split out of :mod:`.base`; the per-family formulas stay on the optimizer classes (:mod:`.flash`).
"""

from __future__ import annotations

from typing import Callable, List, Optional

import numpy as np
import torch

from ..reference import N_HYPER, STEP_HI_COLUMN, STEP_LO_COLUMN, STEP_SPLIT
from . import _plan


def host_table(hyper_rows: Callable, n: int, by_group: List[tuple], step_offset: int = 0) -> np.ndarray:
    """fp64 rows ``[n, N_HYPER]``: one vectorized ``hyper_rows(group, steps)`` call per param
    group (``by_group`` from :func:`._plan.by_group`), for the states' step counts plus
    ``step_offset``."""
    out = np.empty((n, N_HYPER), dtype=np.float64)
    for group, idx, states in by_group:
        steps = np.fromiter(map(_plan.step_of, states), dtype=np.float64, count=len(idx))
        if step_offset:
            steps = steps + step_offset
        rows = hyper_rows(group, steps)
        # the step count for the dither, split so both halves are exact in fp32
        rows[:, STEP_LO_COLUMN] = np.fmod(steps, STEP_SPLIT)
        rows[:, STEP_HI_COLUMN] = np.floor(steps / STEP_SPLIT)
        out[idx] = rows
    return out


def device_table(hyper_rows_t: Callable, n: int, by_group: List[tuple], device) -> torch.Tensor:
    """:func:`host_table` for the capturable step: fp32 rows ``[n, N_HYPER]`` on ``device``,
    computed by ``hyper_rows_t`` in float64 from the states' step tensors and rounded to fp32
    once, as the host path rounds its rows. A group's rows are written by slices (runs of
    consecutive positions), so no index tensor is copied from the host."""
    out = torch.empty((n, N_HYPER), dtype=torch.float64, device=device)
    for group, idx, states in by_group:
        steps = torch.stack(list(map(_plan.step_of, states))).to(torch.float64)
        rows = hyper_rows_t(group, steps)
        rows[:, STEP_LO_COLUMN] = torch.fmod(steps, STEP_SPLIT)
        rows[:, STEP_HI_COLUMN] = torch.floor(steps / STEP_SPLIT)
        for a, b, j in _plan.runs(idx):
            out[a:b] = rows[j : j + b - a]
    return out.to(torch.float32)


def capturable_rows(hyper_rows_t: Callable, device, groups: list, states: list,
                    cache: Optional[_plan.SteadyChunk] = None) -> torch.Tensor:
    """The capturable step's part before a launch: every state's step counter incremented on the
    device (one foreach add) and the fp32 rows computed from them there (:func:`device_table`).
    ``cache`` (the steady path's chunk) keeps the grouping between steps. Reads nothing on the
    host."""
    by = cache.by_group if cache is not None else None
    if by is None:
        by = _plan.by_group(groups, states)
        if cache is not None:
            cache.by_group = by
    torch._foreach_add_(list(map(_plan.step_of, states)), 1)
    return device_table(hyper_rows_t, len(states), by, device)


def step_tensor(step, device) -> torch.Tensor:
    """A capturable step counter: 0-d float32 on the parameter's device (torch.optim's capturable
    convention; exact up to 2^24 steps)."""
    if torch.is_tensor(step):
        return step.detach().reshape(()).to(device=device, dtype=torch.float32).clone()
    return torch.full((), float(step), dtype=torch.float32, device=device)
