"""Stacks of adapters: routing per example (jit, grad, vmap, scan, remat, QLoRA, the Llama KV
cache), K adapters trained in one step against each trained alone, hot swap, files."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from lora_jax import multi
from lora_jax.leaves import is_lowrank
from lora_jax.leaves import leaves as leaf_map
from lora_jax.models import gpt as G

CFG = G.GPTConfig(vocab=32, d=16, heads=2, layers=2, mlp=32, seq=8, scan=True, remat=True)
MODEL = G.GPT(CFG)
TOK = jax.random.randint(jax.random.key(0), (6, 8), 0, 32)
PARAMS = MODEL.init(jax.random.key(1), TOK)
LAYOUTS = lora_jax.trace(MODEL.apply, PARAMS, TOK)


def adapter(r, alpha, seed):
    """A LoRA tree with non-zero B (fresh random factors)."""
    lora = lora_jax.init(PARAMS, r=r, alpha=alpha, key=jax.random.key(seed), layouts=LAYOUTS)
    return jax.tree.map(lambda w: w.replace(b=0.2 * jax.random.normal(
        jax.random.key(seed + 100), w.b.shape)), lora, is_leaf=is_lowrank)


ADS = {"x": adapter(2, 4.0, 1), "y": adapter(4, 2.0, 2), "z": adapter(3, 6.0, 3)}
STACK = lora_jax.stack(ADS)
IDS = ["y", "x", "__base__", "z", "x", "y"]
F = lora_jax.apply(MODEL.apply)


APPLY = jax.jit(MODEL.apply)


def solo(name, tok, base=PARAMS):
    """Reference: the model on the merged weights of one adapter."""
    return APPLY(base if name == multi.BASE else lora_jax.merge(base, ADS[name]), tok)


def solo_rows(names, tok):
    """Row i of the model on the merged weights of adapter ``names[i]``."""
    full = {n: solo(n, tok) for n in set(names)}
    return jnp.stack([full[n][i] for i, n in enumerate(names)])


def test_routed_forward_matches_each_adapter_alone():
    ids = multi.adapter_ids(STACK, IDS)
    for routing in multi.ROUTINGS:
        y = jax.jit(lambda s, t, i, r=routing: F(PARAMS, s, t, adapter_ids=i, routing=r))(
            STACK, TOK, ids)
        np.testing.assert_allclose(y, solo_rows(IDS, TOK), atol=2e-5)
    assert lora_jax.report(MODEL.apply, PARAMS, ADS["x"], TOK).fallbacks == []


def test_grads_reach_each_adapter_from_its_own_rows_only():
    tgt = jax.random.normal(jax.random.key(5), (6, 8, 32))
    ids = multi.adapter_ids(STACK, IDS)
    g = jax.jit(jax.grad(lambda s: jnp.sum(F(PARAMS, s, TOK, adapter_ids=ids) * tgt)))(STACK)
    per = multi.unstack_untrimmed(g)  # slot gradients at the padded rank (4)

    @jax.jit  # reference: merged weights, rows of other adapters masked out of the loss
    def ref(lo, mask):
        return jax.grad(lambda lo: jnp.sum(MODEL.apply(lora_jax.merge(PARAMS, lo), TOK)
                                           * tgt * mask[:, None, None]))(lo)

    for name, lora in multi.unstack_untrimmed(STACK).items():
        mask = jnp.asarray([n == name for n in IDS], jnp.float32)
        # scale 1 (s folded into A) so that one compiled reference serves all adapters
        unit = jax.tree.map(lambda w: w.replace(a=w.a * w.scale, alpha=float(w.r)), lora,
                            is_leaf=is_lowrank)
        want = ref(unit, mask)
        for path, w in leaf_map(want).items():
            got, s = leaf_map(per[name])[path], leaf_map(lora)[path].scale
            np.testing.assert_allclose(got.a, s * w.a, atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(got.b, w.b, atol=1e-4, rtol=1e-4)
            r = leaf_map(ADS[name])[path].r
            assert not np.any(got.a[..., r:]) and not np.any(got.b[..., r:, :])  # padding
    assert all(not np.any(x.scales) for x in leaf_map(g).values())  # scales: not trained


def test_outer_vmap_and_padding_leave_outputs_unchanged():
    ids = multi.adapter_ids(STACK, IDS)
    tok2 = jnp.stack([TOK, TOK[::-1]])
    y = jax.jit(jax.vmap(lambda t: F(PARAMS, STACK, t, adapter_ids=ids)))(tok2)
    for j in range(2):
        np.testing.assert_allclose(y[j], solo_rows(IDS, tok2[j]), atol=2e-5)
    # (x and z are padded to rank 4 in STACK: the routed tests compare them with each alone)
    back = lora_jax.unstack(STACK)  # padding cut off again, exactly
    for n, lora in ADS.items():
        for (pa, wa), (pb, wb) in zip(jax.tree_util.tree_flatten_with_path(lora)[0],
                                      jax.tree_util.tree_flatten_with_path(back[n])[0]):
            assert pa == pb and np.array_equal(wa, wb)
        assert lora_jax.summary(back[n]).ranks == lora_jax.summary(lora).ranks


def test_qlora_base():
    q = lora_jax.quantize(PARAMS, "nf4", block_size=16, layouts=LAYOUTS)
    ids = multi.adapter_ids(STACK, IDS)
    y = jax.jit(lambda s: F(q, s, TOK, adapter_ids=ids))(STACK)
    dq = lora_jax.dequantize_tree(q)
    for i, n in enumerate(IDS):
        np.testing.assert_allclose(y[i], solo(n, TOK, base=dq)[i], atol=5e-5)


def per_example_loss(logits, tok):
    return jax.vmap(lambda lg, t: G.loss_fn(lg[None], t[None]))(logits, tok)


def test_k_adapters_trained_together_equal_each_trained_alone():
    """Same Adam, same data order; one learning rate per adapter in one optax transform."""
    lrs = {"x": 3e-2, "y": 1e-2}
    two = lora_jax.stack({n: ADS[n] for n in lrs})
    ids = jnp.array([0, 1, 1, 0, 1, 0])
    count = jnp.bincount(ids, length=2)[ids]
    tx = multi.adam(jnp.array(list(lrs.values())))
    batches = [jax.random.randint(jax.random.key(10 + s), (6, 8), 0, 32) for s in range(2)]

    @jax.jit
    def step(s, opt, tok):
        def loss(s):  # each adapter's mean over its own rows, summed
            return jnp.sum(per_example_loss(F(PARAMS, s, tok, adapter_ids=ids), tok) / count)
        g = jax.grad(loss)(s)
        upd, opt = tx.update(g, opt, s)
        return optax.apply_updates(s, upd), opt

    s, opt = two, tx.init(two)
    for tok in batches:
        s, opt = step(s, opt, tok)
    together = multi.unstack(s)
    for k, (name, lr) in enumerate(lrs.items()):
        lo, tx1 = ADS[name], optax.adam(lr)
        o1 = tx1.init(lo)

        @jax.jit
        def step1(lo, o1, rows, tx1=tx1):
            g = jax.grad(lambda l: jnp.mean(per_example_loss(F(PARAMS, l, rows), rows)))(lo)
            u, o1 = tx1.update(g, o1, lo)
            return optax.apply_updates(lo, u), o1

        for tok in batches:
            lo, o1 = step1(lo, o1, tok[np.asarray(ids) == k])
        got, want = leaf_map(together[name]), leaf_map(lo)
        assert list(got) == list(want)
        for path, w in want.items():
            assert got[path].scale == pytest.approx(w.scale)
            np.testing.assert_allclose(got[path].a, w.a, atol=2e-5, rtol=1e-4)
            np.testing.assert_allclose(got[path].b, w.b, atol=2e-5, rtol=1e-4)
        assert not np.allclose(want["params/head/kernel"].b, leaf_map(ADS[name])[
            "params/head/kernel"].b)  # it did train
    assert np.array_equal(jax.tree.leaves(s)[2], jax.tree.leaves(two)[2])  # scales untouched


def test_hot_swap_does_not_retrace():
    ids = multi.adapter_ids(STACK, IDS)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def fwd(s, tok):
        return F(PARAMS, s, tok, adapter_ids=ids)

    fwd(STACK, TOK)
    new = adapter(1, 7.0, 9)  # rank 1 < padded 4, another alpha
    swapped = multi.replace(STACK, "y", new)
    y = fwd(swapped, TOK)
    np.testing.assert_allclose(y[0], APPLY(lora_jax.merge(PARAMS, new), TOK)[0],
                               atol=2e-5)
    np.testing.assert_allclose(y[1], solo("x", TOK)[1], atol=2e-5)
    assert multi.names(multi.remove(multi.add(STACK, "w", new), "x")) == ("y", "z", "w")


def test_llama_generate_one_adapter_per_row_and_swap():
    from lora_jax.models import llama as L
    from lora_jax.multi.generate import _generator, generate

    cfg = L.LlamaConfig(vocab=48, d=32, layers=2, heads=4, kv_heads=2, ffn=64, max_len=32)
    model = L.Llama(cfg)
    v = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))

    def ad(r, seed):
        lo = lora_jax.init(v, r=r, alpha=2.0 * r, key=jax.random.key(seed))
        return jax.tree.map(lambda w: w.replace(b=0.5 * jax.random.normal(
            jax.random.key(seed), w.b.shape)), lo, is_leaf=is_lowrank)

    ads = {"a": ad(4, 1), "b": ad(2, 2)}
    s = lora_jax.stack(ads)
    tok = jax.random.randint(jax.random.key(3), (3, 4), 0, 48)
    ids = ["b", "__base__", "a"]
    out = generate(model, v, s, tok, 4, adapter_ids=ids)
    for i, n in enumerate(ids):
        vv = v if n == multi.BASE else lora_jax.merge(v, ads[n])
        assert np.array_equal(out[i], L.generate(model, vv, tok[i:i + 1], 4)[0])
    run = _generator(model, 4, 4, "gather")
    before = run._cache_size()
    s2 = multi.replace(s, "a", ad(3, 7))
    generate(model, v, s2, tok, 4, adapter_ids=ids)
    assert run._cache_size() == before  # the decode loop was not recompiled


def test_clear_errors():
    with pytest.raises(TypeError, match="stack of adapters; pass adapter_ids"):
        F(PARAMS, STACK, TOK)
    with pytest.raises(KeyError, match="no adapter 'q'"):
        multi.adapter_ids(STACK, ["q"])
    with pytest.raises(ValueError, match="cannot find the batch axis"):
        F(PARAMS, STACK, TOK, adapter_ids=jnp.zeros(5, jnp.int32))
    with pytest.raises(ValueError, match="has no batch axis"):  # raised while tracing
        jax.jit(lambda s: lora_jax.apply(lambda p, t: jnp.mean(MODEL.apply(p, t)))(
            PARAMS, s, TOK, adapter_ids=jnp.zeros(6, jnp.int32)))(STACK)
    with pytest.raises(ValueError, match="rank 6 above the stack's padded rank 4"):
        multi.replace(STACK, "x", adapter(6, 1.0, 4))
    # DoRA's magnitudes are not scale·A·B: refused, not silently dropped.
    dora = lora_jax.init(PARAMS, r=2, key=jax.random.key(9), layouts=LAYOUTS, dora=True)
    with pytest.raises(ValueError, match="'d' at .* is a DoRA leaf"):
        lora_jax.stack({"x": ADS["x"], "d": dora})
    with pytest.raises(ValueError, match="combine: adapter 'd' at .* is a DoRA leaf"):
        multi.combine({"x": ADS["x"], "d": dora}, [0.5, 0.5], "cat")


def test_trainable_mask_and_files(tmp_path):
    mask = lora_jax.trainable_mask(STACK)
    leaf = jax.tree.leaves(mask, is_leaf=is_lowrank)[0]
    assert leaf.a is True and leaf.scales is False
    heads = lora_jax.stack({n: {"params": {"head": a["params"]["head"]}} for n, a in ADS.items()})
    multi.save_peft(tmp_path / "peft", heads)  # (PEFT names scan-stacked kernels by a map)
    back = multi.load_peft(tmp_path / "peft", PARAMS, names=["x", "y", "z"])
    for n, lo in multi.unstack(back).items():
        np.testing.assert_allclose(leaf_map(lo)["params/head/kernel"].delta(),
                                   leaf_map(ADS[n])["params/head/kernel"].delta(), atol=1e-6)
    multi.save(tmp_path / "orbax", STACK)
    back2 = multi.load(tmp_path / "orbax")
    chex.assert_trees_all_equal(back2, STACK)
    assert multi.names(back2) == ("x", "y", "z")
