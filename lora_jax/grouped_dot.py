"""The LoRA grouped matmul: ``ragged_dot_general`` over a stack of experts, never merged.

A mixture-of-experts layer multiplies tokens sorted by expert by that expert's kernel,
``y[rows of g] = x[rows of g] · W_g`` (``jax.lax.ragged_dot``). With an adapter per expert,
``W_g = W0_g + s·A_g·B_g``, this module computes

* forward: ``x·W0_g + s·(x·A_g)·B_g``, both terms grouped matmuls over the same group sizes
  (the low-rank term as two thin ones), so no ``E x D x F`` update is ever formed;
* backward (custom VJP): ``dx = dy·W0_gᵀ + s·(dy·B_gᵀ)·A_gᵀ`` and ``dA``, ``dB`` as grouped
  thin matmuls; the frozen base (dense, or quantized and dequantized again here rather than
  kept alive) gets no cotangent.

Only the grouped operand (``rhs``) may be the weight, with exactly one group dimension (the
first mode of ``ragged_dot_general``: the ragged dimension is a row dimension of ``x``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax import lax

from lora_jax import fast_dot


@dataclasses.dataclass(frozen=True)
class RaggedSpec:
    """A ``ragged_dot_general`` use of an adapted expert stack.

    ``layout`` maps the weight view's contracted dims, its group dim (as the batch dim) and
    its free dims onto the adapter's axes; ``params`` are the equation's params (sorted
    items); ``ops`` the view ops replayed on the kernel.
    """

    layout: fast_dot.Layout
    ops: tuple
    params: tuple
    view_dtype: Any
    x_contract: tuple  # x's contracted dims, paired in order with the weight view's
    x_ragged: int  # x's ragged (row) dim


def _ragged(lhs, rhs, group_sizes, lhs_contract, rhs_contract, ragged, params):
    dn = lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=((tuple(lhs_contract), tuple(rhs_contract)), ((), ())),
        lhs_ragged_dimensions=(ragged,), rhs_group_dimensions=(0,))
    return lax.ragged_dot_general(lhs, rhs, group_sizes, dn,
                                  precision=params.get("precision"),
                                  preferred_element_type=params.get("preferred_element_type"))


def base_ragged(x, w, group_sizes, spec_params: tuple):
    """The equation itself: ``ragged_dot_general(x, w, group_sizes)`` with its params."""
    return lax.ragged_dot_general(x, w, group_sizes, **dict(spec_params))


def lowrank_ragged(x, leaf, group_sizes, spec: RaggedSpec):
    """``s · ragged_dot_general(x, view(A·B))`` as two grouped thin matmuls."""
    u, v = fast_dot._factor_views(leaf, spec.layout, spec.view_dtype)  # (g,*c,R), (g,R,*f)
    params = dict(spec.params)
    nc = len(spec.layout.c_shape)
    xu = _ragged(x, u, group_sizes, spec.x_contract, range(1, nc + 1), spec.x_ragged, params)
    xu = xu.astype(v.dtype)
    free = [d for d in range(x.ndim) if d not in spec.x_contract]
    y = _ragged(xu, v, group_sizes, (xu.ndim - 1,), (1,), free.index(spec.x_ragged), params)
    return (leaf.scale * y).astype(y.dtype)


def lora_ragged_dot(x, x_low, base, leaf, group_sizes, spec: RaggedSpec):
    """``ragged_dot_general(x, view(W0)) + s·ragged_dot_general(x_low, view(A·B))``.

    ``x_low`` is ``x`` itself, or ``x`` after LoRA dropout (PEFT's unmerged form). The base
    is dequantized at its use, and again in the backward pass instead of being saved.
    """

    @jax.custom_vjp
    def f(x, x_low, base, leaf, group_sizes):
        return fwd(x, x_low, base, leaf, group_sizes)[0]

    def fwd(x, x_low, base, leaf, group_sizes):
        w0 = fast_dot.merged_view(base, None, spec.ops, anchor=x)
        y0 = base_ragged(x, w0, group_sizes, spec.params)
        y = y0 + lowrank_ragged(x_low, leaf, group_sizes, spec).astype(y0.dtype)
        return y, (x_low, base, leaf, group_sizes)

    def bwd(res, dy):
        x_low, base, leaf, group_sizes = res
        w0 = fast_dot.merged_view(base, None, spec.ops, anchor=dy)  # recomputed, not saved
        (dx,) = jax.linear_transpose(lambda x_: base_ragged(x_, w0, group_sizes, spec.params),
                                     x_aval)(dy)
        y_low, vjp = jax.vjp(lambda xl, lf: lowrank_ragged(xl, lf, group_sizes, spec),
                             x_low, leaf)
        dx_low, dleaf = vjp(dy.astype(y_low.dtype))
        return dx.astype(x_aval.dtype), dx_low.astype(x_low.dtype), None, dleaf, None

    x_aval = jax.ShapeDtypeStruct(x.shape, x.dtype)
    f.defvjp(fwd, bwd)
    return f(x, x_low, base, leaf, group_sizes)


def frozen_ragged_dot(x, base, group_sizes, ops: tuple, spec_params: tuple):
    """``ragged_dot_general`` with a frozen (e.g. quantized) expert stack, dequantized at
    its use and again in the backward pass."""

    @jax.custom_vjp
    def f(x, base, group_sizes):
        return base_ragged(x, fast_dot.merged_view(base, None, ops, anchor=x), group_sizes,
                           spec_params)

    def fwd(x, base, group_sizes):
        return f(x, base, group_sizes), (base, group_sizes)

    def bwd(res, dy):
        base, group_sizes = res
        w0 = fast_dot.merged_view(base, None, ops, anchor=dy)
        (dx,) = jax.linear_transpose(lambda x_: base_ragged(x_, w0, group_sizes, spec_params),
                                     x_aval)(dy)
        return dx, None, None

    x_aval = jax.ShapeDtypeStruct(x.shape, x.dtype)
    f.defvjp(fwd, bwd)
    return f(x, base, group_sizes)


def check_group_sizes(group_sizes, rows: int, n_groups: int, path: str) -> None:
    """Concrete group sizes must be ``n_groups`` non-negative counts summing to ``rows``
    (traced ones are checked by shape only)."""
    shape = tuple(np.shape(group_sizes))
    if shape[-1:] != (n_groups,):
        raise ValueError(f"ragged_dot_general with expert weight {path!r}: group_sizes has shape "
                         f"{shape}, expected one size per expert ({n_groups},)")
    if isinstance(group_sizes, jax.core.Tracer) or len(shape) != 1:
        return
    sizes = np.asarray(group_sizes)
    if (sizes < 0).any() or int(sizes.sum()) != rows:
        raise ValueError(f"ragged_dot_general with expert weight {path!r}: group_sizes "
                         f"{sizes.tolist()} sum to {int(sizes.sum())}, expected the number of "
                         f"rows, {rows}, sorted by expert")
