"""Rules for calls and control flow: ``jit``/``pjit`` calls, ``custom_jvp``, ``remat``,
``cond``, ``while`` and ``scan`` (stacked layers: the weight and its adapter are sliced
along with the scan, one layer per step).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax import layouts as Lay
from lora_jax import protocols
from lora_jax.anchors import after
from lora_jax.transform.interpreter import (
    LoraFallbackError,
    concrete,
    eval_closed,
    fallback,
    is_tagged,
    note,
    rule,
    tag,
)


@rule(*Lay.CALL_PRIMS)
def _call(cfg, eqn, invals):
    closed = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    return eval_closed(cfg, closed, invals)


@rule("custom_jvp_call")
def _custom_jvp(cfg, eqn, invals):
    # The custom derivative rule is replaced by autodiff of the body here; the body is the
    # primal computation, so values agree and derivatives agree wherever the rule is the
    # derivative of the body (true of JAX's own rules away from kinks).
    return eval_closed(cfg, eqn.params["call_jaxpr"], invals)


def split_tagged(vals):
    """Untagged values to pass as operands, with a function rebuilding the full list."""
    plain = [v for v in vals if not is_tagged(v)]

    def rebuild(new_plain):
        it = iter(new_plain)
        return [v if is_tagged(v) else next(it) for v in vals]

    return plain, rebuild


@rule(*Lay.REMAT_PRIMS)
def _remat(cfg, eqn, invals):
    jaxpr = eqn.params["jaxpr"]
    if eqn.params.get("policy") is not None:  # a saving policy: JAX's own checkpoint
        plain, rebuild = split_tagged(invals)
        fn = jax.checkpoint(lambda *a: concrete(eval_closed(cfg, jaxpr, rebuild(a))),
                            prevent_cse=eqn.params.get("prevent_cse", True),
                            policy=eqn.params.get("policy"))
        return fn(*plain)
    # Weights enter as explicit (base, adapter) arguments so the custom VJP sees them.
    tagged = [v for v in invals if is_tagged(v)]
    plain = [v for v in invals if not is_tagged(v)]
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
            vals = [next(it_t) if is_tagged(v) else next(it_p) for v in invals]
            return concrete(eval_closed(cfg, jaxpr, vals))
        finally:
            cfg.report, cfg.rng = report, outer_rng

    fn = remat_vjp(body, frozen=(False, True, False, True))
    return fn(plain, [t.base for t in tagged], [t.lora for t in tagged], cfg.rng)


@rule("cond")
def _cond(cfg, eqn, invals):
    index, ops = invals[0], invals[1:]
    if is_tagged(index):
        return fallback(cfg, eqn, invals)
    plain, rebuild = split_tagged(ops)
    branches = [
        (lambda br: lambda *a: concrete(eval_closed(cfg, br, rebuild(a))))(br)
        for br in eqn.params["branches"]
    ]
    return lax.switch(index, branches, *plain)


@rule("while")
def _while(cfg, eqn, invals):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, carry = invals[:nc], invals[nc : nc + nb], invals[nc + nb :]
    if any(map(is_tagged, carry)):
        return fallback(cfg, eqn, invals, "weight carried through a while loop")

    def cond_fn(c):
        return eval_closed(cfg, p["cond_jaxpr"], list(cconsts) + list(c))[0]

    def body_fn(c):
        return tuple(concrete(eval_closed(cfg, p["body_jaxpr"], list(bconsts) + list(c))))

    return list(lax.while_loop(cond_fn, body_fn, tuple(carry)))


@rule("scan")
def _scan(cfg, eqn, invals):
    p = eqn.params
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    consts = invals[:n_consts]
    carry = invals[n_consts : n_consts + n_carry]
    xs = invals[n_consts + n_carry :]
    if any(map(is_tagged, carry)):
        return fallback(cfg, eqn, invals, "weight carried through a scan")
    # A stacked weight scanned over: slice its base and adapter along with it.
    sliced, plain_xs = [], []
    for x in xs:
        if is_tagged(x) and protocols.is_base_leaf(x.base) and not x.ops:
            unstacked = x.base.unstack_leading()  # dequantize one layer at a time
            if isinstance(unstacked, str):
                x = dataclasses.replace(x, ops=((None, unstacked),))
            else:
                x = dataclasses.replace(x, base=unstacked)
        if is_tagged(x):
            if x.ops or (x.lora is not None and x.lora.layout[0] != Lay.STACK):
                x_m = x.materialize()
                why = next((r for p_, r in x.ops if p_ is None), None) or (
                    "weight cast or reshaped before the scan" if x.ops else
                    f"the scan slices kernel axis 0, which the adapter (roles "
                    f"{x.lora.layout!r}) does not treat as a stack axis")
                note(cfg, x.path, "scan", "fallback", why)
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
    c_plain, c_rebuild = split_tagged(consts)

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
                full_xs.append(tag(t.path, base_i, lora_i))
        sub = dataclasses.replace(cfg, rng=key, use_count={}) if key is not None else cfg
        outs = concrete(eval_closed(sub, p["jaxpr"], c_rebuild(cst) + list(c) + full_xs))
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




def remat_vjp(fn, *, frozen):
    """``jax.checkpoint(fn)`` whose recomputation cannot be scheduled early.

    XLA:CPU hoists a checkpointed body's recomputation into the forward pass (its inputs
    exist then), so ``jax.checkpoint`` saves no memory there (measured: an 8-layer MLP's
    gradient keeps 180 MiB of temporaries with or without it). Here the backward pass
    recomputes ``fn`` from inputs tied to the incoming cotangent (see ``after``), so only
    the inputs are kept: 72 MiB on the same MLP. ``fn(*args)`` takes pytrees; arguments
    flagged in ``frozen`` (base weights) get no cotangent and no tie: their dequantization
    and merge are already tied to the activation they meet.
    """

    @jax.custom_vjp
    def f(*args):
        return fn(*args)

    def fwd(*args):
        return fn(*args), args

    def bwd(args, ct):
        anchor = next((c for c in jax.tree.leaves(ct)
                       if jnp.issubdtype(c.dtype, jnp.inexact)), None)
        live = [i for i, fz in enumerate(frozen) if not fz]

        def g(*diff):
            full = list(args)
            for i, d in zip(live, diff):
                full[i] = d
            return fn(*full)

        _, vjp = jax.vjp(g, *(after(anchor, args[i]) for i in live))
        grads = iter(vjp(ct))
        return tuple(None if fz else next(grads) for fz in frozen)

    f.defvjp(fwd, bwd)
    return f
