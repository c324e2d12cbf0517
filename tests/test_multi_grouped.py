"""The grouped route (``routing="grouped"``): rows sorted by adapter, one ``ragged_dot`` per
factor, unsorted back. Equal to a float64 merged-weight reference row by row and to the
gather route in values and in the gradients of A, B and x, under jit and grad, with
tokens per row (prefill) and one row per example (decode)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax.leaves import is_lowrank
from lora_jax.leaves import leaves as leaf_map

RNG = np.random.default_rng(7)
PARAMS = {"up": {"kernel": jnp.asarray(RNG.standard_normal((6, 8)), jnp.float32)},
          "down": {"kernel": jnp.asarray(RNG.standard_normal((8, 5)), jnp.float32)}}


def mlp(p, x):
    return jnp.tanh(x @ p["up"]["kernel"]) @ p["down"]["kernel"]


def mlp_transposed(p, x):  # the weight as the lhs of the dot: W0ᵀ·xᵀ
    h = jnp.tanh(jnp.einsum("io,bti->bot", p["up"]["kernel"], x))
    return jnp.einsum("bot,of->btf", h, p["down"]["kernel"])


def adapter(r, seed):
    lora = lora_jax.init(PARAMS, r=r, alpha=1.5 * r, key=jax.random.key(seed))
    draw = np.random.default_rng(seed)
    return jax.tree.map(lambda w: w.replace(
        a=jnp.asarray(draw.standard_normal(w.a.shape), jnp.float32),
        b=jnp.asarray(0.5 * draw.standard_normal(w.b.shape), jnp.float32)), lora,
        is_leaf=is_lowrank)


ADS = {"x": adapter(2, 1), "y": adapter(3, 2), "z": adapter(1, 3), "w": adapter(2, 4)}
STACK = lora_jax.stack(ADS)
IDS = jnp.array([2, 0, -1, 3, 0, 2, 7, 1, 2], jnp.int32)  # 7: out of range, traced


def tokens(n, t, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, t, 6)), jnp.float32)


def reference(ids, x):
    """Row i on adapter ids[i]'s merged weights, in float64 (the base alone off range)."""
    x = np.asarray(x, np.float64)
    out = []
    for i, row in zip(np.asarray(ids).tolist(), x):
        w = {k: np.asarray(PARAMS[k]["kernel"], np.float64) for k in PARAMS}
        if 0 <= i < len(ADS):
            for path, leaf in leaf_map(list(ADS.values())[i]).items():
                a, b = np.asarray(leaf.a, np.float64), np.asarray(leaf.b, np.float64)
                w[path.split("/")[0]] = w[path.split("/")[0]] + float(leaf.scale) * a @ b
        out.append(np.tanh(row @ w["up"]) @ w["down"])
    return np.stack(out)


@pytest.mark.parametrize("fn", [mlp, mlp_transposed])
@pytest.mark.parametrize("t", [4, 1])
def test_grouped_forward_matches_float64_reference(fn, t):
    x = tokens(len(IDS), t, 11)
    f = jax.jit(lambda s, x, i: lora_jax.apply(fn)(PARAMS, s, x, adapter_ids=i,
                                                   routing="grouped"))
    np.testing.assert_allclose(f(STACK, x, IDS), reference(IDS, x), atol=3e-5, rtol=3e-5)


def test_grouped_route_runs_ragged_dot():
    x = tokens(len(IDS), 3, 12)
    jaxprs = {r: str(jax.make_jaxpr(lambda s, x, i, r=r: lora_jax.apply(mlp)(
        PARAMS, s, x, adapter_ids=i, routing=r))(STACK, x, IDS))
        for r in ("grouped", "gather", None)}
    assert "ragged_dot" in jaxprs["grouped"]
    assert "ragged_dot" not in jaxprs["gather"]
    # the default stays gather (fastest on XLA:CPU in every case measured, RESULTS.md)
    assert "ragged_dot" not in jaxprs[None]
    assert jaxprs[None].count("gather[") == jaxprs["gather"].count("gather[") > 0


@pytest.mark.parametrize("fn", [mlp, mlp_transposed])
def test_grouped_gradients_of_a_b_and_x_match_gather(fn):
    x = tokens(len(IDS), 3, 13)
    tgt = tokens(len(IDS), 3, 14)[..., :5]

    def loss(s, x, ids, routing):
        y = lora_jax.apply(fn)(PARAMS, s, x, adapter_ids=ids, routing=routing)
        return jnp.sum(jnp.sin(y) * tgt)

    grads = {r: jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=3)(STACK, x, IDS, r)
             for r in ("gather", "onehot", "grouped")}
    for r in ("onehot", "grouped"):
        for want, got in zip(jax.tree.leaves(grads["gather"]), jax.tree.leaves(grads[r])):
            assert want.ndim == 1 or np.any(np.asarray(want))  # ndim 1: the frozen scales
            np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)
    # slot 3 ("w") and the off-range rows: only their own rows reach them
    g_stack = grads["grouped"][0]
    for leaf in leaf_map(g_stack).values():
        assert np.any(np.asarray(leaf.a[3])) and np.any(np.asarray(leaf.b[1]))


def test_grouped_off_range_rows_give_no_gradient():
    x = tokens(3, 2, 15)
    loss = lambda s, i: jnp.sum(lora_jax.apply(mlp)(  # noqa: E731
        PARAMS, s, x, adapter_ids=i, routing="grouped") ** 2)
    grads = jax.jit(jax.grad(loss))(STACK, jnp.array([5, -4, -1], jnp.int32))
    for leaf in jax.tree.leaves(grads):
        assert not np.any(np.asarray(leaf))


def test_grouped_through_scan_and_remat_gradients_match_gather():
    from lora_jax.models import gpt as G

    cfg = G.GPTConfig(vocab=32, d=16, heads=2, layers=2, mlp=32, seq=6, scan=True, remat=True)
    model = G.GPT(cfg)
    tok = jax.random.randint(jax.random.key(0), (5, 6), 0, 32)
    params = model.init(jax.random.key(1), tok)
    layouts = lora_jax.trace(model.apply, params, tok)
    stack = lora_jax.stack([jax.tree.map(lambda w, s=seed: w.replace(b=0.3 * jax.random.normal(
        jax.random.key(s), w.b.shape)), lora_jax.init(params, r=2, key=jax.random.key(seed),
                                                      layouts=layouts), is_leaf=is_lowrank)
        for seed in (3, 4, 5)])
    ids = jnp.array([1, -1, 0, 2, 1], jnp.int32)
    tgt = jax.random.normal(jax.random.key(9), (5, 6, 32))

    def loss(s, routing):
        return jnp.sum(lora_jax.apply(model.apply)(params, s, tok, adapter_ids=ids,
                                                   routing=routing) * tgt)

    want = jax.jit(jax.value_and_grad(loss), static_argnums=1)(stack, "gather")
    got = jax.jit(jax.value_and_grad(loss), static_argnums=1)(stack, "grouped")
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for w, g in zip(jax.tree.leaves(want[1]), jax.tree.leaves(got[1])):
        assert w.ndim == 1 or np.any(np.asarray(w))
        np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5)


def test_grouped_under_an_outer_vmap():
    xs = jnp.stack([tokens(len(IDS), 2, 16), tokens(len(IDS), 2, 17)])
    y = jax.jit(jax.vmap(lambda x, i: lora_jax.apply(mlp)(PARAMS, STACK, x, adapter_ids=i,
                                                          routing="grouped"),
                         in_axes=(0, None)))(xs, IDS)
    for j in range(2):
        np.testing.assert_allclose(y[j], reference(IDS, xs[j]), atol=3e-5, rtol=3e-5)


def test_grouped_llama_decode_with_kv_cache_matches_each_adapter_merged():
    from lora_jax.models import llama as L
    from lora_jax.multi.generate import generate

    cfg = L.LlamaConfig(vocab=48, d=32, layers=2, heads=4, kv_heads=2, ffn=64, max_len=16)
    model = L.Llama(cfg)
    v = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    ads = [jax.tree.map(lambda w, s=seed: w.replace(b=0.5 * jax.random.normal(
        jax.random.key(s), w.b.shape)), lora_jax.init(v, r=2, key=jax.random.key(seed)),
        is_leaf=is_lowrank) for seed in (1, 2)]
    tok = jax.random.randint(jax.random.key(3), (3, 4), 0, 48)
    ids = [1, -1, 0]
    out = generate(model, v, lora_jax.stack(ads), tok, 4, adapter_ids=ids, routing="grouped")
    for row, i in enumerate(ids):
        vv = v if i < 0 else lora_jax.merge(v, ads[i])
        assert np.array_equal(out[row], L.generate(model, vv, tok[row:row + 1], 4)[0])
    # the check can fail: the adapter changes row 0's tokens
    assert not np.array_equal(out[0], L.generate(model, v, tok[:1], 4)[0])
