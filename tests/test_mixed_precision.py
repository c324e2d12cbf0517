"""bf16 and mixed dtypes through the thin LoRA matmul: ``compute_dtype=bf16``, bf16 operands
with ``preferred_element_type``, and a dot_general of operands of different dtypes.

References are independent of the code under test: the merged-weight computation
``fn(merge(params, lora), ...)`` for values, float64 autodiff of it for gradients (or,
where the function itself rounds to bf16, the bf16 merged model's own error against it).
Inputs and factors are fresh random values, never zeros.
"""

import jax
import jax.numpy as jnp
from conftest import (
    BF16,
    assert_all_fast,
    check_merged,
    dot_proj,
    f64,
    make_multi,
    max_rel_err,
    norm_err,
    one_kernel,
    random_like,
    rnd,
)
from jax import lax

import lora_jax

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
    proj = random_like(out)
    grad = lambda fwd: jax.jit(jax.grad(
        lambda l, x: dot_proj(fwd(l, x), proj), argnums=(0, 1)))
    g = grad(lambda l, x: f(params, l, x))(lora, xs)
    g16 = grad(lambda l, x: fn_bf16(lora_jax.merge(params, l), x))(lora, xs)
    with jax.enable_x64(True):
        p64 = f64(params)
        g64 = jax.jit(jax.grad(lambda l, x: dot_proj(fn(lora_jax.merge(p64, l), x), proj,
                                                      jnp.float64), argnums=(0, 1)))(
            f64(lora), f64(xs))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(g))
    for n in BF16_NAMES:
        for i in range(2):
            err_fast, err_bf16 = norm_err(g[i][n], g64[i][n]), norm_err(g16[i][n], g64[i][n])
            assert err_fast < 2.0 * err_bf16 + 1e-3, (n, i, err_fast, err_bf16)
    assert_all_fast(fn, params, lora, xs)


def test_thin_bf16_operands_with_preferred_element_type():
    params, lora = one_kernel((3, 4, 5), 2)
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
    params, lora = one_kernel((6, 4))
    x = rnd(7, (3, 6))

    def fn(p, x):  # lax.dot_general accepts operands of different dtypes; result float32
        return lax.dot_general(x, p["w"].astype(BF16), (((1,), (0,)), ((), ())))

    assert fn(params, x).dtype == jnp.float32
    check_merged(fn, params, lora, x, tol=1e-5, gtol=1e-2, value_ref32=True)
