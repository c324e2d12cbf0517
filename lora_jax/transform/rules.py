"""Rules for the primitives that consume a weight: views, ``dot_general``, ``gather``.

A view (cast, reshape, transpose, constant slice) records the op and follows the weight's
kernel axes (:mod:`lora_jax.layouts`). A ``dot_general`` whose contracted, batch and free
dims on the weight map onto the adapter's input, stack and output axes takes the fast
LoRA matmul (:mod:`lora_jax.fast_dot`; unmerged when the use has few rows); a
``ragged_dot_general`` over a stack of experts takes grouped matmuls with the adapter
unmerged (:mod:`lora_jax.grouped_dot`); a row lookup takes ``A[ids]·B``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax import fast_dot, grouped_dot, protocols
from lora_jax import layouts as Lay
from lora_jax import paths as P
from lora_jax.leaves import LowRankLeaf
from lora_jax.transform.interpreter import Config, Tagged, bind, fallback, note, rule


@rule(*Lay.VIEW_PRIMS, "slice")
def view(cfg: Config, eqn, invals):
    if len(invals) != 1:
        return fallback(cfg, eqn, invals)
    t = invals[0]
    v = Lay.view_after(eqn, Lay.View(t.axes, t.fixed), t.kernel_shape)
    if v is None:  # e.g. a range of a kernel axis: the merged weight, for this use
        return fallback(cfg, eqn, [t], "a slice across the kernel's axes")
    out_aval = eqn.outvars[0].aval
    return dataclasses.replace(
        t,
        ops=t.ops + ((eqn.primitive, dict(eqn.params)),),
        axes=v.axes,
        fixed=v.fixed,
        shape=tuple(out_aval.shape),
        dtype=out_aval.dtype,
    )


@rule("dot_general")
def dot_general(cfg: Config, eqn, invals):
    tagged = [i for i, x in enumerate(invals) if isinstance(x, Tagged)]
    if len(tagged) != 1:
        return fallback(cfg, eqn, invals)
    return _dot(cfg, eqn, invals, tagged[0])


def _lowrank_layout(t: Tagged, lora: LowRankLeaf, w_contract, w_batch, w_free):
    """How the view's contracted/batch/free dims map onto the adapter ``lora`` (``t.lora``),
    or a reason string."""
    axes = t.axes
    if axes is None:
        return "the weight was reshaped across kernel axes"
    ks = t.kernel_shape
    roles = lora.layout
    c, b, f = (tuple(k for d in dims for k in axes[d] if ks[k] != 1)
               for dims in (w_contract, w_batch, w_free))
    fixed = tuple(k for k, _ in t.fixed)
    stack, ins, outs = (tuple(k for k in range(len(ks)) if roles[k] == ch and ks[k] != 1)
                        for ch in (Lay.STACK, Lay.IN, Lay.OUT))
    hint = (f"the adapter's roles are {roles!r} (s: stack, i: input, o: output); pass "
            "layouts=lora_jax.trace(fn, params, *args) to lora_jax.init")
    if any(roles[k] != Lay.STACK for k in fixed):
        return f"the model indexes kernel axis {fixed} with a constant, not a stack axis; {hint}"
    if any(roles[k] != Lay.STACK for k in b):
        return (f"batched dot_general over kernel axes {b}, which the adapter does not treat "
                f"as stack axes; {hint}")
    # A stack axis kept as a free dim of the use (e.g. a fused kv kernel with separate k and v
    # adapters) is computed block-diagonally; one the use contracts has no low-rank form.
    free_stack = tuple(k for k in f if roles[k] == Lay.STACK)
    if any(roles[k] == Lay.STACK for k in c):
        return f"the dot_general contracts stack axes of the adapter; {hint}"
    if sorted(b + free_stack + tuple(k for k in fixed if ks[k] != 1)) != list(stack):
        return (f"stack axes {stack} of the adapter are neither batch nor free dimensions of "
                f"this dot_general, nor indexed; {hint}")
    f_core = sorted(k for k in f if roles[k] != Lay.STACK)
    if sorted(c) == list(ins) and f_core == list(outs) and c:
        contract_in = True
    elif sorted(c) == list(outs) and f_core == list(ins) and c:
        contract_in = False  # x·Wᵀ: e.g. a tied embedding used as the output head
    else:
        return (f"the dot_general contracts kernel axes {c} and keeps {f}, which do not "
                f"separate the adapter's input axes {ins} from its output axes {outs}; {hint}")
    return fast_dot.Layout(
        contract_in=contract_in,
        c_atoms=c,
        f_atoms=f,
        b_atoms=b,
        c_shape=tuple(t.shape[d] for d in w_contract),
        f_shape=tuple(t.shape[d] for d in w_free),
        b_shape=tuple(t.shape[d] for d in w_batch),
        fixed=t.fixed,
        roles=roles,
        kernel_shape=ks,
    )


def _dot(cfg: Config, eqn, invals, wi: int):
    t: Tagged = invals[wi]
    x = invals[1 - wi]
    params = dict(eqn.params)
    out_dtype = eqn.outvars[0].aval.dtype
    cd = cfg.compute_dtype
    if cd is not None and jnp.issubdtype(x.dtype, jnp.floating) and (
            jnp.dtype(cd) != x.dtype or jnp.dtype(cd) != t.dtype):
        # Mixed precision at the weight's use: x and the (dequantized, merged) weight in the
        # compute dtype, the result back in the model's dtype.
        cd = jnp.dtype(cd)
        cast = (lax.convert_element_type_p, dict(new_dtype=cd, weak_type=False, sharding=None))
        t = dataclasses.replace(t, ops=t.ops + (cast,), dtype=cd)
        x = x.astype(cd)
        invals = [t, x] if wi == 0 else [x, t]
        y = _dot_inner(cfg, eqn, invals, wi, t, x, params)
        return y.astype(out_dtype)
    return _dot_inner(cfg, eqn, invals, wi, t, x, params)


def _dot_inner(cfg: Config, eqn, invals, wi, t: Tagged, x, params):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    w_contract, w_batch = (lc, lb) if wi == 0 else (rc, rb)
    x_contract, x_batch = (rc, rb) if wi == 0 else (lc, lb)
    w_free = tuple(d for d in range(len(t.shape)) if d not in w_contract and d not in w_batch)
    if t.lora is None:  # a quantized base weight without adapter: dequantize at use
        note(cfg, t.path, "dot_general", "dequantize")
        return fast_dot.base_dot_general(x, t.base, ops=t.ops, w_is_lhs=wi == 0, params=params)
    layout = _lowrank_layout(t, t.lora, w_contract, w_batch, w_free)
    if isinstance(layout, str):
        return fallback(cfg, eqn, invals, layout)
    spec = fast_dot.DotSpec(
        layout=layout,
        ops=t.ops,
        w_is_lhs=wi == 0,
        x_contract=tuple(x_contract),
        x_batch=tuple(x_batch),
        params=tuple(sorted(params.items(), key=lambda kv: kv[0])),
        view_dtype=t.dtype,
    )
    lin = t.lora.linear_part()  # DoRA: the LoRA matmul, then a rescale per output unit
    if lin is not t.lora and not layout.contract_in:
        return fallback(cfg, eqn, invals, "x·Wᵀ of an adapter that rescales output units")
    tag = "" if lin is t.lora else "+rescale"
    if t.lora.dropout > 0.0 and cfg.rng is not None:
        note(cfg, t.path, "dot_general", "fast-dropout" + tag)
        key = use_key(cfg, cfg.rng, t.path)
        keep = 1.0 - t.lora.dropout
        mask = jax.random.bernoulli(key, keep, x.shape)
        xd = jnp.where(mask, x / keep, 0).astype(x.dtype)
        y = fast_dot.dropout_dot_general(x, xd, t.base, lin, spec)
    elif cfg.unmerged:
        note(cfg, t.path, "dot_general", "fast-unmerged" + tag)
        y = fast_dot.dropout_dot_general(x, x, t.base, lin, spec)
    elif lin is t.lora and fast_dot.few_rows(x.shape, spec):
        # Decode, small batches: merging costs more. (DoRA's column norms need the merged
        # weight whatever the rows.) Reported as "fast": the same dW-free route, unmerged.
        note(cfg, t.path, "dot_general", "fast")
        y = fast_dot.unmerged_dot_general(x, t.base, lin, spec)
    else:
        note(cfg, t.path, "dot_general", "fast" + tag)
        y = fast_dot.lora_dot_general(x, t.base, lin, spec)
    if lin is t.lora:
        return y
    w0 = lax.stop_gradient(protocols.dense(t.base, after=x))
    return fast_dot.rescale_output(y, t.lora.output_scale(w0), spec)


@rule("ragged_dot_general")
def ragged_dot_general(cfg: Config, eqn, invals):
    """Tokens sorted by expert times a stack of expert kernels: grouped matmuls with the
    adapter unmerged (:mod:`lora_jax.grouped_dot`)."""
    x, t, group_sizes = invals
    if not isinstance(t, Tagged) or isinstance(x, Tagged) or isinstance(group_sizes, Tagged):
        return fallback(cfg, eqn, invals, "the weight is not the grouped operand (rhs)")
    dn = eqn.params["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = dn.dot_dimension_numbers
    if len(dn.rhs_group_dimensions) != 1 or lb or rb or eqn.params.get("group_offset") is not None:
        return fallback(cfg, eqn, invals, "a ragged_dot_general other than rows grouped by "
                        "expert (one group dimension, no batch dimensions, no group_offset)")
    (w_group,) = dn.rhs_group_dimensions
    (x_ragged,) = dn.lhs_ragged_dimensions
    w_free = tuple(d for d in range(len(t.shape)) if d not in rc and d != w_group)
    grouped_dot.check_group_sizes(group_sizes, x.shape[x_ragged], t.shape[w_group], t.path)
    out_dtype = eqn.outvars[0].aval.dtype
    cd = cfg.compute_dtype
    if cd is not None and jnp.issubdtype(x.dtype, jnp.floating) and (
            jnp.dtype(cd) != x.dtype or jnp.dtype(cd) != t.dtype):
        cd = jnp.dtype(cd)
        cast = (lax.convert_element_type_p, dict(new_dtype=cd, weak_type=False, sharding=None))
        t = dataclasses.replace(t, ops=t.ops + (cast,), dtype=cd)
        x = x.astype(cd)
    params = tuple(sorted(eqn.params.items(), key=lambda kv: kv[0]))
    if t.lora is None:  # a quantized expert stack without adapter
        note(cfg, t.path, "ragged_dot_general", "dequantize")
        y = grouped_dot.frozen_ragged_dot(x, t.base, group_sizes, t.ops, params)
        return y.astype(out_dtype)
    layout = _lowrank_layout(t, t.lora, tuple(rc), (w_group,), w_free)
    if isinstance(layout, str):
        return fallback(cfg, eqn, invals, layout)
    if t.lora.linear_part() is not t.lora:
        return fallback(cfg, eqn, invals, "the adapter rescales output units (DoRA), which has "
                        "no grouped rule: init the experts' adapters without dora=True (exclude= "
                        "them from the DoRA init) to keep the grouped fast path")
    spec = grouped_dot.RaggedSpec(layout=layout, ops=t.ops, params=params, view_dtype=t.dtype,
                                  x_contract=tuple(lc), x_ragged=x_ragged)
    x_low = x
    if t.lora.dropout > 0.0 and cfg.rng is not None:
        note(cfg, t.path, "ragged_dot_general", "grouped-dropout")
        keep = 1.0 - t.lora.dropout
        mask = jax.random.bernoulli(use_key(cfg, cfg.rng, t.path), keep, x.shape)
        x_low = jnp.where(mask, x / keep, 0).astype(x.dtype)
    else:
        note(cfg, t.path, "ragged_dot_general", "grouped")
    y = grouped_dot.lora_ragged_dot(x, x_low, t.base, t.lora, group_sizes, spec)
    return y.astype(out_dtype)


def use_key(cfg: Config, rng: jax.Array, path: str) -> jax.Array:
    """A fresh key for ``path`` from ``rng`` (``cfg.rng``, checked not None by the caller)."""
    n = cfg.use_count.get(path, 0)
    cfg.use_count[path] = n + 1
    k = P.path_key(rng, path)
    return jax.random.fold_in(k, n)


@rule("gather")
def gather(cfg: Config, eqn, invals):
    if not isinstance(invals[0], Tagged) or isinstance(invals[1], Tagged):
        return fallback(cfg, eqn, invals)
    t: Tagged = invals[0]
    idx = invals[1]
    dn = eqn.params["dimension_numbers"]
    lr = t.lora
    ks = t.kernel_shape
    plain = (
        lr is not None
        and lr.linear_part() is lr  # a lookup cannot rescale output units (DoRA)
        and lr.layout == "io"
        and not t.fixed
        and t.axes == ((0,), (1,))
        and tuple(dn.collapsed_slice_dims) == (0,)
        and tuple(dn.start_index_map) == (0,)
        and not getattr(dn, "operand_batching_dims", ())
        and tuple(eqn.params["slice_sizes"]) == (1, ks[1])
    )
    if lr is not None and Lay.pick_view(eqn, Lay.View(t.axes, t.fixed), ks) is not None:
        return fallback(cfg, eqn, invals, "expert kernels picked per token (w[ids]) before the "
                        "matmul have no fast rule; sort tokens by expert and use "
                        "jax.lax.ragged_dot, or an einsum with the expert axis as a batch "
                        "dimension")
    if lr is None or not plain:  # (plain implies lr is not None)
        return fallback(cfg, eqn, invals, "gather other than a row lookup")
    note(cfg, t.path, "gather", "gather")
    w0 = fast_dot.merged_view(t.base, None, t.ops)
    rows = bind(eqn, [w0, idx])
    a, b = lr.factors()
    params = dict(eqn.params)
    params["slice_sizes"] = (1, a.shape[-1])
    a_rows = eqn.primitive.bind(a, idx, **params)  # (..., r) at the same offset dim
    off = tuple(dn.offset_dims)[0]
    a_rows = jnp.moveaxis(a_rows, off, -1)
    if lr.dropout > 0.0 and cfg.rng is not None:
        keep = 1.0 - lr.dropout
        mask = jax.random.bernoulli(use_key(cfg, cfg.rng, t.path), keep, a_rows.shape)
        a_rows = jnp.where(mask, a_rows / keep, 0)
    delta = lr.scale * (a_rows @ b)
    delta = jnp.moveaxis(delta, -1, off).astype(rows.dtype)
    return rows + delta


