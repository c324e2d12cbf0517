"""The rank allocator: PEFT's ``RankAllocator`` as a pure, jittable :class:`Allocator`.

Its state (:class:`AllocatorState`: importance EMAs, keep-masks, budget) is a pytree; at
masking steps the triplets of lowest importance over all modules are zeroed in E, down to a
budget that follows PEFT's cubic schedule. :func:`apply_mask` applies the current mask, and
:func:`check_state` checks that a state fits an AdaLoRA tree.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import paths as P
from lora_jax import validation as V
from lora_jax.adalora.leaf import flatten

PyTree = Any


class AllocatorState(NamedTuple):
    """The allocator's pytree state (jits, shards and checkpoints like the LoRA tree).

    Attributes:
      exp_avg_ipt: EMA of the sensitivity ``|w * g|`` per entry of P, E, Q (a tree shaped like
        the AdaLoRA tree, float32).
      exp_avg_unc: EMA of the uncertainty ``|I - exp_avg_ipt|`` per entry, same shape.
      mask: keep-mask per module, bool ``(*stack, r)``, the tree structure of the AdaLoRA tree
        with a mask in place of each leaf; all True until the first masking step.
      budget: int32 number of triplets the current mask was computed to keep.
    """

    exp_avg_ipt: PyTree
    exp_avg_unc: PyTree
    mask: PyTree
    budget: jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Allocator:
    """PEFT's ``RankAllocator`` schedule as a pure, jittable ``update``.

    Attributes:
      total_steps: PEFT's ``total_step`` (T).
      tinit: warm-up steps without pruning (budget ``b0 = sum init_r`` while ``step <= tinit``).
      tfinal: final steps at the target budget with a frozen mask, from ``T - tfinal`` on.
      delta_t: PEFT's ``deltaT``: masking happens at steps with ``step % delta_t == 0``.
      beta1: EMA factor of the sensitivity.
      beta2: EMA factor of the uncertainty.
      sticky: ``False`` (PEFT): each masking recomputes the mask from scores, a pruned
        triplet can return, and between masking steps nothing is zeroed. ``True``: a pruned
        triplet stays pruned (it counts first toward the pruned number) and the current
        mask is applied at every step.

    >>> Allocator(total_steps=1000, tinit=100, tfinal=200, delta_t=10).schedule(500, 24, 16)
    (16, True)
    """

    total_steps: int
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    sticky: bool = False

    def __post_init__(self):
        for name, low in (("total_steps", 1), ("tinit", 0), ("tfinal", 0), ("delta_t", 1)):
            object.__setattr__(self, name, V.integer(getattr(self, name), f"Allocator {name}",
                                                     low=low))
        if self.tinit + self.tfinal >= self.total_steps:
            raise ValueError(
                f"Allocator needs tinit + tfinal < total_steps for a budgeting phase, got "
                f"tinit={self.tinit}, tfinal={self.tfinal}, total_steps={self.total_steps}"
            )
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"Allocator {name} must be in (0, 1), got {getattr(self, name)}")

    def schedule(self, step: int, init_budget: int, target_budget: int) -> tuple[int, bool]:
        """``(budget, masked)`` at a (Python int) step: PEFT ``RankAllocator.budget_schedule``.

        ``masked`` says whether Lambda is masked at this step. As in PEFT's
        ``AdaLoraModel.update_and_allocate``, the step ``T - tfinal`` always masks (at the
        target budget) and every later step applies that final mask.
        """
        final = self.total_steps - self.tfinal
        if step <= self.tinit:
            return init_budget, False
        if step >= final:
            return target_budget, True
        # Cubic decrease, evaluated in Python floats exactly as PEFT does.
        mul_coeff = 1 - (step - self.tinit) / (final - self.tinit)
        budget = int((init_budget - target_budget) * (mul_coeff**3) + target_budget)
        return budget, step % self.delta_t == 0

    def init(self, lora: PyTree) -> AllocatorState:
        """Zero EMAs and an all-True mask for an AdaLoRA tree.

        Raises:
          ValueError: the tree holds no AdaLoRA leaf, or its target budget exceeds the start.
        """
        paths, ws, tdef = flatten(lora)
        b0, bt = _budgets(ws)
        if bt > b0:
            raise ValueError(f"target budget {bt} exceeds the initial budget {b0}")
        # Distinct buffers for the two EMAs, so that the state can be donated to a jitted step.
        ipt, unc = (jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), lora) for _ in range(2))
        mask = tdef.unflatten([jnp.ones(w.e.shape, bool) for w in ws])
        return AllocatorState(ipt, unc, mask, jnp.asarray(b0, jnp.int32))

    def update(
        self, lora: PyTree, state: AllocatorState, grads: PyTree, step: jax.typing.ArrayLike
    ) -> tuple[PyTree, AllocatorState]:
        """One ``update_and_allocate`` step (PEFT ``AdaLoraModel.update_and_allocate``).

        Call it after the optimizer step with that step's gradients, as PEFT does. While
        ``step < T - tfinal`` the EMAs take ``I = |w * g|``; at masking steps the triplets
        ``score(E_i) + mean(score(P[:, i])) + mean(score(Q[i, :]))`` at or below the k-th
        smallest over all modules (k = b0 - budget) are zeroed in E; at ``T - tfinal`` a final
        mask at the target budget is taken and the EMAs reset; later steps apply that mask.

        Args:
          lora: the AdaLoRA tree after the optimizer step.
          state: from :meth:`init` or the previous ``update``.
          grads: gradients of the loss w.r.t. ``lora`` (same structure and shapes).
          step: the step number, a Python int or a traced int32 scalar.

        Returns:
          ``(lora, state)``: E masked where this step masks, and the new state.

        Raises:
          ValueError: ``grads`` or ``state`` do not fit ``lora``.
        """
        paths, ws, tdef = flatten(lora)
        gs = _fit(paths, ws, grads, "grads")
        avg = _fit(paths, ws, state.exp_avg_ipt, "state.exp_avg_ipt")
        unc = _fit(paths, ws, state.exp_avg_unc, "state.exp_avg_unc")
        try:
            old = tdef.flatten_up_to(state.mask)
        except (ValueError, TypeError) as e:
            raise ValueError(f"state.mask does not fit the AdaLoRA tree: {e}") from e
        b0, bt = _budgets(ws)
        final = self.total_steps - self.tfinal
        step = jnp.asarray(step, jnp.int32)

        # Sensitivity and uncertainty EMAs (PEFT RankAllocator.update_ipt), only before T - tfinal.
        b1, b2 = self.beta1, self.beta2
        upd = step < final
        new_avg, new_unc = [], []
        for w, g, a, u in zip(ws, gs, avg, unc):
            fa, fu = {}, {}
            for f in ("p", "e", "q"):
                ipt = jnp.abs(getattr(w, f).astype(jnp.float32) * getattr(g, f).astype(jnp.float32))
                a1 = b1 * getattr(a, f) + (1 - b1) * ipt
                u1 = b2 * getattr(u, f) + (1 - b2) * jnp.abs(ipt - a1)
                fa[f] = jnp.where(upd, a1, getattr(a, f))
                fu[f] = jnp.where(upd, u1, getattr(u, f))
            new_avg.append(a.replace(**fa))
            new_unc.append(u.replace(**fu))

        # Masking steps: inside the budgeting window every delta_t steps, and T - tfinal itself.
        is_final = step == final
        window = (step > self.tinit) & (step < final) & (step % self.delta_t == 0)
        do_mask = window | is_final
        table = np.asarray(
            [self.schedule(j * self.delta_t, b0, bt)[0] for j in range(final // self.delta_t + 1)],
            np.int32,
        )
        budget = jnp.where(is_final, bt, jnp.asarray(table)[jnp.clip(step // self.delta_t, 0,
                                                                     len(table) - 1)])

        masks = jax.lax.cond(  # the sort only runs at masking steps
            do_mask, lambda: _mask_to_budget(ws, new_avg, new_unc, old, b0 - budget, self.sticky),
            lambda: list(old))
        apply = do_mask | (step > final) | self.sticky
        out = [w.replace(e=jnp.where(apply & ~m, jnp.zeros((), w.e.dtype), w.e))
               for w, m in zip(ws, masks)]
        # PEFT resets the importance after the final allocation (reset_ipt).
        new_avg, new_unc = (
            [jax.tree.map(lambda x: jnp.where(is_final, 0.0, x), t) for t in ts]
            for ts in (new_avg, new_unc)
        )
        new_state = AllocatorState(
            tdef.unflatten(new_avg), tdef.unflatten(new_unc), tdef.unflatten(masks),
            jnp.where(do_mask, budget, state.budget).astype(jnp.int32),
        )
        return tdef.unflatten(out), new_state


def _mask_to_budget(ws, avg, unc, old_masks, k, sticky):
    """PEFT ``RankAllocator.mask_to_budget``: one global threshold, the k-th smallest score."""
    scores = []
    for w, a, u in zip(ws, avg, unc):
        sa, ia = w.stack_axes, len(w.in_shape)
        sp = jnp.mean(a.p * u.p, axis=tuple(range(sa, sa + ia)))
        sq = jnp.mean(a.q * u.q, axis=tuple(range(sa + 1, w.q.ndim)))
        scores.append(a.e * u.e + (sp + sq))  # PEFT _combine_ipt: E + (A + B)
    if sticky:
        scores = [jnp.where(m, s, -jnp.inf) for s, m in zip(scores, old_masks)]
    flat = jnp.sort(jnp.concatenate([s.reshape(-1) for s in scores]))
    # torch.kthvalue(k) is the k-th smallest (1-based); k = 0 (no pruning) keeps everything.
    thr = jnp.where(k > 0, flat[jnp.clip(k - 1, 0, flat.size - 1)], -jnp.inf)
    return [s > thr for s in scores]


def apply_mask(lora: PyTree, state: AllocatorState) -> PyTree:
    """``lora`` with E zeroed wherever the state's current mask prunes (jittable).

    >>> import jax, jax.numpy as jnp
    >>> from lora_jax import adalora
    >>> lora = adalora.init({"kernel": jnp.ones((4, 4))}, init_r=2, target_r=1,
    ...                     key=jax.random.key(0))
    >>> state = adalora.Allocator(total_steps=4).init(lora)
    >>> adalora.apply_mask(lora, state)["kernel"].e.shape
    (2,)
    """
    paths, ws, tdef = flatten(lora)
    check_state(paths, ws, state, "adalora.apply_mask")
    masks = tdef.flatten_up_to(state.mask)
    return tdef.unflatten([w.replace(e=jnp.where(m, w.e, 0).astype(w.e.dtype))
                           for w, m in zip(ws, masks)])


def check_state(paths: list[str], ws: list, state: Any, where: str) -> None:
    """``state`` is an allocator state whose masks fit the AdaLoRA leaves ``ws`` at ``paths``."""
    mask = getattr(state, "mask", None)
    if mask is None:
        raise TypeError(f"{where}: state is a {type(state).__name__}, expected the "
                        "AllocatorState from Allocator.init/update for this AdaLoRA tree")
    got = dict(P.flatten(mask))
    extra, missing = sorted(set(got) - set(paths)), sorted(set(paths) - set(got))
    if extra or missing:
        raise ValueError(f"{where}: state.mask does not fit the AdaLoRA tree: it has masks for "
                         f"{extra or 'no'} extra and lacks {missing or 'no'} of the tree's paths; "
                         "was the state made for another tree?")
    for path, w in zip(paths, ws):
        m = got[path]
        if tuple(getattr(m, "shape", ())) != tuple(w.e.shape):
            raise ValueError(f"{where}: state.mask at {path!r} has shape "
                             f"{tuple(getattr(m, 'shape', ()))}, the tree's e has shape "
                             f"{tuple(w.e.shape)}; was the state made for another tree?")


def _fit(paths, ws, other: PyTree, what: str) -> list:
    """The AdaLoraWeight leaves of ``other``, checked against those of the AdaLoRA tree."""
    try:
        opaths, os_, _ = flatten(other)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} does not fit the AdaLoRA tree: {e}") from e
    if opaths != paths:
        extra, missing = sorted(set(opaths) - set(paths)), sorted(set(paths) - set(opaths))
        raise ValueError(f"{what} does not fit the AdaLoRA tree: it has {extra or 'no'} extra and "
                         f"{missing or 'no'} missing paths (order {opaths} vs {paths})")
    for path, w, o in zip(paths, ws, os_):
        for f in ("p", "e", "q"):
            if getattr(o, f).shape != getattr(w, f).shape:
                raise ValueError(f"{what} at {path!r}: {f} has shape {getattr(o, f).shape}, "
                                 f"expected {getattr(w, f).shape}")
    return os_


def _budgets(ws) -> tuple[int, int]:
    """PEFT ``RankAllocator._set_budget_scheduler``: sum of init_r and of target_r (per slice)."""
    n = [math.prod(w.stack_shape) for w in ws]
    return (sum(k * w.r for k, w in zip(n, ws)), sum(k * w.target_r for k, w in zip(n, ws)))
