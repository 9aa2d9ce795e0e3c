"""Clipping by global gradient norm, with and without gradient release, on any engine.

Without release, ``torch.nn.utils.clip_grad_norm_`` works as usual (under FSDP2 it reduces the
DTensor norms over the mesh). :func:`grad_norm` computes the same global norm with a fixed
reduction order and one collective per mesh, and is what the release clipper uses.

**With release** the global norm is not known when the first parameter is updated: the hooks run
in the middle of backward, each seeing one gradient. :func:`enable_gradient_release_with_clipping`
offers two modes:

``mode="previous"`` (default)
    Each step is clipped with the global norm of the *previous* step's gradients:
    ``coef_t = min(1, max_norm / (‖g_{t-1}‖ + 1e-6))``. The hooks accumulate this step's norm
    as they go (one tiny all-reduce per mesh at the end of backward, no extra pass, no host sync)
    and the first step is not clipped. Chosen as the default because it costs nothing: the
    gradient norm of consecutive steps moves slowly, clipping is a guard against sustained large
    gradients, and Adam-family updates are invariant to a uniform gradient scale anyway (clipping
    only changes how much the step's gradient weighs in the moments). Limitation: the first step
    of a sudden spike goes through unclipped (it is clipped from the next step on). A non-finite
    norm is recorded in :attr:`last_norm` and not used (the next coefficient is 1).

``mode="two_pass"``
    Exact clipping at the cost of one extra forward+backward per step: run the step's
    forward/backward once inside ``with handle.measure():`` — the hooks only accumulate the norm
    and free each gradient, nothing is updated — then run forward/backward again; the second pass
    updates with ``coef = min(1, max_norm / (‖g‖ + 1e-6))`` of the measured norm. Use it when
    exact ``clip_grad_norm_`` semantics matter more than compute (and the forward is
    deterministic, so both passes see the same gradient).

Both modes accept ``norm_type`` 2 (default), any p > 0, or ``inf``.

The reduction: a DTensor gradient's local norm is summed (or max-ed) over the mesh dims on which
the parameter is *sharded* — ``Shard(0)``, ``Shard(1)``, ``_StridedShard`` (FSDP2, tensor
parallelism) — and not over ``Replicate`` dims, whose ranks hold copies (HSDP replicas; norm
weights replicated over the tensor-parallel dim), so nothing is counted twice. Parameters on
different meshes (e.g. TP weights on the (dp, tp) mesh, FSDP-only norms on the dp mesh) are
reduced per mesh and then added. Plain tensors (one device, DDP, replicated) are already global.
FSDP1 and DDP do not support release (see :mod:`.ddp`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import layout as lay
from ..placements import mesh_dims_sharding
from .fsdp2 import is_dtensor

__all__ = ["grad_norm", "clip_coefficient", "enable_gradient_release_with_clipping", "ClippedReleaseHandle"]


def _local_grad(p: torch.Tensor) -> Optional[torch.Tensor]:
    spec = lay.resolve_shard(p)
    return spec.grad(p) if spec.grad is not None else p.grad


def _reduction_key(p) -> Tuple:
    """(sort key, mesh or None, shard mesh dims) of the group that reduces ``p``'s local norm."""
    if not is_dtensor(p):
        return (("local",), None, ())
    mesh = p.device_mesh
    dims = mesh_dims_sharding(p.placements)
    sort = ("mesh", tuple(mesh.mesh_dim_names or ()), tuple(mesh.shape), dims)
    return (sort, mesh, dims)


def _local_norm(g: torch.Tensor, norm_type: float) -> torch.Tensor:
    return torch.linalg.vector_norm(g, ord=norm_type, dtype=torch.float32)


def _combine(vals: List[torch.Tensor], norm_type: float) -> torch.Tensor:
    """Combine per-tensor norms (same device) in list order: max, or sum of p-th powers."""
    t = torch.stack(vals)
    if math.isinf(norm_type):
        return t.max()
    return t.pow(norm_type).sum()


def _reduce_keys(per_key: List[Tuple[tuple, object, tuple, torch.Tensor]], norm_type: float) -> Optional[torch.Tensor]:
    """All-reduce each key's partial over its shard dims (deterministic key order), then combine
    the keys and take the root. ``per_key`` items: (sort key, mesh, dims, partial)."""
    if not per_key:
        return None
    op = dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM
    totals = []
    for _sort, mesh, dims, part in sorted(per_key, key=lambda kv: kv[0]):
        part = part.clone()
        for d in dims:
            dist.all_reduce(part, op=op, group=mesh.get_group(d))
        totals.append(part)
    dev = totals[0].device
    total = _combine([t.to(dev) for t in totals], 1.0 if not math.isinf(norm_type) else norm_type)
    if math.isinf(norm_type):
        return total
    return total.pow(1.0 / norm_type)


def _partials(entries: List[Tuple[torch.Tensor, torch.Tensor]], norm_type: float):
    """entries: (param, local norm) in canonical (optimizer) order → per-key partials."""
    by_key: Dict[tuple, list] = {}
    for p, n in entries:
        sort, mesh, dims = _reduction_key(p)
        key = (sort, id(mesh))
        if key not in by_key:
            by_key[key] = [sort, mesh, dims, []]
        by_key[key][3].append(n)
    return [(sort, mesh, dims, _combine(vals, norm_type)) for sort, mesh, dims, vals in by_key.values()]


@torch.no_grad()
def grad_norm(params: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """Global norm of the gradients of ``params`` (a 0-d fp32 tensor), whatever the engine.

    Collective under FSDP2: every rank of the mesh must call it. Parameters without a gradient
    are skipped. Returns 0 when no parameter has a gradient.
    """
    norm_type = float(norm_type)
    entries = []
    for p in params:
        g = _local_grad(p)
        if g is not None:
            entries.append((p, _local_norm(g, norm_type)))
    total = _reduce_keys(_partials(entries, norm_type), norm_type)
    return total if total is not None else torch.zeros((), dtype=torch.float32)


def clip_coefficient(norm: torch.Tensor, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """``min(1, max_norm / (norm + eps))`` as a 0-d fp32 tensor (1 when ``norm`` is not finite),
    the coefficient ``torch.nn.utils.clip_grad_norm_`` multiplies gradients by."""
    coef = torch.clamp(max_norm / (norm + eps), max=1.0)
    return torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))


class ClippedReleaseHandle:
    """Returned by :func:`enable_gradient_release_with_clipping`.

    Attributes: ``release`` (the core :class:`~flashoptim_dist.GradientReleaseHandle`),
    ``mode``, ``max_norm``, ``norm_type``. :attr:`last_norm` is the global norm measured by the
    last completed backward (before clipping); :attr:`coef` the coefficient the next updating
    backward applies.
    """

    def __init__(self, model, optimizer, max_norm: float, norm_type: float, mode: str, eps: float):
        from ..release import enable_gradient_release

        if mode not in ("previous", "two_pass"):
            raise ValueError(f"mode must be 'previous' or 'two_pass', got {mode!r}")
        max_norm = float(max_norm)
        if not (max_norm > 0 and math.isfinite(max_norm)):
            raise ValueError(f"max_norm must be a positive finite number, got {max_norm}")
        norm_type = float(norm_type)
        if not norm_type > 0:
            raise ValueError(f"norm_type must be > 0 or inf, got {norm_type}")
        if getattr(optimizer, "gradient_release", None) is not None:
            raise RuntimeError(
                "gradient release is already enabled on this optimizer: the clipping hooks must run "
                "before the release hooks. remove() the existing handle and call "
                "enable_gradient_release_with_clipping instead of enable_gradient_release."
            )
        self.mode, self.max_norm, self.norm_type, self.eps = mode, max_norm, norm_type, eps
        self._order: Dict[int, int] = {}
        params: List[torch.Tensor] = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in self._order:
                    self._order[id(p)] = len(params)
                    params.append(p)
        self._params = params
        self._acc: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._pending = False
        self._pass_measures = False
        self._measuring = False
        self._measured = False
        self._coef: Optional[torch.Tensor] = None
        self._last_norm: Optional[torch.Tensor] = None
        # clip hooks first: post-accumulate-grad hooks run in registration order
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook) for p in params]
        try:
            self.release = enable_gradient_release(model, optimizer)
        except BaseException:
            for h in self._hooks:
                h.remove()
            raise

    # ----------------------------------------------------------------- public
    @property
    def last_norm(self) -> Optional[float]:
        """Global gradient norm of the last completed backward (None before the first)."""
        self._finish_if_pending()
        return None if self._last_norm is None else float(self._last_norm)

    @property
    def coef(self) -> float:
        """Coefficient the next updating backward multiplies the gradients by."""
        self._finish_if_pending()
        return 1.0 if self._coef is None else float(self._coef)

    @contextlib.contextmanager
    def measure(self):
        """``mode="two_pass"``: run the measuring forward/backward inside this context."""
        if self.mode != "two_pass":
            raise RuntimeError("measure() is for mode='two_pass'; mode='previous' measures every backward")
        self._finish_if_pending()
        self._measuring = True
        try:
            yield self
        finally:
            self._finish_if_pending()
            self._measuring = False
            self._measured = True

    def state_dict(self) -> Dict[str, Optional[float]]:
        """What a resumed run needs to clip as this one would: the last measured global norm
        (``mode="previous"`` clips the next updating backward with the coefficient that follows
        from it). A plain float, so it can go into a JSON train state; an fp32 norm round-trips
        exactly through a Python float."""
        self._finish_if_pending()
        return {"last_norm": None if self._last_norm is None else float(self._last_norm)}

    def load_state_dict(self, state: Dict[str, Optional[float]]) -> None:
        """Restore :meth:`state_dict`: the next updating backward is clipped with the saved norm's
        coefficient (without it, a resumed ``mode="previous"`` run would not clip its first
        step, and would leave the uninterrupted trajectory). ``two_pass`` measures every step
        anew, so the restored value only shows in :attr:`last_norm`."""
        if set(state) != {"last_norm"}:
            raise ValueError(f"not a ClippedReleaseHandle state: keys {sorted(state)} (expected ['last_norm'])")
        self._finish_if_pending()
        v = state["last_norm"]
        if v is None:
            self._last_norm = self._coef = None
            return
        self._last_norm = torch.tensor(float(v), dtype=torch.float32)
        self._coef = clip_coefficient(self._last_norm, self.max_norm, self.eps)

    def remove(self) -> None:
        """Remove the clipping hooks and the release hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.release.remove()

    # ----------------------------------------------------------------- hooks
    def _measures_now(self) -> bool:
        return self.mode == "previous" or self._measuring

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        g = _local_grad(p)
        if g is None:
            return
        if not self._pending:
            self._begin()
        if self._pass_measures:
            self._acc[self._order[id(p)]] = (p, _local_norm(g, self.norm_type))
        if self._measuring:
            p.grad = None  # nothing to update in the measuring pass; the release hook then no-ops
            return
        if self.mode == "two_pass" and not self._measured:
            raise RuntimeError(
                "two-pass clipping with gradient release: run the step's forward/backward once "
                "inside `with handle.measure():` before the updating backward"
            )
        if self._coef is not None:
            g.mul_(self._coef.to(g.device))

    def _begin(self) -> None:
        """First hook of a backward: remember what kind of pass it is, finish at its end."""
        self._pending = True
        self._pass_measures = self._measures_now()
        self._acc = {}
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_if_pending)
        except RuntimeError:
            pass  # hooks fired outside backward: finished lazily (last_norm, coef, measure())

    def _finish_if_pending(self) -> None:
        """End of a backward: reduce the accumulated norm (one all-reduce per mesh)."""
        if not self._pending:
            return
        self._pending = False
        if not self._pass_measures:  # two_pass updating pass: its measurement is used up
            self._measured = False
            return
        entries = [self._acc[i] for i in sorted(self._acc)]
        self._acc = {}
        total = _reduce_keys(_partials(entries, self.norm_type), self.norm_type)
        if total is None:
            return
        self._last_norm = total
        self._coef = clip_coefficient(total, self.max_norm, self.eps)


def enable_gradient_release_with_clipping(
    model: torch.nn.Module,
    optimizer,
    max_norm: float,
    *,
    norm_type: float = 2.0,
    mode: str = "previous",
    eps: float = 1e-6,
) -> ClippedReleaseHandle:
    """Gradient release plus clipping by global gradient norm (see the module docstring for the
    two modes). Use instead of :func:`flashoptim_dist.enable_gradient_release`, not after it.

    ``mode="previous"``::

        handle = enable_gradient_release_with_clipping(model, opt, max_norm=1.0)
        for batch in data:
            loss_fn(model, batch).backward()   # updates happen here, clipped by last step's norm
            log(handle.last_norm)

    ``mode="two_pass"``::

        handle = enable_gradient_release_with_clipping(model, opt, 1.0, mode="two_pass")
        for batch in data:
            with handle.measure():
                loss_fn(model, batch).backward()   # measures ‖g‖, updates nothing
            loss_fn(model, batch).backward()       # updates, clipped exactly
    """
    return ClippedReleaseHandle(model, optimizer, max_norm, norm_type, mode, eps)
