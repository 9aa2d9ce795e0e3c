"""Step plans of :class:`~flashoptim_dist.optim.base.FlashOptimizer`: the records its hot path
caches between steps, how they are built, and how one launch combination is stepped (fused
kernel or the reference math).

The optimizer keeps three caches, each a named record here:

* :class:`FastEntry` per parameter (``_fast``): what the general path (``_step_items``, also
  gradient release) needs to step a parameter it has seen before without re-resolving it.
* :class:`SteadyStep` (``_steady``): the whole last step, cut into :class:`SteadyChunk` s, replayed
  while nothing but the gradients changes (``_steady_step``).
* kernel plans (``_plans``; :class:`~flashoptim_dist.kernels.fused_step.KernelPlan`) per list of
  tensors, built by :func:`build_kernel_plan`.

A launch combination's tensors travel as one :class:`StepBatch` of parallel lists.
"""

from __future__ import annotations

import collections
import itertools
import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple

import numpy as np
import torch

from .. import layout as lay
from .. import numerics as nx
from ..reference import SegmentViews, reference_step_segment

_MIXED = object()  # a chunk whose parameters need different accessors
_dtype_of = operator.attrgetter("dtype")
_layout_of = operator.attrgetter("layout")
_plain_grad = operator.attrgetter("grad")
step_of = operator.itemgetter("step")


def identity(p):
    return p


def common(fns: list, default):
    """The one accessor all of a chunk's parameters share (``default`` for None), else _MIXED."""
    first = fns[0]
    if any(f is not first for f in fns):
        return _MIXED
    return default if first is None else first


def chunks(entries: list, first: int) -> List[list]:
    """``entries`` cut into runs of ``first``, 2·``first``, 4·``first``, ... items."""
    out, i, n = [], 0, first
    while i < len(entries):
        out.append(entries[i : i + n])
        i += n
        n *= 2
    return out


def param_ids(param_groups) -> tuple:
    """Identity of the parameter lists (the steady path's signature), built at C level."""
    return tuple(map(id, itertools.chain.from_iterable(g["params"] for g in param_groups)))


def increment_steps(states: list) -> None:
    """state["step"] += 1 for every state dict, looped in C (a Python loop costs ~1 µs per
    parameter on the GPU hosts)."""
    collections.deque(map(operator.setitem, states, itertools.repeat("step"),
                          map(operator.add, map(step_of, states), itertools.repeat(1))), maxlen=0)


class TensorInfo:
    """What the optimizer knows about one optimizer tensor (cached at state init): its shard,
    state layout, its non-empty segments (:func:`~flashoptim_dist.layout.segment_runs`) and, per
    segment of the layout, the parameter's dither identity
    (:func:`~flashoptim_dist.numerics.parameter_key` of the seed and the global numel)."""

    __slots__ = ("spec", "layout", "runs", "keys", "numerics_checked")

    def __init__(self, spec: lay.ShardSpec, layout: lay.StateLayout, seed: int):
        self.spec = spec
        self.layout = layout
        self.runs = tuple(lay.segment_runs(layout))
        self.keys = tuple(
            nx.parameter_key(seed, s.global_numel if s.global_numel >= 0 else spec.global_numel)
            for s in layout.segments
        )
        self.numerics_checked = False


@dataclass(slots=True)
class FastEntry:
    """The general path's per-parameter cache (``FlashOptimizer._fast``, keyed by ``id(param)``).

    Valid while ``ref()`` is still the parameter and ``state`` is still its state dict."""

    ref: Any  # weakref.ref of the parameter: the cache never keeps a parameter alive
    spec: lay.ShardSpec
    info: TensorInfo
    state: dict
    bucket: tuple  # (device, param dtype, ρ dtype, quantized): the static part of the launch key
    numel: int  # local element count, which the gradient must have


@dataclass(slots=True)
class StepBatch:
    """The tensors of one launch, as parallel lists (position i is one optimizer tensor)."""

    params: list
    groups: list
    locals: list  # local tensors updated in place
    grads: list  # contiguous local gradients
    infos: list  # TensorInfo
    states: list  # state dicts

    @classmethod
    def of(cls, entries: list) -> "StepBatch":
        """From ``(param, group, local, grad, info, state)`` tuples (transposed in C)."""
        return cls(*map(list, zip(*entries)))


@dataclass(slots=True)
class SteadyChunk:
    """One chunk of the steady path: parameters of one launch combination and what must hold
    of their gradients for the chunk to be replayed as it was built."""

    key: tuple  # the launch combination
    params: list
    groups: list
    infos: list
    states: list
    grad_fns: list  # ShardSpec.grad per parameter (None: p.grad)
    local_fns: list  # ShardSpec.local per parameter (None: the parameter itself)
    grad_fn: Callable  # the one grad accessor they share, or _MIXED
    local_fn: Callable  # the one local accessor they share (identity: none), or _MIXED
    numels: list
    dtypes: list  # gradient dtypes
    layouts: list  # gradient layouts (all torch.strided)
    rows: slice  # this chunk's rows of the step's hyper-parameter table
    plan: Any = None  # the kernel plan, once the first replay built or found it
    by_group: Any = None  # by_group() of this chunk (the capturable step computes rows per chunk)


class SteadyStep(NamedTuple):
    """``FlashOptimizer._steady``: the last complete step, replayed by ``_steady_step``."""

    signature: tuple  # param_ids(param_groups) when built
    groups: list  # (group, its number of state slots)
    n_state: int  # len(optimizer.state) when built
    chunks: List[SteadyChunk]
    n_rows: int  # rows of the hyper-parameter table (one per parameter)
    by_group: list  # by_group() of all chunks' rows


def by_group(groups: list, states: list) -> List[tuple]:
    """``(group, positions, state dicts)`` per param group, in first-seen order, of the
    parallel lists ``groups`` and ``states``: what the hyper-parameter table is computed from."""
    out: Dict[int, tuple] = {}
    for i, (g, st) in enumerate(zip(groups, states)):
        item = out.get(id(g))
        if item is None:
            item = out[id(g)] = (g, [], [])
        item[1].append(i)
        item[2].append(st)
    return list(out.values())


def runs(idx: list) -> List[tuple]:
    """``(start, stop, offset)`` per run of consecutive positions in ``idx``: position
    ``idx[offset + k]`` is ``start + k``."""
    out, j = [], 0
    while j < len(idx):
        k = j + 1
        while k < len(idx) and idx[k] == idx[k - 1] + 1:
            k += 1
        out.append((idx[j], idx[k - 1] + 1, j))
        j = k
    return out


def build_steady(buckets: Dict[tuple, StepBatch], param_groups, n_states: Callable, n_state: int,
                 groups: list, first_chunk: int) -> SteadyStep:
    """The :class:`SteadyStep` of a complete general-path step whose launches are ``buckets``."""
    steady, flat_groups, flat_states = [], [], []
    for key, batch in buckets.items():
        idx = list(range(len(batch.params)))
        for part in chunks(idx, first_chunk):
            lo, hi = part[0], part[-1] + 1
            infos = batch.infos[lo:hi]
            grad_fns, local_fns = [i.spec.grad for i in infos], [i.spec.local for i in infos]
            steady.append(SteadyChunk(
                key=key, params=batch.params[lo:hi], groups=batch.groups[lo:hi], infos=infos,
                states=batch.states[lo:hi], grad_fns=grad_fns, local_fns=local_fns,
                grad_fn=common(grad_fns, _plain_grad), local_fn=common(local_fns, identity),
                numels=[t.numel() for t in batch.locals[lo:hi]], dtypes=[g.dtype for g in batch.grads[lo:hi]],
                layouts=[torch.strided] * (hi - lo), rows=slice(len(flat_groups), len(flat_groups) + hi - lo),
            ))
            flat_groups += batch.groups[lo:hi]
            flat_states += batch.states[lo:hi]
    return SteadyStep(param_ids(param_groups), [(g, n_states(g)) for g in groups], n_state, steady,
                      len(flat_groups), by_group(flat_groups, flat_states))


def build_kernel_plan(batch: StepBatch, device, names: list, quantized: bool, rho_dtype, config, fused_step):
    """The kernel plan of ``batch``: one row per non-empty segment, state tensors by role."""
    g = config.group_size
    segs = []
    for i, info in enumerate(batch.infos):
        keys = info.keys
        for run in info.runs:
            segs.append((i, run.start, run.stop - run.start, run.phase, run.scale_start,
                         run.segment.global_start, keys[run.index]))
    states = batch.states
    return fused_step.KernelPlan(
        segs,
        [st["rho"] for st in states] if rho_dtype is not None else None,
        [[st[n] for st in states] for n in names],
        [[st[n + "_scales"] for st in states] for n in names] if quantized else [],
        quantized,
        g,
        device,
        config.stochastic,
    )


def reference_step(family: str, decoupled: bool, batch: StepBatch, hyper: np.ndarray, names: list,
                   quantized: bool, config) -> None:
    """Step ``batch`` with the pure-PyTorch reference, segment by segment (CPU, no Triton)."""
    group_size = config.group_size
    stochastic = config.stochastic
    # the capturable step hands fp32 rows already on the device (here: CPU)
    hyper32 = hyper if torch.is_tensor(hyper) else torch.from_numpy(hyper.astype(np.float32))
    for local, grad, info, state, row in zip(batch.locals, batch.grads, batch.infos, batch.states, hyper32):
        flat, gflat = local.view(-1), grad.view(-1)
        rho = state.get("rho")
        for run in info.runs:
            sl = run.local
            views = SegmentViews(
                param=flat[sl],
                grad=gflat[sl],
                rho=None if rho is None else rho[sl],
                states=[state[n][sl] for n in names],
                scales=[state[n + "_scales"][run.scales] if quantized else None for n in names],
                phase=run.phase,
                global_start=run.segment.global_start,
                key=info.keys[run.index],
            )
            reference_step_segment(family, decoupled, views, row, group_size, stochastic)

