"""``apply``: run unchanged model code with a frozen base plus adapters, the fast way.

``apply(fn)`` traces ``fn`` to a jaxpr (``jax.make_jaxpr``) and evaluates it with an
interpreter that follows every targeted weight through casts, reshapes and transposes. Where a
``dot_general`` consumes one, it emits :func:`lora_jax.fast_dot.lora_dot_general`, a custom-VJP
matmul that never forms the dense weight gradient. Calls, ``remat``, ``custom_jvp``, ``scan``
(stacked layers), ``cond`` and ``while`` are entered recursively; embedding lookups (``gather``)
get ``A[ids] @ B``. Any other use of a targeted weight gets the merged weight ``W0 + s·A·B``
for that use only (correct, slower), or an error with ``strict=True``.

>>> import jax, jax.numpy as jnp, flax.linen as nn, lora_jax
>>> model = nn.Dense(3)
>>> x = jnp.ones((2, 4))
>>> params = model.init(jax.random.key(0), x)
>>> lora = lora_jax.init(params, r=2, key=jax.random.key(1))
>>> f = lora_jax.apply(model.apply)
>>> bool(jnp.allclose(f(params, lora, x), model.apply(lora_jax.merge(params, lora), x)))
True
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax import lax

from lora_jax import fast_dot
from lora_jax import lora as L
from lora_jax import paths as P
from lora_jax import validation as V

PyTree = Any

_CALL_PRIMS = ("pjit", "jit", "closed_call", "core_call")
_REMAT_PRIMS = ("remat2", "checkpoint", "remat")
_VIEW_PRIMS = ("convert_element_type", "reshape", "transpose", "copy", "copy_p")


class LoraFallbackError(ValueError):
    """Raised by ``apply(..., strict=True)`` when a targeted weight cannot take the fast path."""


@dataclasses.dataclass(frozen=True)
class _Tagged:
    """A (view of a) targeted or quantized base weight flowing through the jaxpr."""

    path: str
    base: Any  # dense array or registered base leaf, kernel-shaped (incl. stack axes)
    lora: L.LowRankLeaf | None
    ops: tuple  # ((primitive, params), ...) replayed on the kernel to give this view
    axes: tuple | None  # per view dim: tuple of kernel axes it flattens; None if untracked
    shape: tuple
    dtype: Any

    def materialize(self) -> jax.Array:
        """This view of the effective kernel ``W0 + s·A·B`` (gradients to the adapter only)."""
        return fast_dot.merged_view(self.base, self.lora, self.ops)

    def group(self, k: int) -> str:
        lr = self.lora
        if lr is None:
            return "in"
        if k < lr.stack_axes:
            return "stack"
        return "in" if k < lr.stack_axes + lr.in_axes else "out"


@dataclasses.dataclass
class _Config:
    strict: bool
    rng: jax.Array | None
    report: dict | None
    use_count: dict = dataclasses.field(default_factory=dict)
    compute_dtype: Any = None


def _note(cfg: _Config, path: str, how: str):
    if cfg.report is not None:
        cfg.report.setdefault(path, []).append(how)


# ----------------------------------------------------------------------------------------
# The interpreter


def _is_tagged(x) -> bool:
    return isinstance(x, _Tagged)


def _eval_jaxpr(cfg: _Config, jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list:
    env: dict = {}

    def read(v):
        if isinstance(v, jex.core.Literal):
            return v.val
        return env[v]

    def write(v, val):
        if not isinstance(v, jex.core.DropVar):
            env[v] = val

    for v, val in zip(jaxpr.constvars, consts):
        write(v, val)
    for v, val in zip(jaxpr.invars, args):
        write(v, val)
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if any(map(_is_tagged, invals)):
            outs = _handle(cfg, eqn, invals)
        else:
            outs = _bind(eqn, invals)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for v, val in zip(eqn.outvars, outs):
            write(v, val)
    return [read(v) for v in jaxpr.outvars]


def _bind(eqn, invals):
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # older JAX returned (subfuns, params)
        subfuns, params = params
        invals = [*subfuns, *invals]
    with eqn.ctx.manager:
        return eqn.primitive.bind(*invals, **params)


def _fallback(cfg: _Config, eqn, invals, why: str | None = None):
    for x in invals:
        if _is_tagged(x):
            msg = f"fallback (merged weight) at {eqn.primitive.name}" + (f": {why}" if why else "")
            if cfg.strict and x.lora is not None:
                raise LoraFallbackError(
                    f"LoRA weight {x.path!r} is used by primitive {eqn.primitive.name!r}, which "
                    f"has no fast LoRA rule ({why or 'unsupported'}); use strict=False to fall "
                    "back to the merged weight"
                )
            _note(cfg, x.path, msg)
    vals = [x.materialize() if _is_tagged(x) else x for x in invals]
    return _bind(eqn, vals)


def _handle(cfg: _Config, eqn, invals):
    name = eqn.primitive.name
    tagged_idx = [i for i, x in enumerate(invals) if _is_tagged(x)]
    if name in _VIEW_PRIMS and len(invals) == 1:
        return _view(eqn, invals[0])
    if name == "dot_general" and len(tagged_idx) == 1:
        return _dot(cfg, eqn, invals, tagged_idx[0])
    if name == "gather" and tagged_idx == [0]:
        return _gather(cfg, eqn, invals)
    if name in _CALL_PRIMS:
        closed = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        return _eval_closed(cfg, closed, invals)
    if name == "custom_jvp_call":
        # The custom derivative rule is replaced by autodiff of the body here; the body is
        # the primal computation, so values agree and derivatives agree wherever the rule is
        # the derivative of the body (true of JAX's own rules away from kinks).
        return _eval_closed(cfg, eqn.params["call_jaxpr"], invals)
    if name in _REMAT_PRIMS:
        return _remat(cfg, eqn, invals)
    if name == "scan":
        return _scan(cfg, eqn, invals)
    if name == "cond":
        return _cond(cfg, eqn, invals)
    if name == "while":
        return _while(cfg, eqn, invals)
    return _fallback(cfg, eqn, invals)


def _concrete(outs):
    """Outputs leaving a control-flow body must be plain arrays."""
    return [o.materialize() if _is_tagged(o) else o for o in outs]


def _eval_closed(cfg, closed, invals):
    if isinstance(closed, jex.core.ClosedJaxpr):
        return _eval_jaxpr(cfg, closed.jaxpr, closed.consts, invals)
    return _eval_jaxpr(cfg, closed, (), invals)


# ----------------------------------------------------------------------------------------
# Views of a weight: casts, reshapes, transposes


def _view(eqn, t: _Tagged):
    name = eqn.primitive.name
    out_aval = eqn.outvars[0].aval
    axes = t.axes
    if axes is not None:
        if name == "transpose":
            axes = tuple(axes[p] for p in eqn.params["permutation"])
        elif name == "reshape":
            axes = _reshape_axes(t, tuple(out_aval.shape))
    return dataclasses.replace(
        t,
        ops=t.ops + ((eqn.primitive, dict(eqn.params)),),
        axes=axes,
        shape=tuple(out_aval.shape),
        dtype=out_aval.dtype,
    )


def _kernel_shape(t: _Tagged) -> tuple:
    return tuple(t.base.shape)


def _reshape_axes(t: _Tagged, new_shape: tuple):
    """Kernel axes of each dim after a reshape, or None if it splits a kernel axis."""
    ks = _kernel_shape(t)
    atoms = [k for dim in t.axes for k in dim if ks[k] != 1]
    out, i = [], 0
    for n in new_shape:
        group, size = [], 1
        while size < n and i < len(atoms):
            group.append(atoms[i])
            size *= ks[atoms[i]]
            i += 1
        if size != n:
            return None
        out.append(tuple(group))
    return tuple(out) if i == len(atoms) else None


# ----------------------------------------------------------------------------------------
# dot_general


def _lowrank_layout(t: _Tagged, w_contract: Sequence[int], w_free: Sequence[int]):
    """How the view's contracted/free dims map onto the LoRA factors, or a reason string."""
    lr = t.lora
    if t.axes is None:
        return "the weight was reshaped across kernel axes"
    if lr.stack_axes:
        return "a stacked (scanned) kernel used outside its scan"
    ks = _kernel_shape(t)

    def atoms(dims):
        return [k for d in dims for k in t.axes[d] if ks[k] != 1]

    c_atoms, f_atoms = atoms(w_contract), atoms(w_free)
    groups_c = {t.group(k) for k in c_atoms}
    groups_f = {t.group(k) for k in f_atoms}
    if len(groups_c) != 1 or len(groups_f) != 1 or groups_c == groups_f:
        return "the contraction does not separate the kernel's input and output axes"
    n_in, n_out = lr.in_axes, len(ks) - lr.in_axes
    in_all = [k for k in range(n_in) if ks[k] != 1]
    out_all = [k for k in range(n_in, n_in + n_out) if ks[k] != 1]
    contract_in = groups_c == {"in"}
    if sorted(c_atoms) != (in_all if contract_in else out_all) or sorted(f_atoms) != (
        out_all if contract_in else in_all
    ):
        return "the contraction covers only part of the kernel's input or output axes"
    return fast_dot.Layout(
        contract_in=contract_in,
        c_atoms=tuple(c_atoms),
        f_atoms=tuple(f_atoms),
        c_shape=tuple(t.shape[d] for d in w_contract),
        f_shape=tuple(t.shape[d] for d in w_free),
        in_axes=n_in,
        kernel_shape=ks,
    )


def _dot(cfg: _Config, eqn, invals, wi: int):
    t: _Tagged = invals[wi]
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


def _dot_inner(cfg: _Config, eqn, invals, wi, t: _Tagged, x, params):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    w_contract, w_batch = (lc, lb) if wi == 0 else (rc, rb)
    x_contract = rc if wi == 0 else lc
    if w_batch:
        return _fallback(cfg, eqn, invals, "batched dot_general over the weight")
    w_free = tuple(d for d in range(len(t.shape)) if d not in w_contract)
    if t.lora is None:  # a quantized base weight without adapter: dequantize at use
        _note(cfg, t.path, "base: dequantized at dot_general")
        return fast_dot.base_dot_general(x, t.base, ops=t.ops, w_is_lhs=wi == 0, params=params)
    layout = _lowrank_layout(t, w_contract, w_free)
    if isinstance(layout, str):
        return _fallback(cfg, eqn, invals, layout)
    spec = fast_dot.DotSpec(
        layout=layout,
        ops=t.ops,
        w_is_lhs=wi == 0,
        x_contract=tuple(x_contract),
        params=tuple(sorted(params.items(), key=lambda kv: kv[0])),
        view_dtype=t.dtype,
    )
    if t.lora.dropout > 0.0 and cfg.rng is not None:
        _note(cfg, t.path, "fast: dot_general (dropout: unmerged x@W0 + s·drop(x)@A@B)")
        key = _use_key(cfg, t.path)
        keep = 1.0 - t.lora.dropout
        mask = jax.random.bernoulli(key, keep, x.shape)
        xd = jnp.where(mask, x / keep, 0).astype(x.dtype)
        return fast_dot.dropout_dot_general(x, xd, t.base, t.lora, spec)
    _note(cfg, t.path, "fast: dot_general")
    return fast_dot.lora_dot_general(x, t.base, t.lora, spec)


def _use_key(cfg: _Config, path: str) -> jax.Array:
    n = cfg.use_count.get(path, 0)
    cfg.use_count[path] = n + 1
    k = jax.random.fold_in(cfg.rng, zlib.crc32(path.encode()) & 0x7FFFFFFF)
    return jax.random.fold_in(k, n)


# ----------------------------------------------------------------------------------------
# Embedding lookups


def _gather(cfg: _Config, eqn, invals):
    t: _Tagged = invals[0]
    idx = invals[1]
    dn = eqn.params["dimension_numbers"]
    lr = t.lora
    ks = _kernel_shape(t)
    plain = (
        lr is not None
        and not lr.stack_axes
        and len(ks) == 2
        and lr.in_axes == 1
        and t.axes == ((0,), (1,))
        and tuple(dn.collapsed_slice_dims) == (0,)
        and tuple(dn.start_index_map) == (0,)
        and not getattr(dn, "operand_batching_dims", ())
        and tuple(eqn.params["slice_sizes"]) == (1, ks[1])
    )
    if not plain:
        return _fallback(cfg, eqn, invals, "gather other than a row lookup")
    _note(cfg, t.path, "fast: gather (A[ids] @ B)")
    w0 = fast_dot.merged_view(t.base, None, t.ops)
    rows = _bind(eqn, [w0, idx])
    a, b = lr.factors()
    params = dict(eqn.params)
    params["slice_sizes"] = (1, a.shape[-1])
    a_rows = eqn.primitive.bind(a, idx, **params)  # (..., r) at the same offset dim
    off = tuple(dn.offset_dims)[0]
    a_rows = jnp.moveaxis(a_rows, off, -1)
    if lr.dropout > 0.0 and cfg.rng is not None:
        keep = 1.0 - lr.dropout
        mask = jax.random.bernoulli(_use_key(cfg, t.path), keep, a_rows.shape)
        a_rows = jnp.where(mask, a_rows / keep, 0)
    delta = lr.scale * (a_rows @ b)
    delta = jnp.moveaxis(delta, -1, off).astype(rows.dtype)
    return rows + delta


# ----------------------------------------------------------------------------------------
# Control flow and calls


def _split_tagged(vals):
    """Untagged values to pass as operands, with a function rebuilding the full list."""
    plain = [v for v in vals if not _is_tagged(v)]

    def rebuild(new_plain):
        it = iter(new_plain)
        return [v if _is_tagged(v) else next(it) for v in vals]

    return plain, rebuild


def _remat(cfg, eqn, invals):
    jaxpr = eqn.params["jaxpr"]
    if eqn.params.get("policy") is not None:  # a saving policy: JAX's own checkpoint
        plain, rebuild = _split_tagged(invals)
        fn = jax.checkpoint(lambda *a: _concrete(_eval_closed(cfg, jaxpr, rebuild(a))),
                            prevent_cse=eqn.params.get("prevent_cse", True),
                            policy=eqn.params.get("policy"))
        return fn(*plain)
    # Weights enter as explicit (base, adapter) arguments so the custom VJP sees them.
    tagged = [v for v in invals if _is_tagged(v)]
    plain = [v for v in invals if not _is_tagged(v)]
    start = dict(cfg.use_count)
    traced = []

    def body(plain_, bases, loras, rng):
        # Traced for the forward pass and again for the recomputation: both must draw the
        # same dropout keys, and the report records the first trace only. The dropout key
        # is an argument, not a closure: inside a scan it is the step's key, a tracer that
        # the backward pass's trace must not capture.
        report, outer_rng = cfg.report, cfg.rng
        cfg.rng = rng
        cfg.use_count.clear()
        cfg.use_count.update(start)
        if traced:
            cfg.report = None
        traced.append(True)
        try:
            it_p = iter(plain_)
            it_t = iter(dataclasses.replace(t, base=b, lora=lr)
                        for t, b, lr in zip(tagged, bases, loras))
            vals = [next(it_t) if _is_tagged(v) else next(it_p) for v in invals]
            return _concrete(_eval_closed(cfg, jaxpr, vals))
        finally:
            cfg.report, cfg.rng = report, outer_rng

    fn = fast_dot.remat(body, frozen=(False, True, False, True))
    return fn(plain, [t.base for t in tagged], [t.lora for t in tagged], cfg.rng)


def _cond(cfg, eqn, invals):
    index, ops = invals[0], invals[1:]
    if _is_tagged(index):
        return _fallback(cfg, eqn, invals)
    plain, rebuild = _split_tagged(ops)
    branches = [
        (lambda br: lambda *a: _concrete(_eval_closed(cfg, br, rebuild(a))))(br)
        for br in eqn.params["branches"]
    ]
    return lax.switch(index, branches, *plain)


def _while(cfg, eqn, invals):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, carry = invals[:nc], invals[nc : nc + nb], invals[nc + nb :]
    if any(map(_is_tagged, carry)):
        return _fallback(cfg, eqn, invals, "weight carried through a while loop")

    def cond_fn(c):
        return _eval_closed(cfg, p["cond_jaxpr"], list(cconsts) + list(c))[0]

    def body_fn(c):
        return tuple(_concrete(_eval_closed(cfg, p["body_jaxpr"], list(bconsts) + list(c))))

    return list(lax.while_loop(cond_fn, body_fn, tuple(carry)))


def _scan(cfg, eqn, invals):
    p = eqn.params
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    consts = invals[:n_consts]
    carry = invals[n_consts : n_consts + n_carry]
    xs = invals[n_consts + n_carry :]
    if any(map(_is_tagged, carry)):
        return _fallback(cfg, eqn, invals, "weight carried through a scan")
    # A stacked weight scanned over: slice its base and adapter along with it.
    sliced, plain_xs = [], []
    for x in xs:
        if _is_tagged(x) and P.is_base_leaf(x.base) and not x.ops:
            unstacked = x.base.unstack_leading()  # dequantize one layer at a time
            if unstacked is None:
                x = dataclasses.replace(x, ops=((None, "blocks straddle layers"),))
            else:
                x = dataclasses.replace(x, base=unstacked)
        if _is_tagged(x):
            if x.ops or (x.lora is not None and x.lora.stack_axes < 1):
                x_m = x.materialize()
                why = next((r for p_, r in x.ops if p_ is None), None) or (
                    "weight cast or reshaped before the scan" if x.ops else "no stack_axes")
                _note(cfg, x.path, f"fallback (merged weight) at scan: {why}")
                if cfg.strict and x.lora is not None:
                    raise LoraFallbackError(
                        f"LoRA weight {x.path!r} enters a scan after a cast/reshape or without "
                        "stack_axes; pass stack_axes= to lora_jax.init for nn.scan kernels"
                    )
                plain_xs.append(x_m)
                sliced.append(None)
            else:
                plain_xs.append(None)
                sliced.append(x)
        else:
            plain_xs.append(x)
            sliced.append(None)
    stacked = [(i, t) for i, t in enumerate(sliced) if t is not None]
    extras = [(t.base, t.lora) for _, t in stacked]
    keys = None
    if cfg.rng is not None:
        keys = jax.random.split(jax.random.fold_in(cfg.rng, len(cfg.use_count) + 7), p["length"])
    plain_xs_vals = [x for x in plain_xs if x is not None]
    c_plain, c_rebuild = _split_tagged(consts)

    def body(c_and_consts, step_in):
        cst, c = c_and_consts
        xs_vals, extra_vals, key = step_in
        it = iter(xs_vals)
        full_xs = []
        ex = dict(zip((i for i, _ in stacked), extra_vals))
        for i, t in enumerate(sliced):
            if t is None:
                full_xs.append(next(it))
            else:
                base_i, lora_i = ex[i]
                if lora_i is not None:
                    lora_i = lora_i.replace(stack_axes=lora_i.stack_axes - 1)
                full_xs.append(_tag(t.path, base_i, lora_i))
        sub = dataclasses.replace(cfg, rng=key, use_count={}) if key is not None else cfg
        outs = _concrete(_eval_closed(sub, p["jaxpr"], c_rebuild(cst) + list(c) + full_xs))
        return (cst, tuple(outs[:n_carry])), tuple(outs[n_carry:])

    (_, carry_out), ys = lax.scan(
        body,
        (tuple(c_plain), tuple(carry)),
        (tuple(plain_xs_vals), tuple(extras), keys),
        length=p["length"],
        reverse=p["reverse"],
        unroll=p["unroll"],
    )
    return list(carry_out) + list(ys)


# ----------------------------------------------------------------------------------------
# Public API


def _tag(path: str, base: Any, lora_leaf) -> _Tagged:
    shape = tuple(base.shape)
    return _Tagged(
        path=path,
        base=base,
        lora=lora_leaf,
        ops=(),
        axes=tuple((k,) for k in range(len(shape))),
        shape=shape,
        dtype=base.dtype,
    )


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def trainable_base_paths(
    base: PyTree, lora: PyTree, *, modules_to_save: P.Pattern | None = None, bias: str = "none"
) -> set[str]:
    """Base paths that train besides the adapters (PEFT ``modules_to_save`` and ``bias``).

    Args:
      base: the base parameter tree.
      lora: the LoRA tree.
      modules_to_save: regexes; every base leaf whose path matches (or lies below a matching
        module path) trains in full.
      bias: ``"none"``, ``"lora_only"`` (biases of adapted modules) or ``"all"``.
    """
    if bias not in ("none", "lora_only", "all"):
        raise ValueError(f"bias must be 'none', 'lora_only' or 'all', got {bias!r}")
    pats = P.as_patterns(modules_to_save)
    lora_paths = set(L.leaves(lora))
    mods = {p.rsplit("/", 1)[0] for p in lora_paths}
    out = set()
    for path, _ in P.flatten(base):
        parent, _, name = path.rpartition("/")
        if pats and (P.matches(path, pats) or any(P.matches(path[:i], pats)
                                                  for i in _prefix_cuts(path))):
            if path in lora_paths:
                raise ValueError(
                    f"{path!r} is both a LoRA target and in modules_to_save; exclude it from "
                    "the LoRA targets to train it in full"
                )
            out.add(path)
        elif name == "bias" and (bias == "all" or (bias == "lora_only" and parent in mods)):
            out.add(path)
    return out


def _prefix_cuts(path: str):
    return [i for i, ch in enumerate(path) if ch == "/"]


def apply(
    fn: Callable,
    *,
    strict: bool = False,
    mode: str = "fast",
    modules_to_save: P.Pattern | None = None,
    bias: str = "none",
    compute_dtype: Any = None,
) -> Callable:
    """Wraps ``fn(params, *args, **kwargs)`` as ``f(base, lora, *args, **kwargs)``.

    ``f(base, lora, ...)`` equals ``fn(merge(base, lora), ...)`` up to float rounding, and
    gradients flow to the adapters only: frozen base weights never get a gradient computed.

    Args:
      fn: any function whose first argument is the parameter tree (``model.apply``, an NNX
        ``lambda state, x: nnx.merge(graphdef, state)(x)``, a plain function).
      strict: raise :class:`LoraFallbackError` instead of falling back to the merged weight.
      mode: ``"fast"`` (trace and rewrite) or ``"merged"`` (merge the weights, then run
        ``fn``; the simple reference path).
      modules_to_save: base paths (regexes) that keep their gradients, for full training.
      bias: ``"none"``, ``"lora_only"`` or ``"all"``: which biases keep their gradients.
      compute_dtype: if set (e.g. ``jnp.bfloat16``), every matmul with a targeted or
        quantized weight runs in this dtype: the weight is dequantized/merged and cast at its
        use, the input cast, the result cast back to the model's dtype.

    Returns:
      ``f(base, lora, *args, lora_rng=None, **kwargs)``; ``lora_rng`` drives LoRA dropout.
      Python scalars and other non-array arguments are static (closed over when tracing).
    """
    if mode not in ("fast", "merged"):
        raise ValueError(f"mode must be 'fast' or 'merged', got {mode!r}")
    if not callable(fn):
        raise TypeError(f"apply: fn must be a function of the parameter tree (e.g. model.apply),"
                        f" got a {type(fn).__name__}; call apply(fn)(base, lora, *args)")

    @functools.wraps(fn)
    def wrapped(base, lora, *args, lora_rng=None, **kwargs):
        return _run(fn, base, lora, args, kwargs, lora_rng, strict, mode, modules_to_save, bias,
                    None, compute_dtype)

    return wrapped


def report(fn: Callable, base, lora, *args, **kwargs) -> dict[str, list[str]]:
    """For each targeted weight, how ``apply(fn)`` computes each of its uses.

    Traces abstractly (no FLOPs run). Entries read ``"fast: dot_general"``, ``"fast: gather
    (A[ids] @ B)"`` or ``"fallback (merged weight) at <primitive>: <why>"``; a targeted weight
    that ``fn`` never reads is reported as ``["unused"]``.
    """
    rep: dict = {}
    jax.eval_shape(
        lambda b, l, a, k: _run(fn, b, l, a, k, None, False, "fast", None, "none", rep),
        base, lora, args, kwargs,
    )
    for path in L.leaves(lora):
        rep.setdefault(path, ["unused"])
    return rep


def _run(fn, base, lora, args, kwargs, rng, strict, mode, modules_to_save, bias, rep,
         compute_dtype=None):
    V.base_leaves(base, "apply")
    L.check_fits(base, lora, where="apply")
    lmap = L.leaves(lora)
    keep = trainable_base_paths(base, lora, modules_to_save=modules_to_save, bias=bias)

    def freeze(path, x):
        if path in keep or P.is_base_leaf(x) or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return lax.stop_gradient(x)

    base = P.map_with_path(freeze, base)
    if mode == "merged":
        return fn(L.merge(base, lora), *args, **kwargs)

    pairs, base_def = jax.tree_util.tree_flatten_with_path(base, is_leaf=P.is_base_leaf)
    base_paths = [P.path_str(p) for p, _ in pairs]
    base_vals = [x for _, x in pairs]
    abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in base_vals]

    dyn_leaves, dyn_def = jax.tree.flatten((args, kwargs))
    is_dyn = [_is_array(x) or isinstance(x, jax.core.Tracer) for x in dyn_leaves]
    dyn_vals = [x for x, d in zip(dyn_leaves, is_dyn) if d]
    out_tree = []

    def traced(base_leaves, dyn):
        it = iter(dyn)
        leaves_ = [next(it) if d else x for x, d in zip(dyn_leaves, is_dyn)]
        a, k = jax.tree.unflatten(dyn_def, leaves_)
        out = fn(jax.tree.unflatten(base_def, base_leaves), *a, **k)
        flat, tree = jax.tree.flatten(out)
        out_tree.append(tree)
        return flat

    closed = jax.make_jaxpr(traced)(abstract, dyn_vals)
    invals = []
    for path, x in zip(base_paths, base_vals):
        if path in lmap or P.is_base_leaf(x):
            invals.append(_tag(path, x, lmap.get(path)))
        else:
            invals.append(x)
    cfg = _Config(strict=strict, rng=rng, report=rep, compute_dtype=compute_dtype)
    outs = _concrete(_eval_jaxpr(cfg, closed.jaxpr, closed.consts, invals + list(dyn_vals)))
    return jax.tree.unflatten(out_tree[0], outs)
