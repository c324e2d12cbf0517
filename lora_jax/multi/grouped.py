"""The grouped route (``routing="grouped"``): rows sorted by adapter, one grouped matmul per
factor.

Under the ``vmap`` over examples (:mod:`lora_jax.multi.routing`) each example's low-rank
term is ``s_k·(x·A_k)·B_k``. :func:`grouped_thin` is that term for one example, with a
``custom_vmap`` rule: over the examples it sorts the rows by adapter id, runs
``jax.lax.ragged_dot`` of the sorted rows with every slot's ``A`` and then ``B`` (the group
sizes are the rows per slot), and puts the rows back in their order. Rows whose id is
``-1`` or outside ``[0, K)`` form a last group multiplied by zero factors: they get the
base alone, never another slot.

Any use the rule does not cover (a dot with batch dims, a batched stack) falls back to the
per-example gather, which computes the same values.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax
from jax.custom_batching import custom_vmap

from lora_jax import fast_dot
from lora_jax.leaves import LoraWeight


def _pick(i, u, v):
    """Slot ``i``'s views (zeros for an id outside ``[0, K)``)."""
    k = u.shape[0]
    valid = (i >= 0) & (i < k)
    j = jnp.clip(i, 0, k - 1)
    return jnp.where(valid, u[j], jnp.zeros((), u.dtype)), v[j]


def grouped_thin(x, i, u, v, spec: fast_dot.DotSpec):
    """``(x·U_i)·V_i`` for one example ``x`` and its slot ``i``, over per-slot views
    ``u (K, *c, R)`` (scale folded in) and ``v (K, R, *f)``; grouped under ``vmap``.

    A ``custom_vjp`` whose forward and backward passes are each a ``custom_vmap``: autodiff
    (under ``scan``, remat) never differentiates the batching rule itself."""

    def per_example(x, i, u, v):
        uu, vv = _pick(i, u, v)
        return fast_dot._thin(x, uu, vv, 1.0, spec)

    def grouped_ok(in_batched):
        return list(in_batched[:4]) == [True, True, False, False] and not spec.x_batch

    @custom_vmap
    def forward(x, i, u, v):
        return per_example(x, i, u, v)

    @forward.def_vmap
    def forward_rule(axis_size, in_batched, x, i, u, v):
        axes = [0 if b else None for b in in_batched]
        if grouped_ok(in_batched):
            try:
                return _grouped(x, i, u, v, spec, per_example), True
            except NotImplementedError:  # ragged_dot under an outer vmap (not on axis 0)
                pass
        return jax.vmap(per_example, in_axes=axes)(x, i, u, v), True

    def backward_one(x, i, u, v, dy):
        return jax.vjp(lambda x, u, v: per_example(x, i, u, v), x, u, v)[1](dy)

    @custom_vmap
    def backward(x, i, u, v, dy):
        return backward_one(x, i, u, v, dy)

    @backward.def_vmap
    def backward_rule(axis_size, in_batched, x, i, u, v, dy):
        axes = [0 if b else None for b in in_batched]
        if grouped_ok(in_batched) and in_batched[4]:
            try:
                grads = jax.vjp(lambda x, u, v: _grouped(x, i, u, v, spec, per_example),
                                x, u, v)[1](dy)
                return grads, (True, False, False)  # the stack's gradient summed over rows
            except NotImplementedError:  # as in the forward rule
                pass
        return jax.vmap(backward_one, in_axes=axes)(x, i, u, v, dy), (True, True, True)

    @jax.custom_vjp
    def f(x, i, u, v):
        return forward(x, i, u, v)

    def fwd(x, i, u, v):
        return forward(x, i, u, v), (x, i, u, v)

    def bwd(res, dy):
        x, i, u, v = res
        dx, du, dv = backward(x, i, u, v, dy)
        return dx, None, du, dv

    f.defvjp(fwd, bwd)
    return f(x, i, u, v)


def _grouped(x, i, u, v, spec: fast_dot.DotSpec, per_example):
    n, k = x.shape[0], u.shape[0]
    out = jax.eval_shape(per_example, x[0], i[0], u, v)
    params = dict(spec.params)
    contract = tuple(spec.x_contract)
    free = tuple(d for d in range(x.ndim - 1) if d not in contract)
    free_shape = tuple(x.shape[1 + d] for d in free)
    rows_per = math.prod(free_shape)
    c_size = math.prod(x.shape[1 + d] for d in contract)
    f_shape = v.shape[2:]
    xt = jnp.transpose(x, (0,) + tuple(1 + d for d in free) + tuple(1 + d for d in contract))
    xt = xt.reshape(n, rows_per, c_size)
    key = jnp.where((i >= 0) & (i < k), i, k).astype(jnp.int32)  # k: the base-only group
    order = jnp.argsort(key, stable=True)
    sizes = (jnp.bincount(key, length=k + 1) * rows_per).astype(jnp.int32)
    rows = xt[order].reshape(n * rows_per, c_size)
    u_ext = jnp.concatenate([u.reshape(k, c_size, -1), jnp.zeros((1, c_size, u.shape[-1]),
                                                                  u.dtype)])
    v_ext = jnp.concatenate([v.reshape(k, v.shape[1], -1),
                             jnp.zeros((1, v.shape[1], math.prod(f_shape)), v.dtype)])
    kw = {"precision": params.get("precision"),
          "preferred_element_type": params.get("preferred_element_type")}
    xu = lax.ragged_dot(rows, u_ext, sizes, **kw).astype(v.dtype)
    y = lax.ragged_dot(xu, v_ext, sizes, **kw)
    y = y.reshape((n,) + free_shape + f_shape)
    y = y[jnp.argsort(order)]  # back to the examples' order
    if spec.w_is_lhs:  # dot_general puts the weight's free dims first
        nf, nx = len(f_shape), len(free_shape)
        y = jnp.transpose(y, (0,) + tuple(range(1 + nx, 1 + nx + nf)) + tuple(range(1, 1 + nx)))
    if y.shape[1:] != out.shape:
        raise AssertionError(f"grouped route: output {y.shape[1:]}, expected {out.shape}")
    return y.astype(out.dtype)


@struct.dataclass
class GroupedLora(LoraWeight):
    """One example's adapter under ``routing="grouped"``: the gathered factors (as the
    gather route; used by any path other than the thin matmuls of a dot) plus the whole
    stack (scales folded into ``slot_a``) and the slot id, for :func:`grouped_thin`."""

    slot_a: Any = None
    slot_b: Any = None
    slot_id: Any = None

    def routed_lowrank(self, x, spec: fast_dot.DotSpec):
        """``s·(x·A_i)·B_i`` as :func:`grouped_thin` (for :func:`lora_jax.fast_dot.lowrank`);
        a use of the kernel's stack axes themselves (not sliced by a scan) takes the gathered
        factors."""
        if self.stack_axes:
            u, v = fast_dot._factor_views(self, spec.layout, spec.view_dtype)
            return fast_dot._thin(x, u, v, self.scale, spec)
        plain = lambda a, b: LoraWeight(a=a, b=b, alpha=float(a.shape[-1]),  # noqa: E731
                                        in_axes=self.in_axes, stack_axes=self.stack_axes,
                                        roles=self.roles)
        views = jax.vmap(lambda a, b: fast_dot._factor_views(plain(a, b), spec.layout,
                                                             spec.view_dtype))
        u, v = views(self.slot_a, self.slot_b)
        return grouped_thin(x, self.slot_id, u, v, spec)

    def check(self, where: str) -> None:
        """The gathered adapter's checks (the slot id is an integer, the stack the caller's)."""
        LoraWeight(a=self.a, b=self.b, alpha=self.alpha, in_axes=self.in_axes,
                   stack_axes=self.stack_axes, dropout=self.dropout, roles=self.roles).check(where)
