"""The Flash optimizer core: state management, segment lists and dispatch to kernel or reference.

Layering (as in ``torch.optim``): the public classes in :mod:`.flash` only validate
hyper-parameters and say how a param group's hyper-parameters become a fp32 row
(:mod:`flashoptim_dist.reference` names the columns); this module turns parameters into *segments*
(:mod:`flashoptim_dist.layout`), owns the state tensors, and runs one fused launch per
(family, dtype) combination per step. Nothing here knows which engine sharded a parameter:
engines describe shards through :func:`flashoptim_dist.layout.resolve_shard`.

The class lives here; its parts live next to it: :mod:`._plan` (the records the step caches
between steps, the kernel plan, the reference loop), :mod:`._state` (state tensors: creation,
validation on load, torch.optim interop), :mod:`._checks` (first-step refusals, whether the kernel can run) and
:mod:`.state_io` (the state_dict forms).

Per-element state (bf16 params, quantization on):

=====================  ================================  =======================
state key              dtype / size                      bytes per element
=====================  ================================  =======================
``rho``                int8 (24-bit) / int16 (32-bit)    1 / 2
``exp_avg``            int8 companded codes              1
``exp_avg_scales``     bf16, one per canonical group     2/G = 0.0625
``exp_avg_sq``         uint8 sqrt-companded codes        1
``exp_avg_sq_scales``  bf16, one per canonical group     0.0625
=====================  ================================  =======================

FlashAdamW-24: 3.125 bytes of state per element (+ 2 param + 2 grad = 7.125).

Capturable step (``capturable=True``, docs/design.md §4.4): ``state["step"]`` is a 0-d float32
tensor on the parameter's device, incremented there (``torch._foreach_add_``); the hyper rows
are computed from the step tensors and the (float or 0-d tensor) lr by ``_hyper_rows_t`` on the
device, in float64 like the host's numpy rows, and rounded to fp32 once (:mod:`._hyper`);
nothing in ``step()`` reads a tensor value on the host, so a CUDA graph can capture it after one
eager (warm-up) step has allocated the state, compiled the kernel and built its plan.
"""

from __future__ import annotations

import operator
import os
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.optim import Optimizer

from .. import layout as lay
from .. import numerics as nx
from ..config import FlashConfig
from . import _checks, _hyper, _plan, _state, state_io
from ._plan import FastEntry, StepBatch, SteadyChunk, SteadyStep
from ._plan import TensorInfo as _TensorInfo
from ._checks import _triton_usable  # looked up here at each call: bench/host_step.py patches it
from ._state import allocate_state
from ..reference import FAMILIES

__all__ = ["FlashOptimizer", "STATE_FORMAT_VERSION", "allocate_state"]

#: Version of the optimizer state_dict format. 3: ρ of bf16 parameters is numerics' bit split;
#: 2: the forms of :mod:`.state_io` (global layout for DTensor parameters and whole tensors),
#: with the linear ρ of the paper; 1: every tensor in its stored local layout. load_state_dict
#: reads all three (ρ of versions 1-2 is converted: numerics.rho_from_linear).
STATE_FORMAT_VERSION = 3

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


#: Parameters in the first chunk of the steady path (see ``_steady_step``); each next chunk is
#: twice the previous one, so the GPU starts early and the host keeps ahead of it.
FIRST_CHUNK = int(os.environ.get("FLASHOPTIM_FIRST_CHUNK", "8"))

_MIXED = _plan._MIXED
_maximize_of = operator.itemgetter("maximize")
_identity = _plan.identity
_dtype_of = _plan._dtype_of
_layout_of = _plan._layout_of


#: torch.optim's own way to keep dynamo out of a method (Optimizer.zero_grad uses it): the wrapper
#: imports torch._dynamo at the first call, not at definition. torch.compiler.disable imports it
#: at once, and torch._dynamo imports torch.distributed.fsdp and .tensor, which
#: ``import flashoptim_dist`` must not pull in (tests/distributed/test_fsdp2_errors.py).
_not_compiled = getattr(torch, "_disable_dynamo", None) or torch.compiler.disable


class FlashOptimizer(Optimizer):
    """Base class of the Flash optimizers (a :class:`torch.optim.Optimizer`).

    Subclasses set ``family`` ("adam" | "sgd" | "lion"), ``decoupled`` and implement
    :meth:`_hyper_rows` and :meth:`_n_states`.
    """

    family: str = ""
    decoupled: bool = True
    #: ``capturable=True`` of the public classes: device step counters and hyper rows, no host
    #: read in ``step()`` (see "Capturable step" in the module doc).
    capturable: bool = False

    def __init__(self, params, defaults: Dict[str, Any], config: FlashConfig):
        self.config = config
        self._info: Dict[torch.Tensor, _TensorInfo] = {}
        self._plans: Dict[tuple, Any] = {}
        # id(p) → FastEntry: the per-step fast path of _step_items; dropped wherever _info changes
        self._fast: Dict[int, FastEntry] = {}
        # The whole step of the last call, when every parameter had a gradient (see
        # _steady_step); dropped when anything differs
        self._steady: Optional[SteadyStep] = None
        #: The active :class:`~flashoptim_dist.release.GradientReleaseHandle` (``None``: off).
        #: Set by ``enable_gradient_release``, cleared by the handle's ``remove()``; while set,
        #: ``step()`` refuses (every parameter was already updated during backward).
        self.gradient_release = None
        # (group index, position) -> (dtype, shape) of every bf16/fp16 parameter as the
        # optimizer was built, checked once at the first step (_check_upcast); None after that
        self._built_narrow: Optional[Dict[Tuple[int, int], Tuple[torch.dtype, tuple]]] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            spec = lay.resolve_shard(p)
            if spec.check is not None:  # refused at construction, e.g. a column split cutting groups
                spec.check(self.config.group_size)
            local = spec.local(p) if spec.local is not None else p
            if local.dtype not in _FLOAT_DTYPES:
                raise TypeError(
                    f"{type(self).__name__} supports float32, bfloat16 and float16 parameters; got a "
                    f"{local.dtype} parameter of shape {tuple(p.shape)}. Integer and complex tensors "
                    "must not be passed to the optimizer."
                )
            if not local.is_contiguous():
                raise ValueError(
                    f"{type(self).__name__} needs contiguous parameters; got one of shape "
                    f"{tuple(p.shape)} with stride {local.stride()}. Make it contiguous before "
                    "creating the optimizer (p.data = p.data.contiguous())."
                )
        self._validate_group(group)
        if self._built_narrow is not None:
            gi = len(self.param_groups) - 1
            for i, p in enumerate(group["params"]):
                dt = self._local(p).dtype
                if dt != torch.float32:
                    self._built_narrow[(gi, i)] = (dt, tuple(p.shape))

    def _check_upcast(self) -> None:
        """Refuse a step on float32 parameters that were bf16/fp16 when the optimizer was built
        (run once, at the first step; :func:`._checks.check_upcast` says why)."""
        built, self._built_narrow = self._built_narrow, None
        _checks.check_upcast(type(self).__name__, built, self.param_groups, self._local)

    def _validate_group(self, group: Dict[str, Any]) -> None:  # overridden
        pass

    # ------------------------------------------------------------------ shards
    @staticmethod
    def _local(p: torch.Tensor) -> torch.Tensor:
        spec = lay.resolve_shard(p)
        return spec.local(p) if spec.local is not None else p

    def local_tensor(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor this rank steps for parameter ``p``: its local shard (e.g. a DTensor's local
        tensor under FSDP2), or ``p`` itself when it is not sharded."""
        return self._local(p)

    @staticmethod
    def _grad(p: torch.Tensor, spec: lay.ShardSpec) -> Optional[torch.Tensor]:
        if spec.grad is not None:
            return spec.grad(p)
        return p.grad

    def _n_states(self, group: Dict[str, Any]) -> int:
        return len(FAMILIES[self.family])

    def _hyper_rows(self, group: Dict[str, Any], steps: np.ndarray) -> np.ndarray:  # overridden
        """fp64 rows ``[len(steps), N_HYPER]`` for tensors of ``group`` at the given step counts."""
        raise NotImplementedError

    def _hyper_rows_t(self, group: Dict[str, Any], steps: torch.Tensor) -> torch.Tensor:  # overridden
        """:meth:`_hyper_rows` with torch ops on a float64 tensor of step counts, on its device
        (the capturable step): the same fp64 operations in the same order."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def _make_info(self, p: torch.Tensor) -> _TensorInfo:
        spec = lay.resolve_shard(p)
        local = spec.local(p) if spec.local is not None else p
        return _TensorInfo(spec, lay.spec_layout(local, spec, self.config), self.config.seed)

    def _fresh_state(self, p: torch.Tensor, info: _TensorInfo, group: Dict[str, Any]) -> None:
        local = self._local(p)
        # the current narrow value is exact, so ρ starts at zero like the moments
        self.state[p].update(allocate_state(info.layout, self.family, self._n_states(group), local.device))
        if self.capturable:
            self.state[p]["step"] = _hyper.step_tensor(0, local.device)

    def _info_for(self, p: torch.Tensor, group: Dict[str, Any]) -> _TensorInfo:
        info = self._info.get(p)
        if info is None:
            info = self._info[p] = self._make_info(p)
        if "step" not in self.state[p]:
            self._fresh_state(p, info, group)
        return info

    # ------------------------------------------------------------------ stepping
    # Not traced by torch.compile: the step plans launches from Python state (gradient addresses,
    # dicts of records) that dynamo cannot guard on, and its work is one Triton kernel anyway. A
    # compiled training step that calls opt.step() graph-breaks here and runs the step eagerly
    # (docs/design.md 4.4); without this, dynamo fails inside the planner.
    @_not_compiled
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """One optimizer step over every parameter that has a gradient."""
        # With no state at all this is the first step ever: with release on, only torch's
        # _init_optim_state (zero gradients, lr 0; get/set_state_dict run it) gets here.
        if self.gradient_release is not None and self.state:
            raise RuntimeError(
                "optimizer.step() was called while gradient release is active: every parameter "
                "was already updated during backward. Remove the call (gradient accumulation, "
                "GradScaler and clipping of the full gradient cannot work with release), or call "
                "handle.remove() to go back to stepping after backward."
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._steady is not None and self._steady_step():
            return loss
        items = []
        for group in self.param_groups:
            for p in group["params"]:
                items.append((p, group))
        self._step_items(items, remember=True)
        return loss

    def _steady_step(self) -> bool:
        """The step when nothing but the gradients changed since the last one (the usual case):
        the same parameters, groups, state dicts and gradient dtypes/sizes as the step that built
        ``_steady``. False (and the cache dropped) sends the step down the general path; a
        change found after some chunks were launched sends the remaining parameters down it.
        Written as comprehensions over per-chunk lists: this runs for every parameter every
        step, and the host time of the step is what is left once the kernel is fast; chunks of
        growing size let the kernels of the first ones run while the host prepares the rest
        (docs/PERFORMANCE.md)."""
        steady = self._steady
        if (len(self.state) != steady.n_state or steady.signature != _plan.param_ids(self.param_groups)
                or any(self._n_states(g) != n for g, n in steady.groups)):
            self._steady = None
            return False
        # hyper-parameter rows of every chunk in one vectorized pass (steps + 1: the chunks
        # increment their steps just before their launch); capturable: per chunk, on the device
        capturable = self.capturable
        hyper = None
        if not capturable:
            hyper = _hyper.host_table(self._hyper_rows, steady.n_rows, steady.by_group, step_offset=1)
        # Chunk by chunk: each chunk's kernel is launched before the next chunk's host work, so
        # on a GPU that work overlaps the kernels already queued and only the first (small)
        # chunk's host time is not hidden. The per-parameter work is map() over C-level
        # accessors where it can be: on the GPU hosts every Python-level operation per
        # parameter costs ~1 µs, ~200 parameters per step.
        chunks = steady.chunks
        for i, c in enumerate(chunks):
            ps = c.params
            gf = c.grad_fn
            if gf is not _MIXED:
                grads = list(map(gf, ps))
            else:
                grads = [p.grad if f is None else f(p) for p, f in zip(ps, c.grad_fns)]
            try:
                same = (
                    list(map(_dtype_of, grads)) == c.dtypes
                    and list(map(_layout_of, grads)) == c.layouts
                    and list(map(torch.Tensor.numel, grads)) == c.numels
                )
            except (AttributeError, TypeError):  # a missing gradient (None)
                same = False
            if not same:
                # something changed (a missing gradient, a new dtype): the general path steps
                # what is left; earlier chunks are already stepped, and the rest passed the same
                # checks on the step that built this cache
                self._steady = None
                if i == 0:
                    return False
                self._step_items([(p, g) for r in chunks[i:] for p, g in zip(r.params, r.groups)])
                return True
            if not all(map(torch.Tensor.is_contiguous, grads)):
                grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
            lf = c.local_fn
            if lf is _identity:  # the parameters are their own local tensors
                locals_ = ps
            elif lf is not _MIXED:
                locals_ = list(map(lf, ps))
            else:
                locals_ = [p if f is None else f(p) for p, f in zip(ps, c.local_fns)]
            if capturable:
                rows = _hyper.capturable_rows(self._hyper_rows_t, c.key[0], c.groups, c.states, c)
            else:
                _plan.increment_steps(c.states)
                rows = hyper[c.rows]
            self._launch(c.key, StepBatch(ps, c.groups, locals_, grads, c.infos, c.states), rows, c)
        return True

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, group: Optional[Dict[str, Any]] = None) -> None:
        """Step one parameter (used by gradient release)."""
        if group is None:
            group = self._group_of(p)
        self._step_items([(p, group)])

    def step_items(self, items: List[Tuple[torch.Tensor, Dict[str, Any]]]) -> None:
        """Step exactly the given ``(parameter, its param group)`` pairs now, with one kernel
        launch per launch combination (used by gradient release to update one engine unit at a
        time). Parameters without a gradient are skipped. Call under ``torch.no_grad()``."""
        self._step_items(items)

    def _group_of(self, p: torch.Tensor) -> Dict[str, Any]:
        for group in self.param_groups:
            for q in group["params"]:
                if q is p:
                    return group
        raise KeyError("parameter is not managed by this optimizer")

    def _step_items(self, items: List[Tuple[torch.Tensor, Dict[str, Any]]], remember: bool = False) -> None:
        # Collect the tensors with gradients, bucketed by launch combination. This loop runs
        # for every parameter every step (~200 per step for a 24-layer model, ~1 ms of host time
        # before this cache): a parameter seen before costs one int-keyed dict lookup, one
        # identity check of its state, its gradient accessor and a few attribute reads.
        if self._built_narrow is not None:
            self._check_upcast()
        buckets: Dict[tuple, list] = {}  # launch key -> [(param, group, local, grad, info, state)]
        check = self.config.check_numerics
        capturable = self.capturable
        fast = self._fast
        state_get = self.state.get
        complete = remember
        for p, group in items:
            ent = fast.get(id(p))
            if ent is not None and ent.ref() is p and state_get(p) is ent.state:
                spec, info, state = ent.spec, ent.info, ent.state
                grad = spec.grad(p) if spec.grad is not None else p.grad
                if grad is None:
                    complete = False
                    continue
                local = spec.local(p) if spec.local is not None else p
                if grad.layout is not torch.strided or grad.dtype not in _FLOAT_DTYPES or grad.numel() != ent.numel:
                    grad = _checks.check_grad(type(self).__name__, p, grad, local)  # raises with the reason
                elif not grad.is_contiguous():
                    grad = grad.contiguous()
                skey = ent.bucket
            else:
                info = self._info.get(p)
                spec = info.spec if info is not None else lay.resolve_shard(p)
                grad = spec.grad(p) if spec.grad is not None else p.grad
                if grad is None:
                    complete = False
                    continue
                local = spec.local(p) if spec.local is not None else p
                grad = _checks.check_grad(type(self).__name__, p, grad, local)
                if info is None or "step" not in self.state[p]:
                    info = self._info_for(p, group)
                state = self.state[p]
                skey = (local.device, local.dtype, info.layout.rho_dtype, info.layout.quantized)
                if len(fast) > 65536:  # ids of tensors that died; entries hold only weak references
                    fast.clear()
                fast[id(p)] = FastEntry(weakref.ref(p), info.spec, info, state, skey, local.numel())
            if not capturable:
                state["step"] += 1
            if check and not info.numerics_checked:
                self._check_resolution(p, local, grad, group, info)
            key = skey + (grad.dtype, self._n_states(group))
            entries = buckets.get(key)
            if entries is None:
                entries = buckets[key] = []
            entries.append((p, group, local, grad, info, state))
        batches = {key: StepBatch.of(entries) for key, entries in buckets.items()}
        if complete and not (check and not all(i.numerics_checked for b in batches.values() for i in b.infos)):
            groups = list({id(g): g for _, g in items}.values())
            # capturable: one chunk per launch combination (a replay has no host work to overlap)
            self._steady = _plan.build_steady(
                batches,
                self.param_groups,
                self._n_states,
                len(self.state),
                groups,
                FIRST_CHUNK if not capturable else 1 << 62,
            )
        elif remember:
            self._steady = None
        for key, batch in batches.items():
            if capturable:
                self._launch(key, batch, _hyper.capturable_rows(self._hyper_rows_t, key[0], batch.groups, batch.states))
            else:
                self._launch(key, batch)

    def _launch(self, key, batch: StepBatch, hyper=None, cache: Optional[SteadyChunk] = None) -> None:
        """Step ``batch`` (one launch combination ``key``). ``hyper``: its rows, if the caller
        has them (fp64 numpy, or the capturable step's fp32 device tensor); ``cache`` (the
        steady path's chunk) keeps the kernel plan between steps."""
        device, _, rho_dtype, quantized, _, n_states = key
        if hyper is None:
            hyper = _hyper.host_table(self._hyper_rows, len(batch.params), _plan.by_group(batch.groups, batch.states))
        names = [name for name, _ in FAMILIES[self.family][:n_states]]
        if self.capturable and device.type == "cuda" and not _triton_usable(device, self.config.backend):
            raise RuntimeError(
                f"{type(self).__name__}(capturable=True) on {device} needs the fused Triton kernel (the "
                "reference math reads hyper-parameters on the host); install triton and use backend='auto' "
                "or 'triton'"
            )
        if _triton_usable(device, self.config.backend):
            from ..kernels import fused_step

            plan = cache.plan if cache is not None else None
            if plan is None:
                plan_key = (key,) + tuple(map(id, batch.params))
                plan = self._plans.get(plan_key)
                if plan is None:
                    plan = _plan.build_kernel_plan(batch, device, names, quantized, rho_dtype, self.config, fused_step)
                    if len(self._plans) > 4096:  # bounded: per-param plans of gradient release recur
                        self._plans.clear()
                    self._plans[plan_key] = plan
                if cache is not None:
                    cache.plan = plan
            maximize = any(map(_maximize_of, batch.groups)) if self.capturable else None
            fused_step.launch(plan, self.family, self.decoupled, batch.locals, batch.grads, hyper, maximize)
            return
        _plan.reference_step(self.family, self.decoupled, batch, hyper, names, quantized, self.config)

    # ------------------------------------------------------------------ numerics check
    def _update_scale(self, group, grad) -> float:
        """Typical magnitude of one step's update before the lr (1 for sign/normalized updates)."""
        return 1.0

    def _check_resolution(self, p, local, grad, group, info) -> None:
        """Fail if the learning rate cannot move the tensor's largest weights at all.

        Judged once per tensor, on its first step with a non-zero update: at the schedule's peak
        (``initial_lr``, which torch's LR schedulers record) rather than at a warm-up's first
        tiny rate; a zero rate (torch's state initialisation steps with lr = 0) or an all-zero
        gradient defers the check (:func:`._checks.check_resolution` has the criterion)."""
        if local.dtype == torch.float32 or local.numel() == 0:
            info.numerics_checked = True
            return
        lr = max(float(group["lr"]), float(group.get("initial_lr", 0.0)))
        update = lr * self._update_scale(group, grad)
        if update == 0.0:
            return  # nothing to judge yet
        info.numerics_checked = True
        _checks.check_resolution(p, local, lr, update, self.config)

    # ------------------------------------------------------------------ memory accounting
    def state_bytes(self) -> int:
        """Bytes held by every state tensor of this optimizer on this rank."""
        total = 0
        for st in self.state.values():
            for v in st.values():
                if torch.is_tensor(v):
                    total += v.numel() * v.element_size()
        return total

    # ------------------------------------------------------------------ state dict
    @torch.no_grad()
    def state_dict(self) -> Dict[str, Any]:
        """Like ``torch.optim.Optimizer.state_dict`` plus a ``"flashoptim"`` entry with the
        format version and numeric config; what torch's ``get_state_dict`` + DCP, FSDP1's
        ``optim_state_dict`` and a plain ``torch.save`` need (:mod:`.state_io` has the details).

        Per parameter, the state is in its *global* layout where the parameter has one: ρ and
        codes shaped like the parameter (DTensors with its mesh and placements for FSDP2/HSDP;
        views of the stored state, no copy), scales as ``(rows, K)`` with the scales of the
        groups touching each row (:func:`.state_io.scale_rows_shape`; a view when the row length
        is a multiple of the group size). Groups that a DTensor shard boundary cuts are agreed to
        one scale first: then this call is collective over the parameter's mesh and copies those
        parameters' codes. FSDP1 parameters get one bf16 (fp32 for int16 ρ or unquantized
        state) value per element for every state, scales included: what FSDP1 gathers, 10 bytes
        per element for FlashAdamW-24. DeepSpeed partitions and custom ShardSpecs keep this
        rank's stored tensors (a per-rank format). Every value is exact (int8 codes, bf16 scales,
        int8/int16 ρ are kept or widened exactly): a reload is bit exact. The live state is never
        modified.
        """
        sd = super().state_dict()
        sd["state"] = state_io.export_states(self, sd["state"])
        sd["flashoptim"] = {
            "format_version": STATE_FORMAT_VERSION,
            "family": self.family,
            "config": self.config.to_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a Flash state dict exactly, or a plain ``torch.optim`` one (quantized on load).

        Flash state is accepted in every form :meth:`state_dict` writes, from any sharding:
        the global layout as DTensors of any placements or as full plain tensors (this rank
        takes its rows), FSDP1's per-element form, and this rank's stored layout (format
        version 1 and per-rank files). Anything else raises naming the shapes.
        ``torch.optim.Optimizer.load_state_dict`` casts floating state to the param dtype (it
        would turn int8 codes into bf16); here state tensors keep their dtype and only move to
        the param's device.
        """
        meta = state_dict.get("flashoptim")
        saved_state = state_dict["state"]
        # Recognise Flash-format state by its contents too: torch.distributed.checkpoint's
        # get_optimizer_state_dict drops the top-level "flashoptim" key, and treating ρ and
        # 8-bit codes as plain torch moments would silently re-quantize them.
        flash_format = meta is not None or any(
            isinstance(st, dict) and ("rho" in st or any(str(k).endswith("_scales") for k in st))
            for st in saved_state.values()
        )
        if meta is not None:
            _state.check_flash_meta(meta, self, STATE_FORMAT_VERSION)
        # ρ of bf16 params in the paper's linear form (versions ≤ 2): converted against the live
        # θ', which is why the model's weights must be loaded first (as torch's set_state_dict,
        # DeepSpeed, Accelerate and Lightning all do). Without the "flashoptim" entry (torch's
        # get_optimizer_state_dict drops it) nothing tells the version: the current one is
        # assumed, and state of version ≤ 2 saved that way needs upgrade_linear_rho() after loading.
        linear_rho = meta is not None and int(meta.get("format_version")) <= 2
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        params = [p for g in self.param_groups for p in g["params"]]
        id_to_group = {}
        idx = 0
        for g in self.param_groups:
            for _ in g["params"]:
                id_to_group[idx] = g
                idx += 1
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        id_map = dict(zip(saved_ids, range(len(params))))
        self._info.clear()
        self._plans.clear()
        self._fast.clear()
        self._steady = None
        for pid, st in saved_state.items():
            i = id_map[pid]
            p = params[i]
            group = id_to_group[i]
            local = self._local(p)
            st = (
                state_io.import_state(self, p, st, group)
                if flash_format
                else self._from_torch_state(p, local, st, group)
            )
            if linear_rho and torch.is_tensor(st.get("rho")):  # (rho_from_linear leaves fp16's as is)
                st = dict(st, rho=nx.rho_from_linear(local.reshape(-1).to(st["rho"].device), st["rho"]))
            new = {}
            for k, v in st.items():
                new[k] = v.to(local.device) if torch.is_tensor(v) else v
            new["step"] = int(new["step"].item()) if torch.is_tensor(new.get("step")) else int(new.get("step", 0))
            self.install_state(p, new, group)

    @torch.no_grad()
    def upgrade_linear_rho(self) -> int:
        """Convert every bf16 parameter's ρ from the linear form of state format versions ≤ 2 to
        the bit split (``numerics.rho_from_linear``: the master moves by at most one 24-bit step).

        Only for state loaded through torch's ``set_state_dict`` / ``set_optimizer_state_dict``
        from a checkpoint that an older flashoptim_dist wrote with ``get_optimizer_state_dict``
        (torch drops the version entry on that route, so the loader cannot tell); every other
        route converts by itself. Call it once, after the model's weights and the optimizer state
        are loaded and before the next step. Calling it on current state moves the masters by up
        to a quarter of a bf16 ULP where θ' is a power of two (1/256 elsewhere). Returns the number
        of tensors converted."""
        n = 0
        for p, st in self.state.items():
            rho = st.get("rho") if isinstance(st, dict) else None
            local = self._local(p)
            if torch.is_tensor(rho) and local.dtype == torch.bfloat16:
                rho.copy_(nx.rho_from_linear(local.reshape(-1), rho))  # in place: plans keep it
                n += 1
        return n

    def n_state_slots(self, group: Dict[str, Any]) -> int:
        """Moment states a param group keeps (SGD without momentum: 0)."""
        return self._n_states(group)

    def install_state(self, p: torch.Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> None:
        """Make ``state`` (stored dtypes, this rank's local layout) the state of ``p``.

        Validated like :meth:`load_state_dict` (dtypes and sizes against the layout decided by
        ``p``'s ShardSpec). ``group`` is explicit because engines such as ZeRO-3 keep
        ``param_groups`` empty between steps. Used by :mod:`flashoptim_dist.checkpoint`.
        """
        info = self._make_info(p)
        self._check_loaded_state(p, state, info.layout, group)
        # the step counter in this optimizer's convention, whatever wrote it: a 0-d float32
        # device tensor when capturable (as torch saves capturable steps), else a Python int
        step = state.get("step", 0)
        if self.capturable:
            state["step"] = _hyper.step_tensor(step, self._local(p).device)
        else:
            state["step"] = int(step.item()) if torch.is_tensor(step) else int(step)
        self.state[p] = state
        self._info[p] = info
        self._plans.clear()
        self._fast.pop(id(p), None)
        self._steady = None

    def _check_loaded_state(self, p, state, layout: lay.StateLayout, group) -> None:
        _state.check_loaded_state(p, state, layout, self.family, self._n_states(group))

    # ------------------------------------------------------------------ torch interop
    def _from_torch_state(self, p, local, st, group) -> Dict[str, Any]:
        """Quantize a plain torch.optim state entry into this optimizer's layout."""
        return _state.from_torch_state(
            p, local, st, self._make_info(p).layout, self.family, self._n_states(group), self.config.group_size
        )

    def dequantized_state(self, p: torch.Tensor, group: Optional[Dict[str, Any]] = None) -> Dict[str, torch.Tensor]:
        """fp32 moments (shaped like the local param) and the fp32 master of one parameter."""
        st = self.state[p]
        info = self._info.get(p)
        if info is None:
            info = self._info[p] = self._make_info(p)
        layout = info.layout
        local = self._local(p)
        out = {"step": st["step"]}
        out["master"] = nx.merge_master(local.reshape(-1), st.get("rho")).view(local.shape)
        for name, kind in FAMILIES[self.family][: self._n_states(group if group is not None else self._group_of(p))]:
            out[name] = _state.dequantize_moment(st, name, kind, layout, local)
        return out

    def torch_state_dict(self) -> Dict[str, Any]:
        """A dequantized state dict that the matching ``torch.optim`` optimizer loads.

        Moments become fp32 tensors shaped like the parameters (DTensors like the parameter
        for FSDP2/HSDP, so DCP and torch's state-dict APIs place them); ``step`` a float
        tensor. The fp32 masters are not part of a torch optimizer state; get them with
        :meth:`master_params` (θ' + ρ correction).
        """
        return _state.torch_state_dict(self, super().state_dict())

    @torch.no_grad()
    def master_params(self) -> List[torch.Tensor]:
        """fp32 master of every parameter (θ' + ρ correction; θ' itself where no ρ is kept)."""
        out = []
        for g in self.param_groups:
            for p in g["params"]:
                local = self._local(p)
                rho = self.state[p].get("rho") if p in self.state else None
                out.append(nx.merge_master(local.reshape(-1), rho).view(local.shape))
        return out
