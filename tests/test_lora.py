"""init / merge / unmerge / summaries and their errors, against direct computations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize

import lora_jax
from lora_jax import lora as L


def mlp_params(key=jax.random.key(0)):
    k = jax.random.split(key, 6)
    return {"params": {
        "embed": {"embedding": jax.random.normal(k[0], (50, 16))},
        "attn": {"q": {"kernel": jax.random.normal(k[1], (16, 16)), "bias": jnp.zeros(16)},
                 "o": {"kernel": jax.random.normal(k[2], (4, 4, 16))}},
        "mlp": {"up": {"kernel": jax.random.normal(k[3], (16, 32))},
                "down": {"kernel": jax.random.normal(k[4], (32, 16))}},
        "norm": {"scale": jnp.ones(16)},
    }}


def test_default_targets_every_kernel_not_embeddings_biases_norms():
    lora = lora_jax.init(mlp_params(), r=2, key=jax.random.key(1))
    assert sorted(L.leaves(lora)) == [
        "params/attn/o/kernel", "params/attn/q/kernel", "params/mlp/down/kernel",
        "params/mlp/up/kernel"]
    o = lora["params"]["attn"]["o"]["kernel"]
    assert o.in_axes == 2 and o.a.shape == (4, 4, 2) and o.b.shape == (2, 16)


def test_targets_regex_list_exclude_and_rules():
    p = mlp_params()
    l1 = lora_jax.init(p, r=4, alpha=8, targets=r".*/(q|up)/kernel", key=jax.random.key(1))
    assert sorted(L.leaves(l1)) == ["params/attn/q/kernel", "params/mlp/up/kernel"]
    l2 = lora_jax.init(p, r=2, targets=["params/mlp/up/kernel", r".*down.*"],
                       exclude=".*down.*", key=jax.random.key(1))
    assert sorted(L.leaves(l2)) == ["params/mlp/up/kernel"]
    l3 = lora_jax.init(p, key=jax.random.key(1), rules=[
        lora_jax.Rule(pattern=r".*attn.*", r=8, alpha=32),
        lora_jax.Rule(pattern=r".*attn/o.*", r=1),  # shadowed: first match wins
        lora_jax.Rule(pattern=r".*mlp.*", r=4)])
    leaves = L.leaves(l3)
    assert {p: x.r for p, x in leaves.items()} == {
        "params/attn/q/kernel": 8, "params/attn/o/kernel": 8,
        "params/mlp/up/kernel": 4, "params/mlp/down/kernel": 4}
    assert leaves["params/attn/q/kernel"].scale == 4.0
    assert leaves["params/mlp/up/kernel"].scale == 1.0  # alpha defaults to r
    l4 = lora_jax.init(p, r=16, rslora=True, alpha=8, targets=".*q/kernel", key=jax.random.key(1))
    assert L.leaves(l4)["params/attn/q/kernel"].scale == pytest.approx(8 / math.sqrt(16))


def test_init_schemes_distributions_and_per_leaf_keys():
    p = {"a": {"kernel": jnp.ones((400, 300))}, "b": {"kernel": jnp.ones((400, 300))}}
    lora = lora_jax.init(p, r=64, key=jax.random.key(3))
    a = np.asarray(lora["a"]["kernel"].a)
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=sqrt(5)) on fan_in=400
    assert a.max() <= bound and a.min() >= -bound and a.max() > 0.95 * bound
    assert np.allclose(np.std(a), bound / math.sqrt(3), rtol=0.03)
    assert not np.any(np.asarray(lora["a"]["kernel"].b))
    assert not np.allclose(a, np.asarray(lora["b"]["kernel"].a))  # per-leaf keys
    g = lora_jax.init(p, r=64, init="gaussian", key=jax.random.key(3))
    assert np.allclose(np.std(np.asarray(g["a"]["kernel"].a)), 1 / 64, rtol=0.03)
    assert lora["a"]["kernel"].a.dtype == jnp.float32
    bf = {"k": {"kernel": jnp.ones((8, 8), jnp.bfloat16)}}
    assert lora_jax.init(bf, r=2, key=jax.random.key(0))["k"]["kernel"].a.dtype == jnp.float32
    assert lora_jax.init(bf, r=2, key=jax.random.key(0), dtype=jnp.bfloat16)[
        "k"]["kernel"].b.dtype == jnp.bfloat16


def test_pissa_principal_components_and_unchanged_model():
    w = np.asarray(jax.random.normal(jax.random.key(5), (24, 16)), np.float64)
    p = {"d": {"kernel": jnp.asarray(w, jnp.float32)}}
    lora = lora_jax.init(p, r=4, alpha=8, init="pissa", key=jax.random.key(0))
    leaf = lora["d"]["kernel"]
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    principal = (u[:, :4] * s[:4]) @ vt[:4]
    np.testing.assert_allclose(np.asarray(leaf.delta()), principal, atol=1e-4)
    base = lora_jax.unmerge(p, lora)  # residual base: the model is unchanged
    np.testing.assert_allclose(np.asarray(lora_jax.merge(base, lora)["d"]["kernel"]), w,
                               atol=1e-5)


def test_merge_matches_direct_formula_multi_axis_and_stacked():
    k = jax.random.split(jax.random.key(0), 3)
    p = {"dg": {"kernel": jax.random.normal(k[0], (6, 2, 5))},
         "layers": {"kernel": jax.random.normal(k[1], (3, 6, 7))}}
    lora = randomize(lora_jax.init(p, r=2, alpha=3, key=k[2], stack_axes={"layers.*": 1}),
                     jax.random.key(9))
    merged = jax.jit(lora_jax.merge)(p, lora)
    dg = lora["dg"]["kernel"]
    ref = np.asarray(p["dg"]["kernel"]) + 1.5 * np.einsum("ir,rjk->ijk", dg.a, dg.b)
    np.testing.assert_allclose(merged["dg"]["kernel"], ref, rtol=1e-5, atol=1e-5)
    st = lora["layers"]["kernel"]
    assert st.a.shape == (3, 6, 2) and st.b.shape == (3, 2, 7)
    ref = np.asarray(p["layers"]["kernel"]) + 1.5 * np.einsum("lir,lro->lio", st.a, st.b)
    np.testing.assert_allclose(merged["layers"]["kernel"], ref, rtol=1e-5, atol=1e-5)


def test_unmerge_round_trip():
    p = mlp_params()
    lora = randomize(lora_jax.init(p, r=4, key=jax.random.key(1)), jax.random.key(2), 1.0)
    back = jax.jit(lora_jax.unmerge)(jax.jit(lora_jax.merge)(p, lora), lora)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(p)):
        assert float(jnp.linalg.norm(a - b)) <= 1e-6 * float(jnp.linalg.norm(b))


def test_merge_keeps_base_dtype():
    p = {"k": {"kernel": jax.random.normal(jax.random.key(0), (8, 8)).astype(jnp.bfloat16)}}
    lora = randomize(lora_jax.init(p, r=2, key=jax.random.key(1)), jax.random.key(2))
    m = lora_jax.merge(p, lora)
    assert m["k"]["kernel"].dtype == jnp.bfloat16
    assert lora_jax.merge(p, lora, dtype=jnp.float32)["k"]["kernel"].dtype == jnp.float32


def test_lora_tree_is_a_pytree_with_static_metadata():
    lora = lora_jax.init(mlp_params(), r=2, alpha=4, key=jax.random.key(1))
    out = jax.jit(lambda l: jax.tree.map(lambda x: x * 2, l))(lora)
    leaf = out["params"]["mlp"]["up"]["kernel"]
    assert isinstance(leaf, lora_jax.LoraWeight) and leaf.alpha == 4 and leaf.r == 2
    assert len(jax.tree.leaves(lora)) == 8  # only the factors are array leaves


def test_param_count_and_summary():
    p = mlp_params()
    lora = lora_jax.init(p, r=2, key=jax.random.key(1))
    expected = 2 * (16 + 16) + 2 * (16 + 16) + 2 * (16 + 32) + 2 * (32 + 16)
    assert lora_jax.param_count(lora) == expected
    n_base = sum(x.size for x in jax.tree.leaves(p))
    s = lora_jax.summary(lora, p)
    assert (s.trainable, s.base, s.ranks, s.kind) == (expected, n_base, {2: 4}, "LoRA")
    o = next(m for m in s.modules if m.path == "params/attn/o/kernel")
    assert (o.r, o.roles) == (2, "iio")  # (heads, head_dim, d): all but the last are input
    assert sum(m.params for m in s.modules) == expected
    # The log line and the verbose listing are rendered from that data.
    assert f"{expected:,} trainable params" in str(s) and f"of {n_base:,} base" in str(s)
    assert "4 modules" in str(s) and "r=2 x4" in str(s)
    assert "params/attn/o/kernel: r=2" in str(lora_jax.summary(lora, p, verbose=True))


@pytest.mark.parametrize("kwargs, match", [
    (dict(targets=r".*/nothing/kernel"), "matches no parameter"),
    (dict(r=17), r"rank r=17 .* min\(16, 16\)"),
    (dict(init="xavier"), "unknown init scheme"),
    (dict(targets=r".*/norm/scale"), "at least two axes"),
    (dict(rules=[lora_jax.Rule(pattern=".*nope.*", r=2)]), "rule pattern"),
])
def test_init_errors_name_the_problem(kwargs, match):
    kw = dict(r=2, key=jax.random.key(0)) | kwargs
    with pytest.raises(ValueError, match=match):
        lora_jax.init(mlp_params(), **kw)


def test_non_float_and_nan_kernels_are_refused():
    with pytest.raises(TypeError, match="'ids/kernel' has dtype int32"):
        lora_jax.init({"ids": {"kernel": jnp.ones((4, 4), jnp.int32)}}, targets=".*",
                      r=1, key=jax.random.key(0))
    bad = jnp.ones((4, 4)).at[1, 2].set(jnp.nan)
    with pytest.raises(ValueError, match="'m/kernel' contains 1 NaN/Inf"):
        lora_jax.init({"m": {"kernel": bad}}, r=1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="NaN/Inf"):
        lora_jax.init({"m": {"kernel": bad.at[0, 0].set(jnp.inf)}}, r=1, key=jax.random.key(0))


def test_mismatched_lora_tree_errors():
    p = mlp_params()
    lora = lora_jax.init(p, r=2, key=jax.random.key(1))
    q = jax.tree.map(lambda x: x, p)
    del q["params"]["mlp"]["up"]
    with pytest.raises(ValueError, match="'params/mlp/up/kernel', which the base tree lacks"):
        lora_jax.merge(q, lora)
    q = jax.tree.map(lambda x: x, p)
    q["params"]["mlp"]["up"]["kernel"] = jnp.ones((16, 33))
    with pytest.raises(ValueError,
                       match=r"'params/mlp/up/kernel' fit a kernel of shape \(16, 32\)"):
        lora_jax.apply(lambda p, x: x)(q, lora, 1.0)
