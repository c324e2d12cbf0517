"""The thin LoRA matmul (fast_dot._thin / lowrank) over every dot_general layout the rewrite
sends to it (``conftest.LAYOUTS``), and under vmap of grad.

References are independent of the code under test: the merged-weight computation
``fn(merge(params, lora), ...)`` for values, float64 autodiff of it for gradients. Inputs
and factors are fresh random values, never zeros.
"""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import (
    LAYOUTS,
    assert_all_fast,
    check_merged,
    make_multi,
    max_rel_err,
    one_kernel,
    rnd,
)

import lora_jax


def test_thin_layouts_against_merged():
    fn, params, lora, xs = make_multi(list(LAYOUTS))
    assert lora["two_in_axes"]["w"].a.shape == (3, 4, 3)
    assert lora["two_out_axes"]["w"].b.shape == (3, 3, 4)
    check_merged(fn, params, lora, xs)
    assert_all_fast(fn, params, lora, xs)


def test_thin_under_vmap_of_grad():
    fn = LAYOUTS["x_contract_unsorted"][0]
    params, lora = one_kernel((3, 4, 5), 2)
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
