"""LoRA dropout (fast_dot.dropout_dot_general) on the thin matmul's layouts.

The reference is float64 autodiff of PEFT's unmerged formula ``x·W0 + s·drop(x)·A·B`` with the
same mask, independent of the code under test. Inputs and factors are fresh random values,
never zeros.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
from conftest import (
    BF16,
    LAYOUTS,
    dot_proj,
    f64,
    make_multi,
    max_rel_err,
    norm_err,
    one_kernel,
    random_like,
    rbg_key,
    rnd,
)

import lora_jax


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
    rng = rbg_key(11)
    masks = jax.jit(lambda k: {n: _mask(k, f"{n}/w", 0, xs[n].shape, keep) for n in xs})(rng)
    for n, m in masks.items():  # dropout really drops some and keeps some, on every layout
        assert 0.2 < float(np.mean(np.asarray(m))) < 0.9, n
    unmerged = _unmerged(fn, masks, keep)
    f = lora_jax.apply(fn)
    out = jax.jit(f)(params, lora, xs, lora_rng=rng)
    proj = random_like(out)
    g = jax.jit(jax.grad(lambda l, x: dot_proj(f(params, l, x, lora_rng=rng), proj),
                         argnums=(0, 1)))(lora, xs)
    with jax.enable_x64(True):
        p64 = f64(params)

        def loss64(l, x):
            y = unmerged(p64, l, x)
            return dot_proj(y, proj, jnp.float64), y

        g64, ref = jax.jit(jax.grad(loss64, argnums=(0, 1), has_aux=True))(f64(lora), f64(xs))
    for n in xs:
        assert max_rel_err(out[n], ref[n]) < 1e-5, ("value (or mask derivation)", n)
        assert max_rel_err(g[0][n], g64[0][n]) < 1e-4, ("grad wrt LoRA factors", n)
        assert max_rel_err(g[1][n], g64[1][n]) < 1e-4, ("grad wrt input", n)


def test_dropout_near_one_is_the_base_model_and_b_gets_no_gradient():
    fn, params, lora, xs = make_multi(["x_contract_unsorted", "weight_lhs", "transposed"],
                                      dropout=0.999999)
    f = lora_jax.apply(fn)
    rng = rbg_key(5)
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
    g1, g2 = grad(lora, rbg_key(3)), grad(lora, rbg_key(3))
    g3 = grad(lora, rbg_key(4))
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
    params, lora = one_kernel((3, 4, 5), 2, dropout=0.5)
    xs = rnd(8, (3, 4, 2, 3, 6))
    keys = jax.vmap(rbg_key)(jnp.arange(3))
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
    rng = rbg_key(2)
    masks = jax.jit(lambda k: {n: _mask(k, f"{n}/w", 0, xs[n].shape, 0.7) for n in xs})(rng)
    unmerged = _unmerged(fn, masks, 0.7)
    f = lora_jax.apply(fn, compute_dtype=BF16)
    out = jax.jit(f)(params, lora, xs, lora_rng=rng)
    assert all(y.dtype == jnp.float32 for y in jax.tree.leaves(out))
    assert max_rel_err(out, jax.jit(unmerged)(params, lora, xs)) < 2e-2
    proj = random_like(out)
    g = jax.jit(jax.grad(lambda l: dot_proj(f(params, l, xs, lora_rng=rng), proj)))(lora)
    g_ref = jax.jit(jax.grad(lambda l: dot_proj(unmerged(params, l, xs), proj)))(lora)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(g))
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(g))
    assert norm_err(g, g_ref) < 2e-2
