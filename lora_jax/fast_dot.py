"""The LoRA matmul: merged-weight forward, and a backward pass that never forms dW.

For ``y = x · W`` with ``W = W0 + s·A·B`` (any ``dot_general`` layout):

* forward: one matmul with the merged weight (merging costs r/N of a matmul);
* backward: ``dx = dy · Wᵀ`` (the merged weight, recomputed rather than kept alive),
  ``dA = s·xᵀ·(dy·Bᵀ)`` and ``dB = s·(x·A)ᵀ·dy``: two thin matmuls, no ``dW = xᵀ·dy``.

The residuals are ``x``, the frozen base and the factors, so no weight-sized temporary
outlives its matmul. The base never receives a cotangent.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lora_jax import layouts as Lay
from lora_jax.anchors import after
from lora_jax.protocols import dense, is_base_leaf


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a weight view's contracted, free and batch dims map onto the adapter's axes."""

    contract_in: bool  # the matmul contracts the kernel's input axes (x·W); else output (x·Wᵀ)
    c_atoms: tuple  # kernel axes flattened into the contracted dims, in order
    f_atoms: tuple  # kernel axes flattened into the free dims, in order
    b_atoms: tuple  # kernel (stack) axes flattened into the batch dims, in order
    c_shape: tuple  # sizes of the weight view's contracted dims (dot_general order)
    f_shape: tuple  # sizes of the weight view's free dims
    b_shape: tuple  # sizes of the weight view's batch dims
    fixed: tuple  # (kernel stack axis, index) pairs the model indexed with a constant
    roles: str  # the adapter's layout
    kernel_shape: tuple


@dataclasses.dataclass(frozen=True)
class DotSpec:
    layout: Layout
    ops: tuple  # view ops replayed on the kernel
    w_is_lhs: bool
    x_contract: tuple
    x_batch: tuple
    params: tuple  # the original dot_general params, as sorted items
    view_dtype: Any


def _dot(x, w, spec: DotSpec):
    params = dict(spec.params)
    if spec.w_is_lhs:
        return lax.dot_general_p.bind(w, x, **params)
    return lax.dot_general_p.bind(x, w, **params)


def _replay(w, ops):
    """Applies recorded view ops (casts, reshapes, transposes) to a kernel."""
    for prim, params in ops:
        if prim is not None:  # (None, reason) marks a weight that must be materialized
            w = prim.bind(w, **params)
    return w


def merged_view(base, leaf, ops, anchor=None) -> jax.Array:
    """``view(W0 + s·A·B)``: the weight operand exactly as the reference model sees it.

    With ``anchor``, the dequantization and merge are computed only once ``anchor`` exists.
    A base leaf stored in another axis order (blocks along the input axes) is merged in that
    order, so the elementwise merge reads and writes contiguously; the one transpose back to
    the kernel's order folds into the consuming matmul.
    """
    leaf = after(anchor, leaf)
    order = base.storage_order if is_base_leaf(base) else None
    if order is None:
        w = lax.stop_gradient(dense(base, after=anchor))
    else:
        w = lax.stop_gradient(base.dequantize(after=anchor, stored_order=True))
    if leaf is not None:
        w = leaf.merged(w, order=order).astype(w.dtype)
    if order is not None:
        w = jnp.transpose(w, tuple(int(k) for k in np.argsort(order)))
    return _replay(w, ops)


def _factor_views(leaf, lay: Layout, dtype):
    """``U (*b_shape, *c_shape, R)`` and ``V (*b_shape, R, *f_shape)`` with
    ``view(A·B) = U·V`` over R, batched over the weight view's batch dims.

    R is the rank r, times the size of any stack axes the use keeps as free dims: their
    adapters are side by side in U and block-diagonal in V.
    """
    a, b = leaf.factors()
    ks = lay.kernel_shape
    stack, ins, outs = Lay.split(lay.roles, range(len(lay.roles)))
    r = a.shape[-1]
    a_pos = {k: j for j, k in enumerate(stack + ins)}  # A: (*stack, *in, r)
    b_pos = {k: j for j, k in enumerate(stack)}  # B: (*stack, r, *out)
    b_pos.update({k: len(stack) + 1 + j for j, k in enumerate(outs)})
    a_rank, b_rank = len(stack) + len(ins), len(stack)
    for k, idx in lay.fixed:  # w[i] on a stack axis: that adapter's factors
        a = lax.index_in_dim(a, idx, a_pos[k], keepdims=True)
        b = lax.index_in_dim(b, idx, b_pos[k], keepdims=True)
    fs = tuple(k for k in lay.f_atoms if k in stack)  # stack axes kept as free dims
    used = set(lay.b_atoms + lay.c_atoms + lay.f_atoms)
    rest = lambda axes: tuple(k for k in axes if k not in used)  # noqa: E731 (size-1 axes)
    lead = lay.b_atoms + rest(stack)
    f_core = tuple(k for k in lay.f_atoms if k not in fs)
    if lay.contract_in:
        u, u_pos, u_rank, u_rest = a, a_pos, a_rank, rest(ins)
        v, v_pos, v_rank, v_rest = b, b_pos, b_rank, rest(outs)
    else:
        u, u_pos, u_rank, u_rest = b, b_pos, b_rank, rest(outs)
        v, v_pos, v_rank, v_rest = a, a_pos, a_rank, rest(ins)
    u = u.transpose([u_pos[k] for k in lead + lay.c_atoms + u_rest + fs] + [u_rank])
    v = v.transpose([v_pos[k] for k in lead + fs] + [v_rank] + [v_pos[k] for k in f_core + v_rest])
    if fs:  # block-diagonal: V[.., (s, j), .., s', ..] = B[s, j, ..] if s == s'
        letters = iter("abcdefghijklmnopqrstuvwxyz")
        L_ = [next(letters) for _ in lead]
        S = {k: next(letters) for k in fs}
        S2 = {k: next(letters) for k in fs}
        R = next(letters)
        O_ = {k: next(letters) for k in f_core + v_rest}
        lhs = "".join(L_) + "".join(S[k] for k in fs) + R + "".join(O_[k] for k in f_core + v_rest)
        eyes = [f"{S[k]}{S2[k]}" for k in fs]
        col = {**S2, **O_}
        out = ("".join(L_) + "".join(S[k] for k in fs) + R
               + "".join(col[k] for k in lay.f_atoms) + "".join(O_[k] for k in v_rest))
        v = jnp.einsum(",".join([lhs] + eyes) + "->" + out, v,
                       *[jnp.eye(ks[k], dtype=v.dtype) for k in fs])
    big_r = r * math.prod(ks[k] for k in fs)
    u = u.reshape(lay.b_shape + lay.c_shape + (big_r,)).astype(dtype)
    v = v.reshape(lay.b_shape + (big_r,) + lay.f_shape).astype(dtype)
    return u, v


def lowrank(x, leaf, spec: DotSpec):
    """``s · dot_general(x, view(A·B))`` computed as two thin matmuls."""
    routed = getattr(leaf, "routed_lowrank", None)  # routing="grouped" (lora_jax.multi)
    if routed is not None:
        return routed(x, spec)
    u, v = _factor_views(leaf, spec.layout, spec.view_dtype)
    return _thin(x, u, v, leaf.scale, spec)


def _thin(x, u, v, scale, spec: DotSpec):
    """``s · (x·U)·V`` with a hand-written backward pass.

    Autodiff would compute ``dU = xᵀ·g`` with the rank as the output's minor dimension,
    which XLA:CPU runs 4–7× slower than the rank-major ``gᵀ·x`` (measured: 1.28 ms vs
    0.25 ms at 1024×512, r=8). The backward pass computes every factor gradient rank-major
    and transposes the small result behind an ``optimization_barrier`` so that XLA does not
    fold the transpose back into the matmul.

    Batch dims (a stack axis the model batches over, e.g. block-diagonal kernels) lead every
    intermediate, as in ``dot_general``'s output.
    """
    params = dict(spec.params)
    pet = params.get("preferred_element_type")
    prec = params.get("precision")
    nb, nc = len(spec.x_batch), len(spec.layout.c_shape)
    xb = tuple(range(nb))  # batch dims lead every intermediate
    free = tuple(d for d in range(x.ndim) if d not in spec.x_contract and d not in spec.x_batch)
    nxf, nf = len(free), v.ndim - 1 - nb
    # Positions in y (and dy) of x's free dims and of the weight's free dims.
    y_x = tuple(range(nb + nf, nb + nf + nxf)) if spec.w_is_lhs else tuple(range(nb, nb + nxf))
    y_f = tuple(range(nb, nb + nf)) if spec.w_is_lhs else tuple(range(nb + nxf, nb + nxf + nf))

    def dg(a, b, ca, cb, ba=(), bb=()):
        return lax.dot_general(a, b, ((tuple(ca), tuple(cb)), (tuple(ba), tuple(bb))),
                               precision=prec, preferred_element_type=pet)

    def xu_of(x, u):  # (*b, *x_free, r)
        return dg(x, u, spec.x_contract, range(nb, nb + nc), spec.x_batch, xb).astype(v.dtype)

    @jax.custom_vjp
    def f(x, u, v):
        return fwd(x, u, v)[0]

    def fwd(x, u, v):
        xu = xu_of(x, u)
        if spec.w_is_lhs:
            y = dg(v, xu, (nb,), (xu.ndim - 1,), xb, xb)
        else:
            y = dg(xu, v, (xu.ndim - 1,), (nb,), xb, xb)
        return (scale * y).astype(y.dtype), (x, u, v, xu)

    def bwd(res, dy):
        x, u, v, xu = res
        dy = dy.astype(v.dtype)
        g = (scale * dg(dy, v, y_f, range(nb + 1, nb + 1 + nf), xb, xb)).astype(v.dtype)
        dv = (scale * dg(xu, dy, range(nb, nb + nxf), y_x, xb, xb)).astype(v.dtype)
        dx = dg(g, u, (nb + nxf,), (nb + nc,), xb, xb)  # (*b, *x_free, *c) -> x's layout
        order = list(spec.x_batch) + list(free) + list(spec.x_contract)
        dx = dx.transpose([order.index(d) for d in range(x.ndim)]).astype(x.dtype)
        du_t = lax.optimization_barrier(
            dg(g, x, range(nb, nb + nxf), free, xb, spec.x_batch))  # (*b, r, *c in x order)
        c_sorted = sorted(spec.x_contract)
        perm = xb + tuple(nb + 1 + c_sorted.index(d) for d in spec.x_contract) + (nb,)
        du = du_t.transpose(perm).astype(u.dtype)
        return dx, du, dv

    f.defvjp(fwd, bwd)
    return f(x, u, v)


def lora_dot_general(x, base, leaf, spec: DotSpec):
    """``dot_general(x, view(W0 + s·A·B))`` with the dW-free backward pass."""

    @jax.custom_vjp
    def f(x, base, leaf):
        return _dot(x, merged_view(base, leaf, spec.ops, anchor=x), spec)

    def fwd(x, base, leaf):
        return f(x, base, leaf), (x, base, leaf)

    def bwd(res, dy):
        x, base, leaf = res
        w = merged_view(base, leaf, spec.ops, anchor=dy)  # recomputed: no weight residual
        (dx,) = jax.linear_transpose(lambda x_: _dot(x_, w, spec), x)(dy)
        y_low, vjp_l = jax.vjp(lambda l: lowrank(x, l, spec), leaf)
        (dl,) = vjp_l(dy.astype(y_low.dtype))
        return dx, None, dl

    f.defvjp(fwd, bwd)
    return f(x, base, leaf)


def rescale_output(y, units, spec: DotSpec):
    """``y`` (a ``dot_general`` output) times ``units`` ``(*stack, *out)``, one factor per
    output unit of the kernel (DoRA's ``m / ‖V‖``), placed on ``y``'s weight dims. Needs a
    use that contracts the kernel's input axes (``spec.layout.contract_in``)."""
    lay = spec.layout
    stack, _, outs = Lay.split(lay.roles, range(len(lay.roles)))
    axes = list(stack + outs)  # the kernel axes of units' dims
    for k, idx in sorted(lay.fixed, key=lambda t: -axes.index(t[0])):
        units = lax.index_in_dim(units, idx, axes.index(k), keepdims=False)
        axes.remove(k)
    want = list(lay.b_atoms + lay.f_atoms)
    units = units.reshape(tuple(n for n, k in zip(units.shape, axes) if k in want))
    units = jnp.transpose(units, [[k for k in axes if k in want].index(k) for k in want])
    nb, nf = len(lay.b_shape), len(lay.f_shape)
    ones = (1,) * (y.ndim - nb - nf)  # x's free dims
    shape = (lay.b_shape + lay.f_shape + ones if spec.w_is_lhs
             else lay.b_shape + ones + lay.f_shape)
    return (y * units.reshape(shape).astype(jnp.promote_types(y.dtype, units.dtype))
            ).astype(y.dtype)


def dropout_dot_general(x, x_dropped, base, leaf, spec: DotSpec):
    """PEFT's unmerged form with dropout: ``x·W0 + s·drop(x)·A·B`` (no dW either)."""
    w0 = merged_view(base, None, spec.ops, anchor=x)
    y0 = _dot(x, w0, spec)
    return y0 + lowrank(x_dropped, leaf, spec).astype(y0.dtype)


def unmerged_dot_general(x, base, leaf, spec: DotSpec):
    """``dot_general(x, view(W0)) + s·dot_general(x, view(A·B))``: the adapter never merged.

    For uses with few rows (decode, small batches), where forming ``W0 + s·A·B`` costs more
    than the two thin matmuls (:func:`few_rows`). The frozen base is dequantized at its use
    and again in the backward pass, as in :func:`lora_dot_general`.
    """

    @jax.custom_vjp
    def f(x, base, leaf):
        y0 = _dot(x, merged_view(base, None, spec.ops, anchor=x), spec)
        return y0 + lowrank(x, leaf, spec).astype(y0.dtype)

    def fwd(x, base, leaf):
        return f(x, base, leaf), (x, base, leaf)

    def bwd(res, dy):
        x, base, leaf = res
        w0 = merged_view(base, None, spec.ops, anchor=dy)  # recomputed: no weight residual
        (dx,) = jax.linear_transpose(lambda x_: _dot(x_, w0, spec), x)(dy)
        y_low, vjp = jax.vjp(lambda x_, l: lowrank(x_, l, spec), x, leaf)
        dx_low, dl = vjp(dy.astype(y_low.dtype))
        return (dx + dx_low.astype(dx.dtype)).astype(x.dtype), None, dl

    f.defvjp(fwd, bwd)
    return f(x, base, leaf)


def few_rows(x_shape, spec: DotSpec) -> bool:
    """True when the unmerged form costs fewer FLOPs than merging, from static shapes.

    Per block of the weight view's batch dims, with ``M`` rows (x's free dims), ``C``
    contracted and ``N`` free weight elements: merging costs ``2·C·N·r`` (forward, and again
    when the backward pass recomputes the merged weight), the unmerged low-rank term
    ``2·M·r·(C + N)`` (forward, and about the same for ``dx`` in the backward pass); the
    base matmul is common to both: unmerged saves FLOPs iff ``M·(C + N) < C·N``. It is
    taken only where it saves at least ``UNMERGED_MARGIN`` times: near the crossover the
    two thin matmuls run slower per FLOP and keep more buffers alive (measured on
    ``benchmarks/qlora.py``'s wide model, 256 rows of 1024-wide kernels: 3% fewer FLOPs,
    12% more peak memory for QLoRA). Kernels under ``MIN_UNMERGED`` elements per block
    stay merged: there the merge costs less than the extra matmuls themselves.
    """
    lay = spec.layout
    rows = math.prod(n for d, n in enumerate(x_shape)
                     if d not in spec.x_contract and d not in spec.x_batch)
    c, n = math.prod(lay.c_shape), math.prod(lay.f_shape)
    return c * n >= MIN_UNMERGED and UNMERGED_MARGIN * rows * (c + n) < c * n


MIN_UNMERGED = 1024  # kernel elements per block below which few rows still merge
UNMERGED_MARGIN = 4  # the FLOP saving the unmerged form must reach


def base_dot_general(x, base, *, ops, w_is_lhs, params):
    """``dot_general`` with a frozen (e.g. quantized) weight, dequantized at each use.

    The backward pass dequantizes again instead of keeping the dense weight alive.
    """
    spec_params = tuple(sorted(params.items(), key=lambda kv: kv[0]))

    def dot(x, w):
        if w_is_lhs:
            return lax.dot_general_p.bind(w, x, **dict(spec_params))
        return lax.dot_general_p.bind(x, w, **dict(spec_params))

    @jax.custom_vjp
    def f(x, base):
        return dot(x, merged_view(base, None, ops, anchor=x))

    def fwd(x, base):
        return f(x, base), base

    def bwd(base, dy):
        w = merged_view(base, None, ops, anchor=dy)
        (dx,) = jax.linear_transpose(lambda x_: dot(x_, w), fwd_x_aval)(dy)
        return dx, None

    fwd_x_aval = jax.ShapeDtypeStruct(x.shape, x.dtype)
    f.defvjp(fwd, bwd)
    return f(x, base)
