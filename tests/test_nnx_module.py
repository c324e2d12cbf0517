"""The NNX-native API: ``lora_jax.nnx.LoRA`` / ``AdaLoRA`` as ``nnx.Module``s (issue #14).

References: the functional API (``lora_jax.init`` + ``apply(nnx.functional(graphdef))`` + optax)
trained on an identical model with identical keys, and the plain NNX model with merged
weights. The model is a small NNX transformer with dropout, so that RNG threading shows.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import max_rel_err, randomize_np
from flax import nnx
from safetensors.numpy import load_file

import lora_jax
from lora_jax.nnx import AdaLoRA, FrozenParam, LoRA, LoraParam

VOCAB, D, SEQ = 11, 8, 4
_List = getattr(nnx, "List", list)
IDS = jax.random.randint(jax.random.key(3), (2, SEQ), 0, VOCAB)


class Block(nnx.Module):
    def __init__(self, rngs):
        self.ln = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=D, decode=False, rngs=rngs)
        self.up = nnx.Linear(D, 2 * D, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.down = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln(x))
        return x + self.down(self.drop(nnx.gelu(self.up(x))))


class TinyLM(nnx.Module):
    def __init__(self, rngs):
        self.tok = nnx.Embed(VOCAB, D, rngs=rngs)
        self.blocks = _List([Block(rngs)])
        self.head = nnx.Linear(D, VOCAB, rngs=rngs)

    def __call__(self, ids):
        x = self.tok(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class MLP(nnx.Module):
    """Fewer ops than TinyLM (so quicker to compile) for tests that need no attention."""

    def __init__(self, rngs):
        self.tok = nnx.Embed(VOCAB, D, rngs=rngs)
        self.up = nnx.Linear(D, 2 * D, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.head = nnx.Linear(2 * D, VOCAB, rngs=rngs)

    def __call__(self, ids):
        return self.head(self.drop(nnx.relu(self.up(self.tok(ids)))))


def make_mlp(train=True):
    model = MLP(nnx.Rngs(0, dropout=1))
    if not train:
        model.eval()
    return model


# One jitted call for every module: a module's structure is its cache key, so the plain
# models (merged, unmerged, the original) share one compilation and the LoRA modules another.
run = nnx.jit(lambda m, ids: m(ids))


def make(train=True):
    model = TinyLM(nnx.Rngs(0, dropout=1))
    if not train:
        model.eval()
    return model


def xent(logits, ids):
    return jnp.mean(jax.nn.logsumexp(logits, -1)
                    - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])


def nnx_step(lm, opt, ids):
    loss, grads = nnx.value_and_grad(lambda m: xent(m(ids), ids),
                                     argnums=nnx.DiffState(0, LoraParam))(lm)
    opt.update(lm, grads)
    return loss


def values(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def randomized(lm, seed=0):
    lm.set_adapters(randomize_np(lm.adapters(), seed))
    return lm


# ----------------------------------------------------------------------------------------
# Training: the same losses as the functional API; only the adapters change


def test_nnx_training_equals_the_functional_api_and_trains_only_adapters():
    tx = optax.adam(3e-2)
    # Functional: split, init with the key LoRA draws from nnx.Rngs(5), optax by hand.
    graphdef, params, rest = nnx.split(make(), nnx.Param, ...)
    lora = lora_jax.init(params, r=2, alpha=4, key=nnx.Rngs(5).params())
    fwd = lora_jax.apply(lora_jax.nnx.functional(graphdef))

    @jax.jit
    def step(lora, opt, rest):
        def loss_fn(lora):
            logits, new_rest = fwd(params, lora, rest, IDS)
            return xent(logits, IDS), new_rest
        (loss, rest), g = jax.value_and_grad(loss_fn, has_aux=True)(lora)
        upd, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, upd), opt, rest, loss

    opt_state, ref = tx.init(lora), []
    for _ in range(4):
        lora, opt_state, rest, loss = step(lora, opt_state, rest)
        ref.append(float(loss))

    lm = LoRA(make(), r=2, alpha=4, rngs=nnx.Rngs(5))
    base_before = values(lm.base())
    opt = nnx.Optimizer(lm, tx, wrt=LoraParam)
    jstep = nnx.jit(nnx_step)
    got = [float(jstep(lm, opt, IDS)) for _ in range(4)]

    np.testing.assert_allclose(got, ref, rtol=2e-5)
    assert len(set(got)) == 4 and got[-1] < got[0]
    assert max_rel_err(lm.adapters(), lora) < 1e-4
    # The base is untouched and no nnx.Param filter sees it; the RNG counts moved on.
    for a, b in zip(values(lm.base()), base_before):
        np.testing.assert_array_equal(a, b)
    assert {type(v) for v in jax.tree.leaves(nnx.state(lm, nnx.Param),
                                             is_leaf=lambda x: isinstance(x, nnx.Variable))} \
        == {LoraParam}
    counts = [int(c) for c in jax.tree.leaves(nnx.state(lm.model, nnx.RngCount))]
    assert counts == [int(c) for c in jax.tree.leaves(nnx.state(rest, nnx.RngCount))]
    # The optimizer state covers the adapters alone: Adam's two moments per adapter array.
    n_adapter = len(jax.tree.leaves(lm.adapters()))
    assert len(jax.tree.leaves(nnx.state(opt.opt_state))) == 2 * n_adapter + 1


# ----------------------------------------------------------------------------------------
# RNG state, merge and unmerge


def test_dropout_masks_differ_between_steps_and_match_the_merged_model():
    lm = randomized(LoRA(make_mlp(), r=2, rngs=nnx.Rngs(0)))
    fwd = run
    merged = lm.merge()                       # same RNG state: the same masks, call by call
    assert max_rel_err(fwd(lm, IDS), run(merged, IDS)) < 1e-5
    y2 = fwd(lm, IDS)
    assert max_rel_err(y2, run(merged, IDS)) < 1e-5
    assert max_rel_err(y2, run(lm.merge(), IDS)) > 1e-2  # ... and new masks on the next call
    lm.eval()
    np.testing.assert_array_equal(fwd(lm, IDS), fwd(lm, IDS))


def test_lora_dropout_draws_from_the_module_rngs():
    lm = randomized(LoRA(make_mlp(train=False), r=2, dropout=0.5, rngs=nnx.Rngs(0)))
    fwd = run
    y1, y2 = fwd(lm, IDS), fwd(lm, IDS)
    assert max_rel_err(y1, y2) > 1e-3
    lm.eval()
    ref = run(lm.merge(), IDS)  # no dropout: the merged model
    assert max_rel_err(fwd(lm, IDS), ref) < 1e-5


def test_merge_and_unmerge():
    model = make(train=False)
    lm = randomized(LoRA(model, r=2, rngs=nnx.Rngs(0)))
    merged = lm.merge()
    assert all(type(v) is nnx.Param for v in jax.tree.leaves(
        nnx.state(merged), is_leaf=lambda x: isinstance(x, nnx.Variable))
        if not isinstance(v, (nnx.RngCount, nnx.RngKey)))
    assert max_rel_err(run(merged, IDS), run(lm, IDS)) < 1e-5
    moved = nnx.state(merged, nnx.Param)["blocks"][0]["attn"]["value"]["kernel"].get_value()
    orig = nnx.state(model, nnx.Param)["blocks"][0]["attn"]["value"]["kernel"].get_value()
    assert max_rel_err(moved, orig) > 1e-2   # the value projection is adapted and merged
    back = lm.unmerge(merged)
    assert max_rel_err(nnx.state(back, nnx.Param), nnx.state(model, nnx.Param)) < 1e-5
    assert max_rel_err(run(back, IDS), run(model, IDS)) < 1e-5


def test_head_adapted_by_default_and_excluded_on_request():
    paths = set(lora_jax.lora.leaves(LoRA(make(), r=2, rngs=nnx.Rngs(0)).adapters()))
    assert {"head/kernel", "blocks/0/attn/value/kernel", "blocks/0/up/kernel"} <= paths
    assert "tok/embedding" not in paths
    no_head = LoRA(make(), r=2, exclude=r"head/kernel", rngs=nnx.Rngs(0)).adapters()
    assert set(lora_jax.lora.leaves(no_head)) == paths - {"head/kernel"}


def test_modules_to_save_train_in_full_beside_the_adapters():
    lm = randomized(LoRA(make_mlp(train=False), r=2, exclude=r"head/kernel",
                         modules_to_save=r"head/.*", rngs=nnx.Rngs(0)))
    grads = nnx.jit(nnx.grad(lambda m: xent(m(IDS), IDS)))(lm)  # wrt=nnx.Param
    by_type = {}
    for kp, v in jax.tree_util.tree_flatten_with_path(
            grads, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        by_type.setdefault(type(v), []).append(lora_jax.paths.path_str(kp))
    assert sorted(by_type[nnx.Param]) == ["model/head/bias", "model/head/kernel"]
    assert set(by_type) == {nnx.Param, LoraParam}
    # Reference: the plain merged model's own gradient for the head.
    ref = nnx.grad(lambda m: xent(m(IDS), IDS))(lm.merge())
    assert max_rel_err(grads["model"]["head"], ref["head"]) < 1e-5
    with pytest.raises(ValueError, match=r"modules_to_save \['nope'\] matches no parameter"):
        LoRA(make_mlp(), r=2, modules_to_save="nope", rngs=nnx.Rngs(0))


def test_traced_layouts_and_another_method():
    model = make_mlp(train=False)
    lm = randomized(LoRA(model, r=2, layouts=lora_jax.nnx.trace(model, IDS), rngs=nnx.Rngs(0)))
    assert set(lora_jax.lora.leaves(lm.adapters())) == {"up/kernel", "head/kernel"}
    hidden = lambda m, ids: m.up(m.tok(ids))
    got = nnx.jit(lambda lm: lm.call(hidden, IDS))(lm)
    assert max_rel_err(got, hidden(lm.merge(), IDS)) < 1e-5


# ----------------------------------------------------------------------------------------
# The ordinary LoRA tree: summary, report, checkpoints, PEFT


def test_adapters_work_with_summary_report_checkpoints_and_peft(tmp_path):
    lm = randomized(LoRA(make(train=False), r=2, rngs=nnx.Rngs(0)))
    assert "LoRA" in str(lm.summary()) and lm.summary() == lora_jax.summary(lm.adapters(),
                                                                          lm.base())
    rep = lm.report(IDS)
    assert rep.fallbacks == [] and rep.unused == []
    assert rep["blocks/0/attn/value/kernel"].routes == ["fast"]

    lora_jax.checkpoint.save_adapter(tmp_path / "ckpt", lm.adapters())
    fresh = LoRA(make(train=False), r=2, rngs=nnx.Rngs(9))
    fresh.set_adapters(lora_jax.checkpoint.load_adapter(tmp_path / "ckpt"))
    np.testing.assert_array_equal(run(fresh, IDS), run(lm, IDS))

    lora_jax.peft.save(tmp_path / "peft", lm.adapters())
    keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert any(".blocks.0.attn.value.lora_A." in k for k in keys), sorted(keys)
    assert max_rel_err(lora_jax.peft.load(tmp_path / "peft", lm.base()), lm.adapters()) < 1e-6


# ----------------------------------------------------------------------------------------
# QLoRA and AdaLoRA


def test_qlora_module_trains_on_a_quantized_base():
    lm = LoRA(make_mlp(), r=2, alpha=4, quantize="nf4", block_size=16, rngs=nnx.Rngs(5))
    flat = dict(lora_jax.paths.flatten(lm.base()))
    assert lora_jax.is_quantized(flat["head/kernel"])
    assert lora_jax.is_quantized(flat["up/kernel"])
    base_before = values(lm.base())
    # NNX's defaults (wrt=nnx.Param) see the adapters only: the base is no nnx.Param.
    opt = nnx.Optimizer(lm, optax.adamw(3e-2, weight_decay=0.1), wrt=nnx.Param)

    @nnx.jit
    def step(lm, opt):
        loss, grads = nnx.value_and_grad(lambda m: xent(m(IDS), IDS))(lm)
        assert {type(v) for v in jax.tree.leaves(grads, is_leaf=lambda x: isinstance(
            x, nnx.Variable))} == {LoraParam}
        opt.update(lm, grads)
        return loss

    losses = [float(step(lm, opt)) for _ in range(4)]
    assert losses[-1] < losses[0]
    for a, b in zip(values(lm.base()), base_before):  # weight decay did not reach the base
        np.testing.assert_array_equal(a, b)
    # Reference: the dequantized base merged with the trained adapters, as a plain model.
    merged = lm.merge()
    dense = lora_jax.merge(lora_jax.dequantize_tree(lm.base()), lm.adapters())
    assert max_rel_err(nnx.state(merged, nnx.Param), dense) < 1e-6


def test_adalora_module_matches_the_functional_allocator():
    alloc = lora_jax.adalora.Allocator(total_steps=6, tinit=1, tfinal=2, delta_t=1)
    tx = optax.adam(3e-2)
    model = make_mlp(train=False)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    lora = lora_jax.adalora.init(params, 3, 1, key=nnx.Rngs(5).params())
    fwd = lora_jax.apply(lora_jax.nnx.functional(graphdef))

    def loss_fn(l):
        return xent(fwd(params, l, rest, IDS)[0], IDS) + 0.1 * lora_jax.adalora.orth_reg(l)

    @jax.jit
    def step(lora, opt, state, i):
        loss, g = jax.value_and_grad(loss_fn)(lora)
        upd, opt = tx.update(g, opt, lora)
        lora, state = alloc.update(optax.apply_updates(lora, upd), state, g, i)
        return lora, opt, state, loss

    opt_state, state, ref = tx.init(lora), alloc.init(lora), []
    for i in range(6):
        lora, opt_state, state, loss = step(lora, opt_state, state, i)
        ref.append(float(loss))

    lm = AdaLoRA(make_mlp(train=False), 3, 1, allocator=alloc, rngs=nnx.Rngs(5))
    opt = nnx.Optimizer(lm, tx, wrt=LoraParam)

    @nnx.jit
    def nstep(lm, opt):
        loss, g = nnx.value_and_grad(lambda m: xent(m(IDS), IDS) + 0.1 * m.orth_reg())(lm)
        opt.update(lm, g)
        lm.update(g)
        return loss

    got = [float(nstep(lm, opt)) for _ in range(6)]
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    assert int(lm.step.get_value()) == 6
    final, ranks = lm.finalize()
    ref_final, ref_ranks = lora_jax.adalora.finalize(lora, state)
    assert ranks == ref_ranks and sum(ranks.values()) == len(ranks)  # target_r=1 each
    assert max_rel_err(final, ref_final) < 1e-4
    # Resuming: a fresh module given the adapters and the allocator state is the same one.
    again = AdaLoRA(make_mlp(train=False), 3, 1, allocator=alloc, rngs=nnx.Rngs(0))
    again.set_adapters(lm.adapters())
    again.set_allocator_state(lm.allocator_state(), step=lm.step.get_value())
    assert again.finalize()[1] == ranks and int(again.step.get_value()) == 6
    with pytest.raises(ValueError, match=r"set_allocator_state: the state does not fit"):
        again.set_allocator_state(lm.allocator_state()._replace(mask={}))


# ----------------------------------------------------------------------------------------
# Bad inputs, and the lazy import


def test_bad_inputs_get_clear_errors():
    import flax.linen as nn

    with pytest.raises(TypeError, match=r"LoRA: model must be an nnx.Module.*lora_jax.init"):
        LoRA(nn.Dense(3), rngs=nnx.Rngs(0))
    lm = LoRA(make(), r=2, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"LoRA already"):
        LoRA(lm, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"rngs must be an nnx.Rngs"):
        LoRA(make(), rngs=0)
    with pytest.raises(ValueError, match=r"nothing|matches no"):
        LoRA(make(), targets=r".*nope.*", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"allocator must be a lora_jax.adalora.Allocator"):
        AdaLoRA(make(), 2, 1, allocator={"total_steps": 5}, rngs=nnx.Rngs(0))
    other = lora_jax.init(nnx.state(make(), nnx.Param), r=1, key=jax.random.key(0))
    before = values(lm.adapters())
    with pytest.raises(ValueError, match=r"adapter at 'blocks/0/.*kernel' .* of rank 1 .*"
                                         r"expected .* of rank 2"):
        lm.set_adapters(other)              # rank 1 where the module has rank 2
    partial = {"head": lm.adapters()["head"]}
    with pytest.raises(ValueError, match=r"no adapter at 'blocks/0/"):
        lm.set_adapters(partial)
    for a, b in zip(values(lm.adapters()), before):  # nothing written on an error
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match=r"unmerge: expected the plain nnx.Module"):
        lm.unmerge(nnx.state(make()))
    ada = AdaLoRA(make(), 2, 1, allocator=lora_jax.adalora.Allocator(total_steps=5),
                  rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"grads must be the nnx.State"):
        ada.update({"x": jnp.ones(2)})
    assert isinstance(FrozenParam(jnp.ones(2)), nnx.Variable)


def test_import_lora_jax_does_not_import_flax_nnx():
    code = ("import sys, lora_jax; assert 'flax.nnx' not in sys.modules; "
            "lora_jax.nnx.LoRA; assert 'flax.nnx' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
