"""Flax NNX models: parameter paths that keep a module attribute called ``value`` (issue #14).

The model is a small NNX transformer: token and position embeddings, ``nnx.MultiHeadAttention``
(whose value projection is the attribute ``value``), an MLP with ``nnx.Dropout``, LayerNorm.
"""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from safetensors.numpy import load_file

import lora_jax
from conftest import max_rel_err, randomize
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
