"""Training with optax: only adapters (and chosen base leaves) change, and the loss falls."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import randomize

import lora_jax
from lora_jax.models.gpt import GPT, GPTConfig, loss_fn

CFG = GPTConfig(vocab=32, d=32, heads=4, layers=2, mlp=64, seq=16)


def _data():
    # A deterministic "language": token t+1 = (3 * token t + 1) mod 32, random starts.
    starts = jax.random.randint(jax.random.key(11), (16,), 0, 32)
    seq = [starts]
    for _ in range(CFG.seq - 1):
        seq.append((3 * seq[-1] + 1) % 32)
    return jnp.stack(seq, axis=1)


def test_lora_training_reduces_loss_and_leaves_base_untouched():
    model = GPT(CFG)
    tok = _data()
    params = model.init(jax.random.key(0), tok)
    lora = lora_jax.init(params, r=4, alpha=8, key=jax.random.key(1))
    f = lora_jax.apply(model.apply)
    np.testing.assert_array_equal(f(params, lora, tok), model.apply(params, tok))  # B = 0
    tx = optax.adam(3e-3)
    opt = tx.init(lora)

    @jax.jit
    def step(lora, opt):
        loss, g = jax.value_and_grad(lambda l: loss_fn(f(params, l, tok), tok))(lora)
        upd, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, upd), opt, loss

    losses = []
    for _ in range(200):
        lora, opt, loss = step(lora, opt)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    # The trained adapter, merged, reproduces the adapted model.
    merged = lora_jax.merge(params, lora)
    np.testing.assert_allclose(model.apply(merged, tok), f(params, lora, tok), rtol=1e-4,
                               atol=1e-4)


def test_optimizer_on_combined_tree_trains_lora_and_modules_to_save_only():
    model = GPT(CFG)
    tok = _data()
    params = model.init(jax.random.key(0), tok)
    lora = randomize(lora_jax.init(params, r=2, exclude=".*head.*", key=jax.random.key(1)),
                     jax.random.key(2))
    tree = {"base": params, "lora": lora}
    kw = dict(modules_to_save=[r"params/head"], bias="lora_only")
    with pytest.raises(ValueError, match="'params/head/kernel' is both a LoRA target"):
        lora_jax.optimizer(optax.sgd(0.1), {"base": params, "lora": lora_jax.init(
            params, r=2, key=jax.random.key(1))}, **kw)
    tx = lora_jax.optimizer(optax.sgd(0.1), tree, **kw)
    f = lora_jax.apply(model.apply, **kw)
    g = jax.jit(jax.grad(lambda t: loss_fn(f(t["base"], t["lora"], tok), tok)))(tree)
    upd, _ = jax.jit(tx.update)(g, tx.init(tree), tree)
    new = optax.apply_updates(tree, upd)
    old_flat = dict(lora_jax.paths.flatten(tree, is_leaf=lambda x: False))
    new_flat = dict(lora_jax.paths.flatten(new, is_leaf=lambda x: False))
    changed = {p for p in new_flat if not np.array_equal(new_flat[p], old_flat[p])}
    base_changed = {p for p in changed if p.startswith("base/")}
    assert base_changed == {"base/params/head/kernel", "base/params/head/bias"} | {
        f"base/params/block_{i}/{m}/bias" for i in range(2)
        for m in ("q", "k", "v", "o", "up", "down")}
    assert len([p for p in changed if p.startswith("lora/")]) == 2 * 6 * 2  # a, b each
    # Frozen base leaves got an exactly-zero gradient (stopped inside apply).
    assert not np.any(g["base"]["params"]["embed"]["embedding"])
    assert np.any(g["base"]["params"]["head"]["kernel"])


def test_trainable_mask_split_and_combine_round_trip():
    params = {"d": {"kernel": jnp.ones((4, 3)), "bias": jnp.arange(3.0)}}
    tree = {"base": params, "lora": lora_jax.init(params, r=2, key=jax.random.key(0))}
    mask = lora_jax.trainable_mask(tree)
    assert jax.tree.leaves(mask) == [False, False, True, True]
    train, frozen = jax.jit(lora_jax.split)(tree)
    assert train["base"]["d"]["kernel"] is None and frozen["lora"]["d"]["kernel"].a is None
    back = jax.jit(lora_jax.combine)(train, frozen)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        np.testing.assert_array_equal(a, b)
    t2, f2 = lora_jax.split(params, lambda path, x: path.endswith("bias"))
    assert t2["d"]["kernel"] is None and f2["d"]["bias"] is None


def test_public_functions_under_jit():
    model = GPT(CFG)
    tok = _data()
    params = model.init(jax.random.key(0), tok)
    lora = randomize(lora_jax.init(params, r=2, key=jax.random.key(1)), jax.random.key(2))
    merged = jax.jit(lora_jax.merge)(params, lora)
    back = jax.jit(lora_jax.unmerge)(merged, lora)
    k = params["params"]["block_0"]["q"]["kernel"]
    np.testing.assert_allclose(back["params"]["block_0"]["q"]["kernel"], k, atol=1e-6)
    out = jax.jit(lora_jax.apply(model.apply))(params, lora, tok)
    np.testing.assert_allclose(out, model.apply(merged, tok), rtol=1e-5, atol=1e-5)
    init_jit = jax.jit(lambda p, k: lora_jax.init(p, r=2, key=k))
    l2 = init_jit(params, jax.random.key(1))
    a1 = lora_jax.init(params, r=2, key=jax.random.key(1))["params"]["head"]["kernel"].a
    np.testing.assert_array_equal(l2["params"]["head"]["kernel"].a, a1)
