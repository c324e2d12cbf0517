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
from jax import lax

from lora_jax import fast_dot
from lora_jax import layouts as Lay
from lora_jax import lora as L
from lora_jax import nnx as NNX
from lora_jax import protocols
from lora_jax import paths as P
from lora_jax import tracing
from lora_jax.train import trainable_base_paths
from lora_jax import validation as V

PyTree = Any

_CALL_PRIMS = Lay.CALL_PRIMS
_REMAT_PRIMS = Lay.REMAT_PRIMS


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
    fixed: tuple = ()  # (kernel axis, index) of axes indexed away by a constant slice

    def materialize(self) -> jax.Array:
        """This view of the effective kernel ``W0 + s·A·B`` (gradients to the adapter only)."""
        return fast_dot.merged_view(self.base, self.lora, self.ops)


@dataclasses.dataclass
class _Config:
    strict: bool
    rng: jax.Array | None
    report: dict | None
    use_count: dict = dataclasses.field(default_factory=dict)
    compute_dtype: Any = None


def _note(cfg: _Config, path: str, primitive: str, route: str, reason: str | None = None):
    if cfg.report is not None:
        cfg.report.setdefault(path, []).append(Use(primitive, route, reason))


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
            if cfg.strict and x.lora is not None:
                raise LoraFallbackError(
                    f"LoRA weight {x.path!r} is used by primitive {eqn.primitive.name!r}, which "
                    f"has no fast LoRA rule ({why or 'unsupported'}); use strict=False to fall "
                    "back to the merged weight"
                )
            _note(cfg, x.path, eqn.primitive.name, "fallback", why or "no fast rule for it")
    vals = [x.materialize() if _is_tagged(x) else x for x in invals]
    return _bind(eqn, vals)


def _handle(cfg: _Config, eqn, invals):
    name = eqn.primitive.name
    tagged_idx = [i for i, x in enumerate(invals) if _is_tagged(x)]
    if (name in Lay.VIEW_PRIMS or name == "slice") and len(invals) == 1:
        return _view(cfg, eqn, invals[0])
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
# Views of a weight: casts, reshapes, transposes, constant indexing


def _view(cfg: _Config, eqn, t: _Tagged):
    v = Lay.view_after(eqn, Lay.View(t.axes, t.fixed), _kernel_shape(t))
    if v is None:  # e.g. a range of a kernel axis: the merged weight, for this use
        return _fallback(cfg, eqn, [t], "a slice across the kernel's axes")
    out_aval = eqn.outvars[0].aval
    return dataclasses.replace(
        t,
        ops=t.ops + ((eqn.primitive, dict(eqn.params)),),
        axes=v.axes,
        fixed=v.fixed,
        shape=tuple(out_aval.shape),
        dtype=out_aval.dtype,
    )


def _kernel_shape(t: _Tagged) -> tuple:
    return tuple(t.base.shape)


# ----------------------------------------------------------------------------------------
# dot_general


def _lowrank_layout(t: _Tagged, w_contract, w_batch, w_free):
    """How the view's contracted/batch/free dims map onto the adapter, or a reason string."""
    if t.axes is None:
        return "the weight was reshaped across kernel axes"
    ks = _kernel_shape(t)
    roles = t.lora.layout

    def atoms(dims):
        return tuple(k for d in dims for k in t.axes[d] if ks[k] != 1)

    c, b, f = atoms(w_contract), atoms(w_batch), atoms(w_free)
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
    x_contract, x_batch = (rc, rb) if wi == 0 else (lc, lb)
    w_free = tuple(d for d in range(len(t.shape)) if d not in w_contract and d not in w_batch)
    if t.lora is None:  # a quantized base weight without adapter: dequantize at use
        _note(cfg, t.path, "dot_general", "dequantize")
        return fast_dot.base_dot_general(x, t.base, ops=t.ops, w_is_lhs=wi == 0, params=params)
    layout = _lowrank_layout(t, w_contract, w_batch, w_free)
    if isinstance(layout, str):
        return _fallback(cfg, eqn, invals, layout)
    spec = fast_dot.DotSpec(
        layout=layout,
        ops=t.ops,
        w_is_lhs=wi == 0,
        x_contract=tuple(x_contract),
        x_batch=tuple(x_batch),
        params=tuple(sorted(params.items(), key=lambda kv: kv[0])),
        view_dtype=t.dtype,
    )
    if t.lora.dropout > 0.0 and cfg.rng is not None:
        _note(cfg, t.path, "dot_general", "fast-dropout")
        key = _use_key(cfg, t.path)
        keep = 1.0 - t.lora.dropout
        mask = jax.random.bernoulli(key, keep, x.shape)
        xd = jnp.where(mask, x / keep, 0).astype(x.dtype)
        return fast_dot.dropout_dot_general(x, xd, t.base, t.lora, spec)
    _note(cfg, t.path, "dot_general", "fast")
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
        and lr.layout == "io"
        and not t.fixed
        and t.axes == ((0,), (1,))
        and tuple(dn.collapsed_slice_dims) == (0,)
        and tuple(dn.start_index_map) == (0,)
        and not getattr(dn, "operand_batching_dims", ())
        and tuple(eqn.params["slice_sizes"]) == (1, ks[1])
    )
    if not plain:
        return _fallback(cfg, eqn, invals, "gather other than a row lookup")
    _note(cfg, t.path, "gather", "gather")
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
        if _is_tagged(x) and protocols.is_base_leaf(x.base) and not x.ops:
            unstacked = x.base.unstack_leading()  # dequantize one layer at a time
            if isinstance(unstacked, str):
                x = dataclasses.replace(x, ops=((None, unstacked),))
            else:
                x = dataclasses.replace(x, base=unstacked)
        if _is_tagged(x):
            if x.ops or (x.lora is not None and x.lora.layout[0] != Lay.STACK):
                x_m = x.materialize()
                why = next((r for p_, r in x.ops if p_ is None), None) or (
                    "weight cast or reshaped before the scan" if x.ops else
                    f"the scan slices kernel axis 0, which the adapter (roles "
                    f"{x.lora.layout!r}) does not treat as a stack axis")
                _note(cfg, x.path, "scan", "fallback", why)
                if cfg.strict and x.lora is not None:
                    raise LoraFallbackError(
                        f"LoRA weight {x.path!r} enters a scan as a stacked input, but {why}; "
                        "pass layouts=lora_jax.trace(fn, params, *args) (or stack_axes=) to "
                        "lora_jax.init for nn.scan kernels"
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
                    lora_i = lora_i.unstack_leading()
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
      fn: any function whose first argument is the parameter tree: ``model.apply``, an NNX
        model as :func:`lora_jax.nnx.functional(graphdef) <lora_jax.nnx.functional>`
        (``fn(params, rest, x) -> (y, rest)``, returning the updated RNG counts), a plain
        function. A function that reads an NNX RNG count and does not return its update
        (``lambda s, x: nnx.merge(graphdef, s)(x)`` with dropout) gets a ``UserWarning``: it
        would draw the same random numbers on every call.
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
        return _run(fn, base, lora, args, kwargs, rng=lora_rng, strict=strict, mode=mode,
                    modules_to_save=modules_to_save, bias=bias, compute_dtype=compute_dtype)

    return wrapped


@dataclasses.dataclass(frozen=True)
class Use:
    """One use of a weight in the traced function, and how ``apply`` computes it.

    Attributes:
      primitive: the JAX primitive that reads the weight (``"dot_general"``, ``"gather"``,
        ``"scan"``, ...).
      route: ``"fast"`` (the dW-free LoRA matmul), ``"fast-dropout"`` (its unmerged form
        with LoRA dropout), ``"gather"`` (``A[ids]·B`` for an embedding lookup),
        ``"dequantize"`` (a quantized base weight without adapter, dequantized at use) or
        ``"fallback"`` (the merged weight ``W0 + s·A·B`` for this use: correct, slower).
      reason: why a use fell back; ``None`` otherwise.
    """

    primitive: str
    route: str
    reason: str | None = None

    def __str__(self) -> str:
        if self.route == "fallback":
            return f"fallback (merged weight) at {self.primitive}: {self.reason}"
        return f"{self.route}: {self.primitive}"


@dataclasses.dataclass(frozen=True)
class WeightReport:
    """How ``apply`` computes every use of one weight.

    Attributes:
      path: the parameter path.
      roles: the adapter's layout (``None`` for a quantized base weight without adapter).
      uses: every use, in program order; empty if the function never reads the weight.
    """

    path: str
    roles: str | None
    uses: tuple[Use, ...]

    @property
    def routes(self) -> list[str]:
        return [u.route for u in self.uses]

    @property
    def fast(self) -> bool:
        """True if the weight is used and no use falls back to the merged weight."""
        return bool(self.uses) and all(u.route != "fallback" for u in self.uses)

    def __str__(self) -> str:
        uses = "; ".join(str(u) for u in self.uses) or "unused"
        roles = "" if self.roles is None else f" [{self.roles}]"
        return f"{self.path}{roles}: {uses}"


@dataclasses.dataclass(frozen=True)
class Report:
    """What :func:`report` returns: ``weights[path]`` is a :class:`WeightReport` for every
    adapted weight and every quantized base weight the function reads."""

    weights: dict[str, WeightReport]

    def __getitem__(self, path: str) -> WeightReport:
        return self.weights[path]

    def __iter__(self):
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)

    @property
    def fallbacks(self) -> list[tuple[str, Use]]:
        """``(path, use)`` of every use computed with the merged weight."""
        return [(p, u) for p, w in self.weights.items() for u in w.uses if u.route == "fallback"]

    @property
    def unused(self) -> list[str]:
        """Adapted weights the function never reads."""
        return [p for p, w in self.weights.items() if not w.uses]

    def __str__(self) -> str:
        n_fast = sum(w.fast for w in self.weights.values())
        head = (f"{len(self.weights)} weights: {n_fast} on the fast path, "
                f"{len(self.fallbacks)} fallback uses, {len(self.unused)} unused")
        return "\n".join([head] + ["  " + str(w) for w in self.weights.values()])


def report(fn: Callable, base, lora, *args, **kwargs) -> Report:
    """How ``apply(fn)`` computes each use of each adapted (or quantized) weight.

    Traces abstractly (no FLOPs run).

    Returns:
      A :class:`Report`; ``str(report)`` is a readable table, ``report.fallbacks`` lists the
      uses that take the merged weight and why, ``report.unused`` the adapters ``fn`` never
      reads.

    >>> import jax, jax.numpy as jnp, lora_jax
    >>> p = {"w": {"kernel": jnp.ones((4, 3))}}
    >>> lora = lora_jax.init(p, r=2, key=jax.random.key(0))
    >>> rep = lora_jax.report(lambda p, x: x @ p["w"]["kernel"], p, lora, jnp.ones((2, 4)))
    >>> rep["w/kernel"].routes, rep.fallbacks
    (['fast'], [])
    """
    uses: dict = {}
    jax.eval_shape(lambda b, l, a, k: _run(fn, b, l, a, k, report=uses), base, lora, args, kwargs)
    lmap = L.leaves(lora)
    order = list(lmap) + [p for p in uses if p not in lmap]
    return Report({p: WeightReport(p, lmap[p].layout if p in lmap else None,
                                   tuple(uses.get(p, ()))) for p in order})


def _run(fn, base, lora, args, kwargs, *, rng=None, strict=False, mode="fast",
         modules_to_save=None, bias="none", report=None, compute_dtype=None):
    V.base_leaves(base, "apply")
    L.check_fits(base, lora, where="apply")
    lmap = L.leaves(lora)
    keep = trainable_base_paths(base, lora, modules_to_save=modules_to_save, bias=bias)

    def freeze(path, x):
        dtype = getattr(x, "dtype", None)
        if path in keep or protocols.is_base_leaf(x) or dtype is None or not jnp.issubdtype(
                dtype, jnp.floating):
            return x
        return lax.stop_gradient(x)

    base = P.map_with_path(freeze, base)
    if mode == "merged":
        return fn(L.merge(base, lora), *args, **kwargs)

    jx = tracing.trace(fn, base, args, kwargs)
    if report is None:  # an NNX RNG count read but not returned: the same masks every call
        NNX.warn_unreturned_rng(fn, jx.closed.jaxpr, base, args, kwargs, jx.is_dyn)
    invals = []
    for path, x in zip(jx.base_paths, jx.base_leaves):
        if path in lmap or protocols.is_base_leaf(x):
            invals.append(_tag(path, x, lmap.get(path)))
        else:
            invals.append(x)
    cfg = _Config(strict=strict, rng=rng, report=report, compute_dtype=compute_dtype)
    outs = _concrete(_eval_jaxpr(cfg, jx.closed.jaxpr, jx.closed.consts, invals + jx.dyn_vals))
    return jax.tree.unflatten(jx.out_tree, outs)
