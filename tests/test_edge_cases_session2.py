"""Edge cases of the thin LoRA matmul (fast_dot._thin / lowrank) and the remat rewrite.

References are independent of the code under test: the merged-weight computation
``fn(merge(params, lora), ...)`` for values, float64 autodiff of it for gradients, and, for
LoRA dropout, float64 autodiff of PEFT's unmerged formula ``x·W0 + s·drop(x)·A·B`` with the
same mask. Inputs and factors are fresh random values, never zeros.
"""

import zlib

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax import lax

import lora_jax

BF16 = jnp.bfloat16

# Data, factors and error measures use NumPy, and setup runs under jit: on a 2-core CPU every
# eager jnp op of a new shape costs a compile, which would dominate this file's runtime.


def rnd(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def randomize(lora, seed, scale=0.3):
    """conftest.randomize with NumPy draws: every factor (B included) non-zero."""
    leaves, tree = jax.tree.flatten(lora)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [jnp.asarray(np.asarray(x) + scale * rng.standard_normal(
        x.shape), x.dtype) for x in leaves])


def key(seed):
    """A cheap PRNG key for dropout: threefry's compile dominates these small graphs on a
    CPU. (RBG bits are not vmap-invariant: under vmap, references are vmapped too.)"""
    return jax.random.key(seed, impl="unsafe_rbg")


def init_lora(params, seed=1, **kw):
    lora = jax.jit(lambda p: lora_jax.init(p, key=jax.random.key(seed), **kw))(params)
    return randomize(lora, seed + 1)


def f64(tree):
    """A float64 copy of a concrete tree (call under jax.enable_x64)."""
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64)) if jnp.issubdtype(
        x.dtype, jnp.floating) else x, tree)


def max_rel_err(a_tree, b_tree):
    """conftest.max_rel_err in NumPy (float64): max |a-b| / max |b| over matching leaves."""
    la, lb = jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)
    assert len(la) == len(lb)
    errs = [0.0]
    for a, b in zip(la, lb):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape
        errs.append(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30)))
    return max(errs)


def norm_err(a_tree, b_tree):
    """Max over leaves of ||a - b|| / ||b||."""
    return max(float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                     / np.linalg.norm(np.asarray(b, np.float64)))
               for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)))


def make(shape, in_axes=None, dropout=0.0, seed=0, r=3):
    """A plain param dict with one adapted kernel "w" (and random, non-zero A and B)."""
    params = {"w": rnd(100 + seed, shape, 1 / np.sqrt(shape[0]))}
    lora = init_lora(params, seed=1 + seed, r=r, alpha=2.0 * r, targets="w", in_axes=in_axes,
                     dropout=dropout)
    return params, lora


def prim_names(jaxpr, out=None):
    """Every primitive name in a (closed) jaxpr, sub-jaxprs included."""
    out = set() if out is None else out
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        out.add(eqn.primitive.name)
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                if isinstance(sub, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
                    prim_names(sub, out)
    return out


def _proj(out):
    leaves, tree = jax.tree.flatten(out)
    return jax.tree.unflatten(tree, [rnd(42 + i, a.shape) for i, a in enumerate(leaves)])


def _dot_proj(out, proj, dtype=jnp.float32):
    return sum(jnp.sum(a.astype(dtype) * b.astype(dtype))
               for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(proj)))


def check_merged(fn, params, lora, x, *rest, tol=1e-5, gtol=1e-4, x_grad=True, ref64=True,
                 ref_params=None, value_ref32=False, **apply_kw):
    """fast apply == merged (values); grads wrt (lora, x) == float64 autodiff of merged.

    The reference values come with the float64 gradients (one compile), or from a float32
    run of the merged computation with ``value_ref32`` (for functions that round to bf16,
    where float64 merging may round a weight differently). ``ref64=False``: float32
    reference throughout (for functions that draw random numbers, whose default dtype
    changes under x64). ``ref_params``: the dense base for the reference (the dequantized
    weights of a QLoRA base)."""
    f = lora_jax.apply(fn, strict=True, **apply_kw)
    ref_params = params if ref_params is None else ref_params
    merged_fn = lambda l, x, *r: fn(lora_jax.merge(ref_params, l), x, *r)
    out = jax.jit(f)(params, lora, x, *rest)
    ref_shapes = jax.eval_shape(merged_fn, lora, x, *rest)
    assert [a.dtype for a in jax.tree.leaves(out)] == [
        a.dtype for a in jax.tree.leaves(ref_shapes)]
    proj = _proj(out)
    argnums = (0, 1) if x_grad else (0,)

    def loss_fast(l, x):
        return _dot_proj(f(params, l, x, *rest), proj)

    g = jax.jit(jax.grad(loss_fast, argnums=argnums))(lora, x)
    with jax.enable_x64(ref64):
        cast = f64 if ref64 else (lambda t: t)
        p_r, rest_r = cast(ref_params), cast(rest)

        def loss_ref(l, x):
            y = fn(lora_jax.merge(p_r, l), x, *rest_r)
            return _dot_proj(y, proj, jnp.float64 if ref64 else jnp.float32), y

        g_ref, ref = jax.jit(jax.grad(loss_ref, argnums=argnums, has_aux=True))(
            cast(lora), cast(x))
    if value_ref32:
        ref = jax.jit(merged_fn)(lora, x, *rest)
    assert max_rel_err(out, ref) < tol, "value"
    assert max_rel_err(g[0], g_ref[0]) < gtol, "grad wrt LoRA factors"
    if x_grad:
        assert max_rel_err(g[1], g_ref[1]) < gtol, "grad wrt input"
    return f


def assert_all_fast(fn, params, lora, *args, want="fast"):
    rep = lora_jax.report(fn, params, lora, *args)
    used = {k: w.routes for k, w in rep.weights.items() if w.uses}
    assert used and all(all(u == want for u in v) for v in used.values()), rep
    assert set(used) == set(lora_jax.lora.leaves(lora)), rep  # every adapter is exercised
    return rep


# ----------------------------------------------------------------------------------------
# 1. _thin / lowrank over every dot_general layout the rewrite sends to it

def _dg_wlhs(dims):
    return lambda p, x: lax.dot_general(p["w"], x, (dims, ((), ())))


# name: (fn(p, x) using p["w"], kernel shape, in_axes, x shape)
LAYOUTS = {
    # DenseGeneral(axis=(-2, -1)): two contracted (input) axes, in_axes=2 kernel.
    "two_in_axes": (lambda p, x: jnp.einsum("bsij,ijk->bsk", x, p["w"]), (3, 4, 5), 2,
                    (2, 6, 3, 4)),
    # x's contracted dims not in sorted order (einsum emits x contract dims (2, 0)) and
    # interleaved with its free dims.
    "x_contract_unsorted": (lambda p, x: jnp.einsum("jbis,ijk->bsk", x, p["w"]), (3, 4, 5), 2,
                            (4, 2, 3, 6)),
    # The weight as the lhs of the dot_general (einsum puts it first).
    "weight_lhs": (lambda p, x: jnp.einsum("ijk,jbis->kbs", p["w"], x), (3, 4, 5), 2,
                   (4, 2, 3, 6)),
    "weight_lhs_swapped_contract": (_dg_wlhs(((1, 0), (3, 2))), (3, 4, 5), 2, (2, 6, 3, 4)),
    # DenseGeneral(features=(h, d)): two free weight axes.
    "two_out_axes": (lambda p, x: jnp.einsum("bsi,ihd->bshd", x, p["w"]), (6, 3, 4), 1,
                     (2, 5, 6)),
    "two_out_axes_weight_lhs": (_dg_wlhs(((0,), (2,))), (6, 3, 4), 1, (2, 5, 6)),
    # Transposed use: x @ W.T (a tied embedding head), contracting the output axes.
    "transposed": (lambda p, x: x @ p["w"].T, (6, 7), 1, (2, 5, 7)),
    "transposed_weight_lhs": (lambda p, x: p["w"] @ jnp.swapaxes(x, -1, -2), (6, 7), 1,
                              (2, 5, 7)),
    # Output axes contracted in reverse order; input axes contracted in reverse order and
    # the result transposed.
    "out_axes_reversed": (lambda p, x: jnp.einsum("bmn,ijnm->bij", x, p["w"]), (3, 4, 5, 2),
                          2, (2, 2, 5)),
    "in_axes_reversed_out_permuted": (lambda p, x: jnp.einsum("bji,ijnm->mbn", x, p["w"]),
                                      (3, 4, 5, 2), 2, (2, 4, 3)),
    # Reshaped views of a 3-axis kernel (in_axes=2 merged into one dim).
    "reshaped": (lambda p, x: x @ p["w"].reshape(12, 5), (3, 4, 5), 2, (7, 12)),
    "reshaped_transposed": (lambda p, x: x @ p["w"].reshape(12, 5).T, (3, 4, 5), 2, (7, 5)),
    # Size-1 kernel axes.
    "size_one_axes": (lambda p, x: jnp.einsum("bai,aicd->bcd", x, p["w"]), (1, 6, 1, 4), 2,
                      (3, 1, 6)),
    # x without free dims.
    "vector_x": (lambda p, x: x @ p["w"], (6, 4), 1, (6,)),
    "vector_x_transposed": (lambda p, x: p["w"] @ x, (6, 4), 1, (4,)),
    # Precision passed through.
    "precision_highest": (lambda p, x: jnp.dot(x, p["w"], precision=lax.Precision.HIGHEST),
                          (6, 4), 1, (3, 5, 6)),
}


def make_multi(names, dropout=0.0, r=3):
    """One param dict {name: {"w": kernel}} holding a kernel per layout, adapted, and a
    function applying every layout to its own input: one compile covers them all."""
    params = {n: {"w": rnd(100 + i, LAYOUTS[n][1], 1 / np.sqrt(LAYOUTS[n][1][0]))}
              for i, n in enumerate(names)}
    lora = init_lora(params, r=r, alpha=2.0 * r, targets=[f"{n}/w" for n in names],
                     in_axes={f"{n}/w": LAYOUTS[n][2] for n in names}, dropout=dropout)
    xs = {n: rnd(200 + i, LAYOUTS[n][3]) for i, n in enumerate(names)}

    def fn(p, xs):
        return {n: LAYOUTS[n][0](p[n], xs[n]) for n in names}

    return fn, params, lora, xs


def test_thin_layouts_against_merged():
    fn, params, lora, xs = make_multi(list(LAYOUTS))
    assert lora["two_in_axes"]["w"].a.shape == (3, 4, 3)
    assert lora["two_out_axes"]["w"].b.shape == (3, 3, 4)
    check_merged(fn, params, lora, xs)
    assert_all_fast(fn, params, lora, xs)


BF16_NAMES = ["x_contract_unsorted", "weight_lhs", "two_out_axes", "transposed",
              "out_axes_reversed"]


def test_thin_layouts_bf16_compute_dtype():
    """compute_dtype=bf16: errors vs the float64 reference no worse than the bf16 merged model."""
    fn, params, lora, xs = make_multi(BF16_NAMES)

    def fn_bf16(p, xs):  # what compute_dtype means, written out on the merged weights
        out = fn(jax.tree.map(lambda w: w.astype(BF16), p), jax.tree.map(
            lambda x: x.astype(BF16), xs))
        return jax.tree.map(lambda y: y.astype(jnp.float32), out)

    f = lora_jax.apply(fn, compute_dtype=BF16)
    out = jax.jit(f)(params, lora, xs)
    assert all(y.dtype == jnp.float32 for y in jax.tree.leaves(out))
    ref = jax.jit(lambda l: fn(lora_jax.merge(params, l), xs))(lora)
    assert max_rel_err(out, ref) < 2e-2
    proj = _proj(out)
    grad = lambda fwd: jax.jit(jax.grad(
        lambda l, x: _dot_proj(fwd(l, x), proj), argnums=(0, 1)))
    g = grad(lambda l, x: f(params, l, x))(lora, xs)
    g16 = grad(lambda l, x: fn_bf16(lora_jax.merge(params, l), x))(lora, xs)
    with jax.enable_x64(True):
        p64 = f64(params)
        g64 = jax.jit(jax.grad(lambda l, x: _dot_proj(fn(lora_jax.merge(p64, l), x), proj,
                                                      jnp.float64), argnums=(0, 1)))(
            f64(lora), f64(xs))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(g))
    for n in BF16_NAMES:
        for i in range(2):
            err_fast, err_bf16 = norm_err(g[i][n], g64[i][n]), norm_err(g16[i][n], g64[i][n])
            assert err_fast < 2.0 * err_bf16 + 1e-3, (n, i, err_fast, err_bf16)
    assert_all_fast(fn, params, lora, xs)


def test_thin_bf16_operands_with_preferred_element_type():
    params, lora = make((3, 4, 5), 2)
    x = rnd(7, (4, 2, 3, 6))

    def fn(p, x):
        w, x = p["w"].astype(BF16), x.astype(BF16)
        return (lax.dot_general(x, w, (((2, 0), (0, 1)), ((), ())),
                                preferred_element_type=jnp.float32),
                lax.dot_general(w, x, (((0, 1), (2, 0)), ((), ())),
                                preferred_element_type=jnp.float32))

    # The bf16 roundings of w and x are part of fn, so only the LoRA path's own bf16
    # intermediates (x·U, dy·V) differ from float64 autodiff of the merged function.
    check_merged(fn, params, lora, x, tol=1e-5, gtol=1e-2, value_ref32=True)
    assert_all_fast(fn, params, lora, x)


def test_mixed_dtype_dot_general_gradient():
    # Fails at 157c366: lora_dot_general's backward cast dy to result_type(x, w) (float32)
    # while lowrank's output has the weight view's dtype (bf16): a VJP dtype error.
    params, lora = make((6, 4))
    x = rnd(7, (3, 6))

    def fn(p, x):  # lax.dot_general accepts operands of different dtypes; result float32
        return lax.dot_general(x, p["w"].astype(BF16), (((1,), (0,)), ((), ())))

    assert fn(params, x).dtype == jnp.float32
    check_merged(fn, params, lora, x, tol=1e-5, gtol=1e-2, value_ref32=True)


def test_thin_under_vmap_of_grad():
    fn = LAYOUTS["x_contract_unsorted"][0]
    params, lora = make((3, 4, 5), 2)
    xs = rnd(8, (3, 4, 2, 3, 6))
    f = lora_jax.apply(fn)

    def grads(fwd, l, x):
        return jax.grad(lambda l, x: jnp.sum(jnp.sin(fwd(l, x))), argnums=(0, 1))(l, x)

    fast = lambda l, x: f(params, l, x)
    ref = lambda l, x: fn(lora_jax.merge(params, l), x)
    lora_b = jax.tree.map(lambda a: jnp.asarray(np.stack([np.asarray(a) * (1 + 0.2 * i)
                                                         for i in range(3)])), lora)

    def both(fwd):
        return (jax.vmap(lambda x: grads(fwd, lora, x))(xs),  # one shared adapter
                jax.vmap(lambda l, x: grads(fwd, l, x))(lora_b, xs))  # per-example adapters

    g = jax.jit(lambda: both(fast))()
    g_ref = jax.jit(lambda: both(ref))()
    assert max_rel_err(g, g_ref) < 1e-5


# --- LoRA dropout (dropout_dot_general) ---------------------------------------------------

def _mask(rng, path, use, shape, keep):
    """The mask apply() draws for the `use`-th use of `path` outside any scan (see
    transform.rules.use_key); the value checks fail loudly if that derivation changes."""
    k = jax.random.fold_in(jax.random.fold_in(rng, zlib.crc32(path.encode()) & 0x7FFFFFFF), use)
    return jax.random.bernoulli(k, keep, shape)


DROPOUT_NAMES = ["x_contract_unsorted", "weight_lhs", "two_out_axes", "transposed",
                 "in_axes_reversed_out_permuted"]


def _unmerged(fn, masks, keep):
    """PEFT's formula x·W0 + s·drop(x)·A·B for the multi-layout fn, given the masks."""
    def g(p, l, xs):
        base = fn(p, xs)
        delta = {n: {"w": l[n]["w"].delta()} for n in l}
        xd = {n: jnp.where(masks[n], xs[n] / keep, 0) for n in xs}
        upd = fn(delta, xd)
        return {n: base[n] + upd[n] for n in base}
    return g


def test_dropout_path_against_unmerged_formula_with_same_mask():
    rate = 0.4
    keep = 1.0 - rate
    fn, params, lora, xs = make_multi(DROPOUT_NAMES, dropout=rate)
    rng = key(11)
    masks = jax.jit(lambda k: {n: _mask(k, f"{n}/w", 0, xs[n].shape, keep) for n in xs})(rng)
    for n, m in masks.items():  # dropout really drops some and keeps some, on every layout
        assert 0.2 < float(np.mean(np.asarray(m))) < 0.9, n
    unmerged = _unmerged(fn, masks, keep)
    f = lora_jax.apply(fn)
    out = jax.jit(f)(params, lora, xs, lora_rng=rng)
    proj = _proj(out)
    g = jax.jit(jax.grad(lambda l, x: _dot_proj(f(params, l, x, lora_rng=rng), proj),
                         argnums=(0, 1)))(lora, xs)
    with jax.enable_x64(True):
        p64 = f64(params)

        def loss64(l, x):
            y = unmerged(p64, l, x)
            return _dot_proj(y, proj, jnp.float64), y

        g64, ref = jax.jit(jax.grad(loss64, argnums=(0, 1), has_aux=True))(f64(lora), f64(xs))
    for n in xs:
        assert max_rel_err(out[n], ref[n]) < 1e-5, ("value (or mask derivation)", n)
        assert max_rel_err(g[0][n], g64[0][n]) < 1e-4, ("grad wrt LoRA factors", n)
        assert max_rel_err(g[1][n], g64[1][n]) < 1e-4, ("grad wrt input", n)


def test_dropout_near_one_is_the_base_model_and_b_gets_no_gradient():
    fn, params, lora, xs = make_multi(["x_contract_unsorted", "weight_lhs", "transposed"],
                                      dropout=0.999999)
    f = lora_jax.apply(fn)
    rng = key(5)
    loss = lambda y: sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(y))
    out, (g, gx) = jax.jit(lambda l, x: (f(params, l, x, lora_rng=rng), jax.grad(
        lambda l, x: loss(f(params, l, x, lora_rng=rng)), argnums=(0, 1))(l, x)))(lora, xs)
    assert max_rel_err(out, jax.jit(fn)(params, xs)) < 1e-5
    for n in xs:
        assert float(jnp.max(jnp.abs(g[n]["w"].b))) < 1e-6, n
        assert float(jnp.max(jnp.abs(g[n]["w"].a))) < 1e-6, n
    gx_base = jax.jit(jax.grad(lambda x: loss(fn(params, x))))(xs)
    assert max_rel_err(gx, gx_base) < 1e-5


def test_dropout_grads_finite_deterministic_and_key_dependent():
    fn, params, lora, xs = make_multi(["weight_lhs", "two_out_axes"], dropout=0.5)
    f = lora_jax.apply(fn)
    loss = lambda y: sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(y))
    grad = jax.jit(jax.grad(lambda l, k: loss(f(params, l, xs, lora_rng=k))))
    g1, g2 = grad(lora, key(3)), grad(lora, key(3))
    g3 = grad(lora, key(4))
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(g1))
    assert max_rel_err(g1, g2) == 0.0
    assert max_rel_err(g1, g3) > 1e-3
    # No rng: dropout off, the merged model.
    g0 = jax.jit(jax.grad(lambda l: loss(f(params, l, xs))))(lora)
    g_ref = jax.jit(jax.grad(lambda l: loss(fn(lora_jax.merge(params, l), xs))))(lora)
    assert max_rel_err(g0, g_ref) < 1e-5


def test_dropout_under_vmap_of_grad_over_keys_and_inputs():
    # Reference: the unmerged formula with the mask drawn from each example's key, vmapped
    # the same way (cheap RBG keys are not vmap-invariant, so both sides are vmapped).
    fn = LAYOUTS["x_contract_unsorted"][0]
    params, lora = make((3, 4, 5), 2, dropout=0.5)
    xs = rnd(8, (3, 4, 2, 3, 6))
    keys = jax.vmap(key)(jnp.arange(3))
    f = lora_jax.apply(fn)

    def unmerged(l, x, k):
        xd = jnp.where(_mask(k, "w", 0, x.shape, 0.5), x / 0.5, 0)
        return fn(params, x) + fn({"w": l["w"].delta()}, xd)

    def vgrad(fwd):
        return jax.jit(jax.vmap(jax.grad(lambda l, x, k: jnp.sum(jnp.sin(fwd(l, x, k))),
                                         argnums=(0, 1)), in_axes=(None, 0, 0)))

    g = vgrad(lambda l, x, k: f(params, l, x, lora_rng=k))(lora, xs, keys)
    g_ref = vgrad(unmerged)(lora, xs, keys)
    assert max_rel_err(g, g_ref) < 1e-5
    b = np.asarray(g[0]["w"].b)
    assert np.all(np.isfinite(b)) and not np.allclose(b[0], b[1])  # per-example masks


def test_dropout_with_bf16_compute_dtype_is_finite_and_close():
    fn, params, lora, xs = make_multi(["two_out_axes", "weight_lhs"], dropout=0.3)
    rng = key(2)
    masks = jax.jit(lambda k: {n: _mask(k, f"{n}/w", 0, xs[n].shape, 0.7) for n in xs})(rng)
    unmerged = _unmerged(fn, masks, 0.7)
    f = lora_jax.apply(fn, compute_dtype=BF16)
    out = jax.jit(f)(params, lora, xs, lora_rng=rng)
    assert all(y.dtype == jnp.float32 for y in jax.tree.leaves(out))
    assert max_rel_err(out, jax.jit(unmerged)(params, lora, xs)) < 2e-2
    proj = _proj(out)
    g = jax.jit(jax.grad(lambda l: _dot_proj(f(params, l, xs, lora_rng=rng), proj)))(lora)
    g_ref = jax.jit(jax.grad(lambda l: _dot_proj(unmerged(params, l, xs), proj)))(lora)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(g))
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(g))
    assert norm_err(g, g_ref) < 2e-2


# ----------------------------------------------------------------------------------------
# 2. remat / checkpoint blocks

V, D = 11, 6


def remat_params(dropout=0.0):
    params = {"emb": rnd(20, (V, D)), "w": rnd(21, (D, D), 0.4), "u": rnd(22, (D, 2, 4), 0.4)}
    lora = init_lora(params, r=3, alpha=6.0, targets=["w", "u", "emb"], dropout=dropout)
    return params, lora


IDS = jnp.asarray(np.random.default_rng(23).integers(0, V, (2, 5)), jnp.int32)
XR = rnd(24, (2, 5, D))


def _assert_rewritten(fn, params, lora, *args, policy=False, raw_params=None):
    remat = {"checkpoint", "remat", "remat2"}
    names = prim_names(jax.make_jaxpr(lora_jax.apply(fn))(params, lora, *args))
    assert bool(remat & names) == policy, names  # JAX's own remat only with a policy
    # ... and the user's function really has one.
    raw = params if raw_params is None else raw_params
    assert remat & prim_names(jax.make_jaxpr(fn)(raw, *args))


def test_checkpoint_with_integer_ids_and_float_activations():
    def block(p, ids, h):
        return jnp.tanh((h + p["emb"][ids]) @ p["w"])

    def fn(p, x, ids):
        h = jax.checkpoint(block)(p, ids, x)
        return jnp.einsum("bsi,ihd->bshd", h, p["u"])

    params, lora = remat_params()
    check_merged(fn, params, lora, XR, IDS)
    rep = lora_jax.report(fn, params, lora, XR, IDS)
    assert {k: w.routes for k, w in rep.weights.items()} == {
        "emb": ["gather"], "w": ["fast"], "u": ["fast"]}, rep
    _assert_rewritten(fn, params, lora, XR, IDS)


def test_checkpoint_with_several_outputs_one_unused_one_integer():
    def block(p, ids, h):
        y = jnp.tanh(h @ p["w"])
        return jnp.cos(y @ p["w"].T), y, ids + 1  # the first output is unused by the loss

    def fn(p, x, ids):
        _unused, y, ids2 = jax.checkpoint(block)(p, ids, x)
        return jnp.einsum("bsi,ihd->bshd", y, p["u"]) + p["emb"][ids2 % V][..., None, :4]

    params, lora = remat_params()
    check_merged(fn, params, lora, XR, IDS)
    _assert_rewritten(fn, params, lora, XR, IDS)


def test_nested_checkpoints():
    def fn(p, x):
        def outer(p, h):
            h = jax.checkpoint(lambda p, h: jnp.tanh(h @ p["w"]))(p, h)
            return jnp.sin(jax.checkpoint(lambda h: h @ p["w"].T)(h))
        h = jax.checkpoint(outer)(p, x)
        return jnp.einsum("bsi,ihd->bshd", h, p["u"])

    params, lora = remat_params()
    check_merged(fn, params, lora, XR)
    assert lora_jax.report(fn, params, lora, XR)["w"].routes == ["fast"] * 2
    _assert_rewritten(fn, params, lora, XR)


def test_checkpoint_inside_lax_scan():
    def fn(p, x):
        def body(h, _):
            h = jax.checkpoint(lambda h: jnp.tanh(h @ p["w"]))(h)
            return h, h.sum()
        h, ys = lax.scan(body, x, None, length=3)
        return jnp.einsum("bsi,ihd->bshd", h, p["u"]) * ys.sum()

    params, lora = remat_params()
    check_merged(fn, params, lora, XR, gtol=2e-4)
    _assert_rewritten(fn, params, lora, XR)


def test_checkpoint_with_saving_policy_takes_jax_path():
    policy = jax.checkpoint_policies.dots_saveable

    def fn(p, x):
        h = jax.checkpoint(lambda p, h: jnp.sin(jnp.tanh(h @ p["w"]) @ p["w"]),
                           policy=policy)(p, x)
        return jnp.einsum("bsi,ihd->bshd", h, p["u"])

    params, lora = remat_params()
    check_merged(fn, params, lora, XR)
    assert lora_jax.report(fn, params, lora, XR)["w"].routes == ["fast"] * 2
    _assert_rewritten(fn, params, lora, XR, policy=True)


def test_checkpoint_with_scalar_and_typed_key_arguments():
    def fn(p, x, k):
        def blk(h, s, k):
            y = jnp.tanh(h @ p["w"]) * s
            keep = jax.random.bernoulli(k, 0.7, y.shape)
            return jnp.where(keep, y / 0.7, 0), jax.random.split(k)[0]
        y, _ = jax.checkpoint(blk)(x, 2.0, k)  # a Python scalar and a typed key go in
        return y

    params, lora = remat_params()
    check_merged(fn, params, lora, XR, key(3), ref64=False)
    _assert_rewritten(fn, params, lora, XR, key(3))


def test_vmap_of_grad_through_checkpoint():
    def fn(p, x):
        h = jax.checkpoint(lambda h: jnp.tanh(h @ p["w"]) @ p["w"].T)(x)
        return jnp.einsum("bsi,ihd->bshd", h, p["u"])

    params, lora = remat_params()
    xs = rnd(25, (3,) + XR.shape)
    f = lora_jax.apply(fn)
    g = jax.jit(jax.vmap(jax.grad(lambda l, x: jnp.sum(jnp.sin(f(params, l, x))),
                                  argnums=(0, 1)), in_axes=(None, 0)))(lora, xs)
    g_ref = jax.jit(jax.vmap(jax.grad(
        lambda l, x: jnp.sum(jnp.sin(fn(lora_jax.merge(params, l), x))), argnums=(0, 1)),
        in_axes=(None, 0)))(lora, xs)
    assert max_rel_err(g, g_ref) < 1e-5


def test_checkpoint_with_dropout_recomputes_the_same_masks():
    def body(p, h):
        return jnp.tanh(jnp.tanh(h @ p["w"]) @ p["w"].T)

    # "w" is used twice in the block and once after it: the use after the block must draw
    # its own (third) mask with and without the checkpoint.
    def plain(p, x):
        return jnp.einsum("bsi,ihd->bshd", body(p, x) @ p["w"], p["u"])

    def ckpt(p, x):
        return jnp.einsum("bsi,ihd->bshd", jax.checkpoint(body)(p, x) @ p["w"], p["u"])

    params, lora = remat_params(dropout=0.5)
    rng = key(4)

    def vg(fn):
        f = lora_jax.apply(fn)
        return jax.jit(jax.value_and_grad(
            lambda l, k: jnp.sum(jnp.sin(f(params, l, XR, lora_rng=k)))))

    vg_plain, vg_ckpt = vg(plain), vg(ckpt)
    (v1, g1), (v2, g2) = vg_plain(lora, rng), vg_ckpt(lora, rng)
    assert abs(float(v1) - float(v2)) < 1e-6 and max_rel_err(g2, g1) < 1e-6
    v3, _ = vg_ckpt(lora, key(5))
    assert abs(float(v3) - float(v2)) > 1e-4


def _scan_fns():
    def step(p, h):
        return jnp.tanh(h @ p["w"])

    def plain(p, x):
        return lax.scan(lambda h, _: (step(p, h), None), x, None, length=2)[0]

    def ckpt(p, x):  # a checkpoint in the scan body, with a nested one inside
        def step_ckpt(p, h):
            return jnp.tanh(jax.checkpoint(lambda h: h @ p["w"])(h))
        return lax.scan(lambda h, _: (jax.checkpoint(step_ckpt)(p, h), None), x, None,
                        length=2)[0]

    return plain, ckpt


def test_checkpoint_in_scan_with_dropout_values_and_gradients():
    # Fails at 157c366: the remat rule's body closed over cfg.rng, inside a scan the step's
    # key (a scan-body tracer), and the custom VJP's backward trace leaked it
    # (UnexpectedTracerError).
    plain, ckpt = _scan_fns()
    params, lora = remat_params(dropout=0.5)
    rng = key(4)

    def vg(fn):
        f = lora_jax.apply(fn)
        return jax.jit(jax.value_and_grad(
            lambda l: jnp.sum(jnp.sin(f(params, l, XR, lora_rng=rng)))))(lora)

    (v1, g1), (v2, g2) = vg(plain), vg(ckpt)
    assert abs(float(v1) - float(v2)) < 1e-6
    assert max_rel_err(g2, g1) < 1e-6


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.DenseGeneral((2, 3), name="split")(x)  # kernel (D, 2, 3): two output axes
        h = nn.DenseGeneral(D, axis=(-2, -1), name="join")(jnp.tanh(h))  # (2, 3, D): two in
        return x + jnp.tanh(h), None


class _ScanRemat(nn.Module):
    """nn.scan over nn.remat layers (as GPTConfig(scan=True, remat=True)), kept tiny."""

    remat: bool = True

    @nn.compact
    def __call__(self, x):
        layers = nn.scan(nn.remat(_Layer) if self.remat else _Layer,
                         variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return layers(name="layers")(x, None)[0]


def test_flax_nn_scan_of_nn_remat_against_merged():
    model = _ScanRemat()
    params = jax.jit(model.init)(key(0), XR)
    lora = init_lora(params, r=2, stack_axes={".*layers.*": 1}, in_axes={".*join.*": 2})
    assert lora["params"]["layers"]["join"]["kernel"].a.shape == (3, 2, 3, 2)
    check_merged(model.apply, params, lora, XR)
    assert_all_fast(model.apply, params, lora, XR)
    _assert_rewritten(model.apply, params, lora, XR)


def test_flax_nn_scan_of_nn_remat_with_dropout():
    # Fails at 157c366 (UnexpectedTracerError: the remat body closed over the scan step's
    # dropout key); same masks with and without nn.remat once the key is an argument.
    params = jax.jit(_ScanRemat().init)(key(0), XR)
    lora = init_lora(params, r=2, dropout=0.3, stack_axes={".*layers.*": 1},
                     in_axes={".*join.*": 2})

    def vg(model):
        f = lora_jax.apply(model.apply)
        return jax.jit(jax.value_and_grad(
            lambda l, k: jnp.sum(jnp.sin(f(params, l, XR, lora_rng=k)))))

    rng = key(3)
    vg_remat = vg(_ScanRemat())
    (v1, g1), (v2, g2) = vg(_ScanRemat(remat=False))(lora, rng), vg_remat(lora, rng)
    assert all(bool(np.all(np.isfinite(a))) for a in jax.tree.leaves(g2))
    assert abs(float(v1) - float(v2)) < 1e-6 and max_rel_err(g2, g1) < 1e-5
    v3, _ = vg_remat(lora, key(4))  # another key: the masks are really applied
    assert abs(float(v3) - float(v2)) > 1e-4


class _RematStack(nn.Module):
    """Two nn.remat layers, unrolled (a quantized base cannot be sliced by nn.scan here)."""

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = nn.remat(_Layer)(name=f"layer_{i}")(x, None)[0]
        return x


def test_qlora_nf4_double_quant_base_through_remat_model():
    model = _RematStack()
    params = jax.jit(model.init)(key(0), XR)
    qbase = lora_jax.quantize(params, "nf4", double_quant=True)
    # Only "split" is adapted: "join" is a quantized base without adapter inside the block.
    lora = init_lora(params, r=2, targets=r".*/split/kernel")
    dense = lora_jax.dequantize_tree(qbase)
    check_merged(model.apply, qbase, lora, XR, ref_params=dense)
    rep = lora_jax.report(model.apply, qbase, lora, XR)
    adapted = lora_jax.lora.leaves(lora)
    assert sum(p in adapted for p in rep) == 2 and len(rep) == 4, rep
    for path, w in rep.weights.items():
        want = "fast" if path in adapted else "dequantize"
        assert w.uses and all(r == want for r in w.routes), (path, w)
    _assert_rewritten(model.apply, qbase, lora, XR, raw_params=dense)


class _RematDropoutModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        class Inner(nn.Module):
            @nn.compact
            def __call__(self, x):
                return nn.Dropout(0.3, deterministic=False)(nn.Dense(6)(x))
        return nn.Dense(4)(nn.remat(Inner)()(x))


def test_flax_nn_remat_with_flax_dropout_rng_inside():
    model = _RematDropoutModel()
    params = jax.jit(model.init)({"params": key(0), "dropout": key(1)}, XR)
    lora = init_lora(params, r=2)

    def fn(p, x, k):
        return model.apply(p, x, rngs={"dropout": k})

    check_merged(fn, params, lora, XR, key(3), ref64=False)
    assert_all_fast(fn, params, lora, XR, key(3))
