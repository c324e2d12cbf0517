"""AdaLoRA: SVD-shaped adapters whose rank budget is allocated during training.

Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (ICLR 2023,
arXiv 2303.10512), with Hugging Face PEFT's ``AdaLoraModel``/``RankAllocator`` as the reference
behaviour. Each targeted kernel gets ``delta = scale * P @ diag(E) @ Q`` at a fixed maximum rank
``init_r``; pruning zeroes entries of ``E`` (the paper's Lambda), so shapes never change and a
jitted train step never recompiles. :func:`finalize` then cuts every module to its surviving rank
and returns a plain :class:`lora_jax.LoraWeight` tree.

Where PEFT (``peft/tuners/adalora``) is followed: the scaling ``alpha / (init_r + 1e-5)``
(``SVDLinear.forward``), the init, the budget schedule, the importance EMAs and the masking
rule (``RankAllocator``), the phases (``AdaLoraModel.update_and_allocate``) and the default
regulariser (``AdaLoraModel.forward``). Beyond PEFT: a target budget equal to the initial one
prunes nothing (``torch.kthvalue`` with k = 0 raises), and ``Allocator(sticky=True)`` keeps
pruned triplets pruned.

>>> import jax, jax.numpy as jnp, optax
>>> from lora_jax import adalora
>>> params = {"fc": {"kernel": jnp.ones((6, 4))}, "out": {"kernel": jnp.ones((4, 3))}}
>>> lora = adalora.init(params, init_r=3, target_r=1, key=jax.random.key(0))
>>> alloc = adalora.Allocator(total_steps=6, tinit=1, tfinal=2, delta_t=1)
>>> state = alloc.init(lora)
>>> def loss(l):  # a stand-in for the task loss
...     d = l["fc"]["kernel"].delta() @ l["out"]["kernel"].delta()
...     return jnp.sum((d - 1.0) ** 2) + 0.5 * adalora.orth_reg(l)
>>> opt = optax.adam(1e-2); opt_state = opt.init(lora)
>>> @jax.jit
... def train_step(lora, opt_state, state, step):
...     grads = jax.grad(loss)(lora)
...     updates, opt_state = opt.update(grads, opt_state)
...     lora = optax.apply_updates(lora, updates)
...     lora, state = alloc.update(lora, state, grads, step)
...     return lora, opt_state, state
>>> for step in range(6):
...     lora, opt_state, state = train_step(lora, opt_state, state, step)
>>> final, ranks = adalora.finalize(lora, state)
>>> sum(ranks.values())   # the target budget: target_r per module
2
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lora_jax import layouts as Lay
from lora_jax import lora as L
from lora_jax import paths as P
from lora_jax import validation as V

PyTree = Any

# PEFT adds 1e-5 to the rank in the denominator of its scaling (SVDLinear.forward/get_delta_weight:
# ``scaling / (ranknum + 1e-5)``, with ranknum = init_r for the whole of training).
_RANK_EPS = 1e-5


@struct.dataclass
class AdaLoraWeight(L.LowRankLeaf):
    """An AdaLoRA adapter for one kernel: ``delta = scale * tensordot(p * e, q, 1)``.

    Attributes:
      p: ``(*stack, *in_dims, r)``, input-side singular vectors (PEFT's ``lora_A`` transposed).
      e: ``(*stack, r)``, the singular values Lambda (PEFT's ``lora_E``); zero at init.
      q: ``(*stack, r, *out_dims)``, output-side vectors (PEFT's ``lora_B`` transposed).
      alpha: PEFT's ``lora_alpha`` (static); ``scale = alpha / (init_r + 1e-5)`` as in PEFT.
      target_r: the average rank the allocator prunes to (static).
      in_axes: how many kernel axes (after the stack axes) are the input (static).
      stack_axes: leading axes that stack layers (static); every slice is its own module.
      dropout: dropout rate on the adapter's input path (static).
      roles: the kernel's layout (static; see :class:`lora_jax.LoraWeight`).
    """

    p: jax.Array
    e: jax.Array
    q: jax.Array
    alpha: float = struct.field(pytree_node=False, default=1.0)
    target_r: int = struct.field(pytree_node=False, default=0)
    in_axes: int = struct.field(pytree_node=False, default=1)
    stack_axes: int = struct.field(pytree_node=False, default=0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    roles: str = struct.field(pytree_node=False, default="")

    kind: ClassVar[str] = "AdaLoRA"
    peft_type: ClassVar[str] = "ADALORA"
    field_roles: ClassVar[dict[str, str]] = {"p": "in", "e": "rank", "q": "out"}

    def hparams(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "target_r": self.target_r}

    def check(self, where: str) -> None:
        V.leaf_arrays(self, where)
        sa = V.integer(self.stack_axes, f"{where}: stack_axes", low=0)
        want = tuple(self.p.shape[:sa]) + tuple(self.p.shape[-1:])
        if tuple(self.e.shape) != want:  # one singular value per rank
            raise ValueError(f"{where}: e has shape {tuple(self.e.shape)}, expected {want} "
                             f"(stack axes + the rank of p {tuple(self.p.shape)})")
        super().check(where)

    def peft_matrices(self, index: tuple[int, ...]) -> dict[str, np.ndarray]:
        """PEFT's ``lora_A`` ``(r, in)`` = Pᵀ, ``lora_B`` ``(out, r)`` = Qᵀ and ``lora_E``
        ``(r, 1)`` at one stack index."""
        p, e, q = (np.asarray(x[index]) for x in (self.p, self.e, self.q))
        r = p.shape[-1]
        return {"lora_A": p.reshape(-1, r).T, "lora_B": q.reshape(r, -1).T,
                "lora_E": e.reshape(r, 1)}

    def factors(self) -> tuple[jax.Array, jax.Array]:
        """``(P * E, Q)``: E broadcast over the input axes, so ``delta = scale * A @ B``."""
        e = self.e.reshape(self.e.shape[:-1] + (1,) * len(self.in_shape) + self.e.shape[-1:])
        return self.p * e.astype(self.p.dtype), self.q

    @property
    def scale(self) -> float:
        return self.alpha / (self.r + _RANK_EPS)

    # Shapes from the stored arrays, without forming P * E.
    @property
    def r(self) -> int:
        return self.p.shape[-1]

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.p.shape[: self.stack_axes])

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.p.shape[self.stack_axes : -1])

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape[self.stack_axes + 1 :])


def init(
    params: PyTree,
    init_r: int = 12,
    target_r: int = 8,
    *,
    key: jax.Array,
    alpha: float | None = None,
    targets: P.Pattern | None = None,
    exclude: P.Pattern | None = None,
    rules: Sequence[P.Rule] | None = None,
    in_axes: int | Mapping[str, int] | None = None,
    stack_axes: int | Mapping[str, int] | None = None,
    dtype=jnp.float32,
    dropout: float = 0.0,
    layouts: Mapping[str, Any] | None = None,
) -> dict:
    """Creates an AdaLoRA tree for ``params`` (PEFT ``AdaLoraLayer.reset_lora_parameters``).

    ``P`` and ``Q`` start as N(0, 0.02^2) and ``E`` at zero, so the model is unchanged at init.
    Target selection, per-module rules and validation are those of :func:`lora_jax.init`;
    a rule's ``r`` sets that module's ``init_r``.

    Args:
      params: a parameter pytree.
      init_r: the starting (maximum) rank of every module.
      target_r: the average rank after pruning; the global final budget is
        ``target_r`` times the number of modules (PEFT ``RankAllocator.target_bgt``).
      key: a PRNG key; each leaf uses ``fold_in(key, crc32(path))``.
      alpha: PEFT's ``lora_alpha``; ``None`` or ``0`` mean ``init_r`` (PEFT uses ``r`` when
        ``lora_alpha`` is 0; note PEFT's config default is 8).
      targets, exclude, rules, in_axes, stack_axes, layouts: as in :func:`lora_jax.init`
        (P spans the input axes, Q the output axes).
      dtype: dtype of P, E and Q.
      dropout: PEFT's ``lora_dropout`` on the adapter input path.

    Returns:
      A nested dict with an :class:`AdaLoraWeight` at every targeted path.

    Raises:
      ValueError: ``target_r > init_r``, a bad pattern, a rank above ``min(in, out)``.

    >>> import jax, jax.numpy as jnp
    >>> from lora_jax import adalora
    >>> w = adalora.init({"kernel": jnp.ones((8, 4))}, init_r=3, target_r=2,
    ...                  key=jax.random.key(0))["kernel"]
    >>> w.p.shape, w.e.shape, w.q.shape, round(w.scale, 4)
    ((8, 3), (3,), (3, 4), 1.0)
    """
    target_r = V.integer(target_r, "adalora.init: target_r", low=0)
    init_r, alpha, dropout, in_axes, stack_axes = V.init_args(
        "adalora.init", params, init_r, key, alpha, targets, exclude, rules, dtype, dropout,
        in_axes, stack_axes, alpha_zero_means="init_r, as PEFT", layouts=layouts)
    if target_r > init_r:
        raise ValueError(f"target_r={target_r} must not exceed init_r={init_r}")
    spec = L.resolve_targets(
        params, r=init_r, alpha=alpha, targets=targets, exclude=exclude, rules=rules,
        in_axes=in_axes, stack_axes=stack_axes, layouts=layouts,
    )
    out = {}
    for path, s in spec.items():
        k = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
        kp, kq = jax.random.split(k)
        shape, r, roles = s["shape"], s["r"], s["roles"]
        stack, in_dims, out_dims = Lay.split(roles, shape)
        canonical = roles == Lay.canonical(len(shape), len(in_dims), len(stack))
        out[path] = AdaLoraWeight(
            p=_normal(kp, stack + in_dims + (r,), dtype),
            e=jnp.zeros(stack + (r,), dtype),
            q=_normal(kq, stack + (r,) + out_dims, dtype),
            alpha=float(s["alpha"] or r), target_r=target_r, in_axes=len(in_dims),
            stack_axes=len(stack), dropout=dropout, roles="" if canonical else roles,
        )
    return L.from_leaves(out)


def _normal(key, shape, dtype):
    # N(0, 0.02^2), PEFT reset_lora_parameters. Drawn flat: XLA:CPU compiles a 1-D threefry
    # draw several times faster than an n-D one.
    return (0.02 * jax.random.normal(key, (math.prod(shape),), dtype)).reshape(shape)


# ----------------------------------------------------------------------------------------
# Orthogonal regulariser


def orth_reg(lora: PyTree, *, kind: str = "peft") -> jax.Array:
    """The orthogonality penalty on P and Q, to add to the loss (times a weight, PEFT: 0.5).

    ``kind="peft"`` (default) follows ``AdaLoraModel.forward``: the plain Frobenius norms
    ``||P^T P - I||`` and ``||Q Q^T - I||`` (PEFT's ``lora_A @ lora_A.T`` and
    ``lora_B.T @ lora_B``), averaged over all P and Q matrices. ``kind="paper"`` is the paper's
    Eq. 4 summed over modules: ``sum ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2``. Each stacked
    slice counts as one module. Computed in float32.

    >>> import jax, jax.numpy as jnp
    >>> from lora_jax import adalora
    >>> q = jnp.eye(2, 3) * jnp.array([[2.0], [1.0]])     # Q Q^T - I = diag(3, 0)
    >>> w = adalora.AdaLoraWeight(p=jnp.eye(4, 2), e=jnp.ones(2), q=q)
    >>> float(adalora.orth_reg({"k": w})), float(adalora.orth_reg({"k": w}, kind="paper"))
    (1.5, 9.0)
    """
    if kind not in ("peft", "paper"):
        raise ValueError(f"orth_reg kind must be 'peft' or 'paper', got {kind!r}")
    sq = []
    for w in _split(lora)[1]:
        s, r = w.stack_shape, w.r
        p = w.p.astype(jnp.float32).reshape(s + (-1, r))
        q = w.q.astype(jnp.float32).reshape(s + (r, -1))
        for m in (jnp.matmul(jnp.swapaxes(p, -1, -2), p, precision="highest"),
                  jnp.matmul(q, jnp.swapaxes(q, -1, -2), precision="highest")):
            sq.append(jnp.sum((m - jnp.eye(r)) ** 2, axis=(-2, -1)).reshape(-1))
    sq = jnp.concatenate(sq)
    if kind == "paper":
        return jnp.sum(sq)
    pos = sq > 0  # sqrt with a zero (not NaN) gradient at an exactly orthonormal factor
    return jnp.mean(jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0))


# ----------------------------------------------------------------------------------------
# Rank allocator


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
        paths, ws, tdef = _split(lora)
        b0, bt = _budgets(ws)
        if bt > b0:
            raise ValueError(f"target budget {bt} exceeds the initial budget {b0}")
        # Distinct buffers for the two EMAs, so that the state can be donated to a jitted step.
        zeros = [jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), lora) for _ in range(2)]
        mask = tdef.unflatten([jnp.ones(w.e.shape, bool) for w in ws])
        return AllocatorState(*zeros, mask, jnp.asarray(b0, jnp.int32))

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
        paths, ws, tdef = _split(lora)
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
    paths, ws, tdef = _split(lora)
    V.allocator_state(paths, ws, state, "adalora.apply_mask")
    masks = tdef.flatten_up_to(state.mask)
    return tdef.unflatten([w.replace(e=jnp.where(m, w.e, 0).astype(w.e.dtype))
                           for w, m in zip(ws, masks)])


def finalize(lora: PyTree, state: AllocatorState) -> tuple[dict, dict[str, int]]:
    """Cuts every module to its surviving rank: a plain LoRA tree and the rank pattern.

    E (masked) is folded into ``a = P * E``, ``b = Q``, with ``alpha = scale * r`` so that the
    LoraWeight scale ``alpha / r`` equals the AdaLoRA scale: ``lora_jax.merge(base, final)``
    equals ``lora_jax.merge(base, apply_mask(lora, state))``. A module pruned to rank 0 is left
    out of the tree and reported with rank 0. For stacked leaves the rank is the largest over
    the slices; slices with fewer survivors get zero columns. Not jittable (shapes depend on
    the mask).

    Returns:
      ``(tree of lora_jax.LoraWeight, {path: rank})``.

    >>> import jax, jax.numpy as jnp
    >>> from lora_jax import adalora
    >>> lora = adalora.init({"kernel": jnp.ones((4, 4))}, init_r=3, target_r=1,
    ...                     key=jax.random.key(0))
    >>> state = adalora.Allocator(total_steps=4).init(lora)
    >>> state = state._replace(mask={"kernel": jnp.array([True, False, True])})
    >>> final, ranks = adalora.finalize(lora, state)
    >>> final["kernel"].a.shape, ranks
    ((4, 2), {'kernel': 2})
    """
    paths, ws, tdef = _split(lora)
    V.allocator_state(paths, ws, state, "adalora.finalize")
    masks = tdef.flatten_up_to(state.mask)
    out, ranks = {}, {}
    for path, w, m in zip(paths, ws, masks):
        m = np.asarray(m, bool)
        rank = int(m.sum(-1).max(initial=0)) if m.size else 0
        ranks[path] = rank
        if rank == 0:
            continue
        sa, nin, nout = w.stack_axes, len(w.in_shape), len(w.out_shape)
        # Survivors first (stable), then pruned ones whose folded columns are zero. On the host
        # (numpy): a one-off export, so no compilation per module shape.
        idx = np.argsort(~m, axis=-1, kind="stable")[..., :rank]
        p, e, q = (np.asarray(x) for x in (w.p, w.e, w.q))
        pe = p * np.where(m, e, 0).astype(p.dtype).reshape(m.shape[:-1] + (1,) * nin + m.shape[-1:])
        a = np.take_along_axis(pe, idx.reshape(idx.shape[:-1] + (1,) * nin + (rank,)), axis=-1)
        b = np.take_along_axis(q, idx.reshape(idx.shape + (1,) * nout), axis=sa)
        out[path] = L.LoraWeight(a=jnp.asarray(a), b=jnp.asarray(b), alpha=w.scale * rank,
                                 in_axes=w.in_axes, stack_axes=sa, dropout=w.dropout,
                                 roles=w.roles)
    return L.from_leaves(out), ranks


# ----------------------------------------------------------------------------------------
# Helpers


def _split(lora: PyTree):
    """``(paths, AdaLoraWeight leaves, treedef)`` of an AdaLoRA tree."""
    pairs, tdef = jax.tree_util.tree_flatten_with_path(lora, is_leaf=L.is_lowrank)
    paths, ws = [P.path_str(p) for p, _ in pairs], [x for _, x in pairs]
    for path, x in zip(paths, ws):
        if not isinstance(x, AdaLoraWeight):
            raise TypeError(f"AdaLoRA tree entry {path!r} is a {type(x).__name__}, "
                            "expected lora_jax.adalora.AdaLoraWeight")
    if not ws:
        raise ValueError("the tree holds no AdaLoraWeight leaf")
    return paths, ws, tdef


def _fit(paths, ws, other: PyTree, what: str) -> list:
    """The AdaLoraWeight leaves of ``other``, checked against those of the AdaLoRA tree."""
    try:
        opaths, os_, _ = _split(other)
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
