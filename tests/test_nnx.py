"""Flax NNX models: RNG state threaded through ``apply`` (fresh dropout masks every step), and
parameter paths that keep a module attribute called ``value`` (issue #14).

The model is a small NNX transformer: token and position embeddings, ``nnx.MultiHeadAttention``
(whose value projection is the attribute ``value``), an MLP with ``nnx.Dropout``, LayerNorm.
References: the stateful NNX model itself with merged weights, called step after step.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_err, randomize
from flax import nnx
from safetensors.numpy import load_file

import lora_jax
from lora_jax import paths as P

VOCAB, D, SEQ = 17, 16, 6
_List = getattr(nnx, "List", list)


class Block(nnx.Module):
    def __init__(self, rngs):
        self.ln1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=D, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(D, rngs=rngs)
        self.up = nnx.Linear(D, 2 * D, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.down = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.down(self.drop(nnx.gelu(self.up(self.ln2(x)))))


class TinyLM(nnx.Module):
    def __init__(self, rngs):
        self.tok = nnx.Embed(VOCAB, D, rngs=rngs)
        self.pos = nnx.Embed(SEQ, D, rngs=rngs)
        self.blocks = _List([Block(rngs) for _ in range(2)])
        self.ln_f = nnx.LayerNorm(D, rngs=rngs)
        self.head = nnx.Linear(D, VOCAB, rngs=rngs)

    def __call__(self, ids):
        x = self.tok(ids) + self.pos(jnp.arange(ids.shape[-1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


IDS = jax.random.randint(jax.random.key(3), (3, SEQ), 0, VOCAB)


def make(train=True):
    model = TinyLM(nnx.Rngs(0, dropout=1))
    if not train:
        model.eval()
    return model


def adapters(params):
    return randomize(lora_jax.init(params, r=2, alpha=4, key=jax.random.key(1)),
                     jax.random.key(2), 0.3)


# ----------------------------------------------------------------------------------------
# RNG state: fresh dropout masks on every step


def test_functional_form_draws_new_dropout_masks_every_step():
    model = make()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    lora = adapters(params)
    fwd = jax.jit(lora_jax.apply(lora_jax.nnx.functional(graphdef)))

    y1, rest1 = fwd(params, lora, rest, IDS)
    y2, rest2 = fwd(params, lora, rest1, IDS)
    assert max_rel_err(y1, y2) > 1e-2, "the same dropout masks on two steps"
    y1_again, _ = fwd(params, lora, rest, IDS)
    np.testing.assert_array_equal(y1, y1_again)  # the state alone decides the masks

    # Reference: the stateful NNX model with merged weights, called twice.
    nnx.update(model, lora_jax.merge(params, lora))
    assert max_rel_err(y1, model(IDS)) < 1e-5
    assert max_rel_err(y2, model(IDS)) < 1e-5
    counts = lambda s: [int(c) for c in jax.tree.leaves(nnx.state(s, nnx.RngCount))]  # noqa: E731
    assert counts(rest2) == counts(nnx.state(model, nnx.RngCount))


def test_training_steps_see_new_dropout_masks():
    graphdef, params, rest = nnx.split(make(), nnx.Param, ...)
    lora = adapters(params)
    fwd = lora_jax.apply(lora_jax.nnx.functional(graphdef))

    def loss_fn(lora, rest, ids):
        logits, rest = fwd(params, lora, rest, ids)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), (rest, logits)

    @jax.jit
    def step(lora, rest, ids):
        (_, (rest, logits)), g = jax.value_and_grad(loss_fn, has_aux=True)(lora, rest, ids)
        return jax.tree.map(lambda p, d: p - 0.0 * d, lora, g), rest, logits

    _, rest, logits1 = step(lora, rest, IDS)
    _, rest, logits2 = step(lora, rest, IDS)  # same adapters (lr 0): only the masks differ
    assert max_rel_err(logits1, logits2) > 1e-2


def test_a_dropped_rng_update_warns_once():
    graphdef, state = nnx.split(make())
    lora = adapters(state)
    f = lora_jax.apply(lambda s, x: nnx.merge(graphdef, s)(x))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jax.jit(f)(state, lora, IDS)
        f(state, lora, IDS)
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(msgs) == 1, msgs
    assert "blocks/0/drop/rngs/count" in msgs[0] and "lora_jax.nnx.functional" in msgs[0]

    # The same mistake with the RNG state passed as an argument.
    graphdef, params, rest = nnx.split(make(), nnx.Param, ...)
    g = lora_jax.apply(lambda p, r, x: nnx.merge(graphdef, p, r)(x))
    with pytest.warns(UserWarning, match=r"args/0/blocks/0/drop/rngs/count"):
        g(params, adapters(params), rest, IDS)


def test_no_warning_when_the_rng_state_is_returned_or_unused():
    graphdef, params, rest = nnx.split(make(), nnx.Param, ...)
    lora = adapters(params)
    eval_def, eval_state = nnx.split(make(train=False))
    linen = nn.Dense(4)
    lparams = linen.init(jax.random.key(0), jnp.ones((2, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.jit(lora_jax.apply(lora_jax.nnx.functional(graphdef)))(params, lora, rest, IDS)
        # Eval mode: dropout reads no RNG count, so the old form is correct there.
        lora_jax.apply(lambda s, x: nnx.merge(eval_def, s)(x))(eval_state, adapters(eval_state),
                                                                IDS)
        lora_jax.apply(linen.apply)(lparams, adapters(lparams), jnp.ones((2, 3)))


def test_functional_calls_the_chosen_method():
    graphdef, params, rest = nnx.split(make(train=False), nnx.Param, ...)
    y, _ = lora_jax.nnx.functional(graphdef)(params, rest, IDS)
    by_name, _ = lora_jax.nnx.functional(graphdef, "__call__")(params, rest, IDS)
    embed, _ = lora_jax.nnx.functional(graphdef, lambda m, ids: m.tok(ids))(params, rest, IDS)
    np.testing.assert_array_equal(y, by_name)
    np.testing.assert_array_equal(embed, params["tok"]["embedding"][...][IDS])


# ----------------------------------------------------------------------------------------
# Paths: only the Variable wrapper disappears


@pytest.mark.parametrize("view", ["state", "params", "module", "pure_dict"])
def test_value_projection_keeps_its_name(view):
    model = make()
    tree = {"state": lambda: nnx.state(model), "params": lambda: nnx.state(model, nnx.Param),
            "module": lambda: model,
            "pure_dict": lambda: nnx.to_pure_dict(nnx.state(model))}[view]()
    paths = [p for p, _ in P.flatten(tree)]
    for i in range(2):
        for proj in ("query", "key", "value", "out"):
            assert f"blocks/{i}/attn/{proj}/kernel" in paths
        assert f"blocks/{i}/attn/kernel" not in paths
    targets = sorted(lora_jax.lora.leaves(lora_jax.init(tree, r=2, key=jax.random.key(0))))
    assert "blocks/1/attn/value/kernel" in targets and "blocks/1/attn/kernel" not in targets


def test_path_str_drops_only_the_variable_key():
    K, A = jax.tree_util.DictKey, jax.tree_util.GetAttrKey
    assert P.path_str((A("attn"), A("value"), A("kernel"), A("value"))) == "attn/value/kernel"
    assert P.path_str((A("value"), A("value"))) == "value"  # an attribute `value` = Param(...)
    assert P.path_str((K("attn"), K("value"), K("kernel"))) == "attn/value/kernel"
    assert P.path_str((A("value"), K("w"))) == "value/w"  # a dataclass field holding a dict

    class Holder(nnx.Module):
        def __init__(self):
            self.value = nnx.Param(jnp.ones((3, 2)))
            self.other = nnx.Param(jnp.ones(2))

    for tree in (Holder(), nnx.state(Holder())):
        assert [p for p, _ in P.flatten(tree)] == ["other", "value"]


def test_quantized_nnx_state_paths():
    params = nnx.state(make(), nnx.Param)
    q = lora_jax.quantize(params, "nf4", block_size=16)
    flat = dict(P.flatten(q))
    assert lora_jax.is_quantized(flat["blocks/0/attn/value/kernel"])
    # Into the quantized array: the Variable key goes, the array's own fields stay.
    deep = [P.path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(q)[0]]
    assert "blocks/0/attn/value/kernel/codes" in deep


def test_peft_export_names_the_value_projection(tmp_path):
    model = make()
    lora = lora_jax.init(model, r=2, key=jax.random.key(0))
    names = lora_jax.peft.module_names(model)
    assert names["blocks/0/attn/value/kernel"] == ["blocks.0.attn.value"]
    lora_jax.peft.save(tmp_path, lora)
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert any(".blocks.0.attn.value.lora_A." in k for k in keys), sorted(keys)
    assert not any(".blocks.0.attn.lora_A." in k for k in keys), sorted(keys)


def test_adapter_from_nnx_state_fits_the_module():
    model = make(train=False)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    lora = adapters(nnx.state(model))
    assert set(lora_jax.lora.check_fits(model, lora)) == set(lora_jax.lora.leaves(lora))
    out = jax.jit(lora_jax.apply(lambda m, ids: m(ids)))(model, lora, IDS)
    ref = nnx.merge(graphdef, lora_jax.merge(params, lora), rest)(IDS)  # eval: no RNG use
    assert max_rel_err(out, ref) < 1e-5


def test_check_fits_error_shows_the_closest_base_paths():
    # A base named the old way (the `value` projection's name lost), a LoRA tree named right.
    w = jnp.ones((4, 4))
    block = {"attn": {"kernel": w, "key": {"kernel": w}, "out": {"kernel": w},
                      "query": {"kernel": w}}}
    base = {"blocks": {"0": block, "1": block}}
    lora = lora_jax.lora.from_leaves(
        {"blocks/1/attn/value/kernel": lora_jax.LoraWeight(a=jnp.ones((4, 1)), b=jnp.ones((1, 4)))})
    with pytest.raises(ValueError, match=r"blocks/1/attn/value/kernel.*'blocks/1/attn/kernel'"):
        lora_jax.lora.check_fits(base, lora)
