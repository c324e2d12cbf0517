"""The models of tests/styles/ are what their docstrings say, and run: shapes, gradients, decode.

These checks need nothing beyond today's API: they hold the test models themselves to account
(a KV-cache decode equals the full forward pass, the RG-LRU scan equals its loop, a
block-diagonal einsum equals the dense block-diagonal matmul), and check that ``lora_jax.apply``
with name targets gives the merged model's values on each (through fallbacks where the layout
is not yet understood). tests/test_any_model.py checks layouts learned from use.
"""

import functools
import importlib.util
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_err, randomize_np
from styles import gemma_style, griffin_style, mlp_style, nnx_style, scan_style

import lora_jax

GQA = gemma_style.TransformerConfig()
QKV = gemma_style.TransformerConfig(num_kv_heads=4, fused_qkv=True, transpose_gating_einsum=False)

MAKERS = {
    "gemma_gqa": lambda k: gemma_style.make(k, GQA),
    "gemma_qkv": lambda k: gemma_style.make(k, QKV),
    "griffin": griffin_style.make,
    "scan": scan_style.make,
    "nnx": nnx_style.make,
    "mlp": mlp_style.make,
}


@functools.cache
def built(style):
    # An RBG key: threefry's compile would dominate initialising these small models.
    return MAKERS[style](jax.random.key(0, impl="unsafe_rbg"))


def flat(tree):
    """{path: leaf} with '/'-joined keys (NNX ``.value`` dropped), written independently."""
    tu = jax.tree_util

    def name(k):
        if isinstance(k, tu.GetAttrKey):
            return None if k.name == "value" else k.name
        return str(k.key if isinstance(k, (tu.DictKey, tu.FlattenedIndexKey)) else k.idx)

    pairs, _ = tu.tree_flatten_with_path(tree)
    return {"/".join(n for n in map(name, p) if n is not None): x for p, x in pairs}


def _gemma_shapes(cfg):
    n, k, d, h, f = cfg.num_heads, cfg.num_kv_heads, cfg.embed_dim, cfg.head_dim, cfg.hidden_dim
    out = {"params/embedder/input_embedding": (cfg.num_embed, d)}
    for i in range(cfg.num_layers):
        pre = f"params/layer_{i}"
        if cfg.fused_qkv:
            out[f"{pre}/attn/qkv_einsum/w"] = (3, n, d, h)
        else:
            out[f"{pre}/attn/q_einsum/w"] = (n, d, h)
            out[f"{pre}/attn/kv_einsum/w"] = (2, k, d, h)
        out[f"{pre}/attn/attn_vec_einsum/w"] = (n, h, d)
        out[f"{pre}/mlp/gating_einsum/w"] = (2, f, d) if cfg.transpose_gating_einsum else (2, d, f)
        out[f"{pre}/mlp/linear/w"] = (f, d)
    return out


def _griffin_shapes():
    out = {"params/embedder/input_embedding": (64, 32)}
    for i in range(2):
        pre = f"params/blocks.{i}"
        out |= {
            f"{pre}/recurrent_block/linear_x/kernel": (32, 32),
            f"{pre}/recurrent_block/linear_y/kernel": (32, 32),
            f"{pre}/recurrent_block/linear_out/kernel": (32, 32),
            f"{pre}/recurrent_block/rg_lru/input_gate/w": (4, 8, 8),
            f"{pre}/recurrent_block/rg_lru/a_gate/w": (4, 8, 8),
            f"{pre}/recurrent_block/conv_1d/w": (4, 32),
            f"{pre}/mlp_block/ffw_up/w": (2, 32, 64),
            f"{pre}/mlp_block/ffw_up/b": (2, 1, 1, 64),
            f"{pre}/mlp_block/ffw_down/kernel": (64, 32),
        }
    return out


SHAPES = {
    "gemma_gqa": _gemma_shapes(GQA),
    "gemma_qkv": _gemma_shapes(QKV),
    "griffin": _griffin_shapes(),
    "scan": {
        "params/decoder/layers/self_attention/qkv/kernel": (2, 32, 96),
        "params/decoder/layers/self_attention/out/kernel": (2, 32, 32),
        "params/decoder/layers/mlp/wi/kernel": (2, 32, 64),
        "params/decoder/layers/mlp/wo/kernel": (2, 64, 32),
        "params/decoder/logits_dense/kernel": (32, 64),
        "params/decoder/token_embedder/embedding": (64, 32),
    },
    "nnx": {
        **{f"blocks/{i}/attn/{n}/kernel": (32, 4, 8) for i in range(2)
           for n in ("query", "key", "value")},
        **{f"blocks/{i}/attn/out/kernel": (4, 8, 32) for i in range(2)},
        **{f"blocks/{i}/up/kernel": (32, 64) for i in range(2)},
        **{f"blocks/{i}/down/kernel": (64, 32) for i in range(2)},
        "head/kernel": (32, 64),
        "tok/embedding": (64, 32),
        "pos/embedding": (16, 32),
    },
    "mlp": {"params/Dense_0/kernel": (12, 32), "params/Dense_1/kernel": (32, 32),
            "params/Dense_2/kernel": (32, 5)},
}

# Today's name targets: the matmul weights of each model (no embeddings, no conv taps).
NAME_TARGETS = {
    "gemma_gqa": r".*_einsum/w|.*/linear/w",
    "gemma_qkv": r".*_einsum/w|.*/linear/w",
    "griffin": r".*/kernel|.*(gate|ffw_up)/w",
    "scan": r".*/kernel",
    "nnx": r".*/kernel",
    "mlp": r".*/kernel",
}


@pytest.mark.parametrize("style", list(MAKERS))
def test_weights_have_the_documented_shapes_and_sizes(style):
    _, params, _ = built(style)
    shapes = {p: tuple(x.shape) for p, x in flat(params).items()}
    want = SHAPES[style]
    assert {p: shapes.get(p) for p in want} == want
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    n = sum(math.prod(s) for s in shapes.values())
    assert 1_000 <= n <= 100_000, n


@pytest.mark.parametrize("style", list(MAKERS))
def test_forward_and_gradients_are_finite(style):
    fn, params, args = built(style)
    out = jax.jit(fn)(params, *args)
    assert out.shape[:2] == args[0].shape[:2] and bool(jnp.isfinite(out).all())
    proj = jax.random.normal(jax.random.key(3), out.shape)
    g = jax.jit(jax.grad(lambda p: jnp.sum(fn(p, *args) * proj)))(params)
    gflat = flat(g)
    assert all(bool(jnp.isfinite(x).all()) for x in gflat.values())
    # Every documented matmul weight takes part: its gradient is not zero.
    assert all(float(jnp.abs(gflat[p]).max()) > 0 for p in SHAPES[style]), style


@pytest.mark.parametrize("cfg", [GQA, QKV], ids=["gqa", "fused_qkv"])
def test_gemma_kv_cache_decode_equals_the_full_forward_pass(cfg):
    fn, params, (tokens,) = built("gemma_gqa" if cfg is GQA else "gemma_qkv")
    model = gemma_style.Transformer(cfg)
    full = jax.jit(fn)(params, tokens)
    prompt, rest = tokens[:, :5], tokens[:, 5:]
    toks, logits = gemma_style.decode(model.apply, params, prompt, 3, config=cfg, forced=rest)
    np.testing.assert_array_equal(toks, rest)
    np.testing.assert_allclose(logits, full[:, 4:7], rtol=1e-5, atol=1e-5)
    # Greedy: the first token is the full pass's argmax; a cache longer than needed is fine.
    greedy, _ = gemma_style.decode(model.apply, params, prompt, 1, config=cfg, cache_size=16)
    np.testing.assert_array_equal(greedy[:, 0], jnp.argmax(full[:, 4], -1))


def test_griffin_scan_equals_the_recurrence_loop():
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (2, 7, 5))
    a = jax.random.uniform(k[1], (2, 7, 5))
    h0 = jax.random.normal(k[2], (2, 5))
    reset = jnp.zeros((2, 7), bool).at[:, 3].set(True)
    y, last = griffin_style.rnn_scan(x, a, reset, h0)
    h, ys = np.asarray(h0), []
    for t in range(7):
        h = np.where(np.asarray(reset[:, t])[:, None], 0.0, np.asarray(a[:, t]) * h)
        h = h + np.asarray(x[:, t])
        ys.append(h)
    np.testing.assert_allclose(y, np.stack(ys, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(last, ys[-1], rtol=1e-5, atol=1e-6)


def test_griffin_gate_is_a_block_diagonal_matmul():
    mod = griffin_style.BlockDiagonalLinear(width=32, num_blocks=4)
    x = jax.random.normal(jax.random.key(1), (2, 3, 32))
    v = mod.init(jax.random.key(0), x)
    v = jax.tree.map(lambda t: t + 0.1, v)  # a non-zero bias too
    w, b = np.asarray(v["params"]["w"]), np.asarray(v["params"]["b"])
    dense = np.zeros((32, 32))
    for h in range(4):  # block h maps inputs 8h..8h+7 to outputs 8h..8h+7
        dense[8 * h:8 * h + 8, 8 * h:8 * h + 8] = w[h]
    np.testing.assert_allclose(mod.apply(v, x), np.asarray(x) @ dense + b.reshape(32),
                               rtol=1e-5, atol=1e-5)


def test_nnx_dropout_is_on_in_the_training_form_and_off_in_the_functional_form():
    fn, state, (tokens,) = built("nnx")
    train_fn, state2, (_, key) = nnx_style.make(jax.random.key(0), deterministic=False)
    assert jax.tree.structure(state) == jax.tree.structure(state2)
    ref = jax.jit(fn)(state, tokens)
    tf = jax.jit(train_fn)
    a, b = tf(state, tokens, key), tf(state, tokens, jax.random.key(9))
    assert not np.allclose(a, ref) and not np.allclose(a, b)


@pytest.mark.parametrize("style", list(MAKERS))
def test_todays_apply_with_name_targets_equals_the_merged_model(style):
    fn, params, args = built(style)
    stack = {".*/layers/.*": 1} if style == "scan" else None
    lora = jax.jit(lambda p: lora_jax.init(p, r=2, key=jax.random.key(1, impl="unsafe_rbg"),
                                           targets=NAME_TARGETS[style], stack_axes=stack))(params)
    lora = randomize_np(lora, seed=2, scale=0.1)
    want = {p for p in SHAPES[style] if "embed" not in p and not p.endswith(("conv_1d/w", "/b"))}
    assert set(lora_jax.lora.leaves(lora)) == want
    out = jax.jit(lora_jax.apply(fn))(params, lora, *args)
    ref = jax.jit(fn)(lora_jax.merge(params, lora), *args)
    assert max_rel_err(out, ref) < 1e-5
    assert max_rel_err(out, jax.jit(fn)(params, *args)) > 1e-3  # the adapters matter


def _gpt_einsum():
    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "gpt_einsum.py"
    spec = importlib.util.spec_from_file_location("gpt_einsum", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpt_einsum", mod)  # Linen modules are dataclasses: need the module
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("kw", [{}, dict(scan=True)], ids=["unrolled", "scan"])
def test_benchmark_einsum_gpt_has_the_reference_sizes(kw):
    from lora_jax.models.gpt import GPT, GPTConfig

    gpt_einsum = _gpt_einsum()
    cfg = GPTConfig(**kw)  # the reference sizes, shapes only
    tok = jax.ShapeDtypeStruct((8, cfg.seq), jnp.int32)
    pe = flat(jax.eval_shape(gpt_einsum.GPTEinsum(cfg).init, jax.random.key(0), tok))
    pg = flat(jax.eval_shape(GPT(cfg).init, jax.random.key(0), tok))
    n, d, h = cfg.heads, cfg.d, cfg.d // cfg.heads
    pre = "params/layers/block" if cfg.scan else "params/block_0"
    lead = (cfg.layers,) if cfg.scan else ()
    assert pe[f"{pre}/attn/q/w"].shape == lead + (n, d, h)
    assert pe[f"{pre}/attn/o/w"].shape == lead + (n, h, d)
    assert pe[f"{pre}/mlp/up/w"].shape == lead + (d, cfg.mlp)
    assert pe[f"{pre}/mlp/down/w"].shape == lead + (cfg.mlp, d)
    # The Dense GPT's parameters less its projection biases (LayerNorm biases stay).
    biases = sum(x.size for p, x in pg.items() if p.endswith("/bias") and "/ln" not in p)
    assert sum(x.size for x in pe.values()) == sum(x.size for x in pg.values()) - biases
    assert len([p for p in pe if __import__("re").fullmatch(gpt_einsum.TARGETS, p)]) == (
        6 if cfg.scan else 6 * cfg.layers)


def test_benchmark_einsum_gpt_runs_and_matches_its_einsums():
    from lora_jax.models.gpt import GPTConfig

    gpt_einsum = _gpt_einsum()
    cfg = GPTConfig(vocab=64, d=32, heads=4, layers=1, mlp=64, seq=8)
    fn, params, tokens = gpt_einsum.make(cfg, batch=2)
    logits = jax.jit(fn)(params, tokens)
    assert logits.shape == (2, 8, 64) and logits.dtype == jnp.float32
    loss = gpt_einsum.loss_fn(logits, tokens)
    assert bool(jnp.isfinite(loss))
    # q through its einsum equals the Dense form x @ W with W = w.transpose(1, 0, 2) flattened.
    w = params["params"]["block_0"]["attn"]["q"]["w"]
    x = jax.random.normal(jax.random.key(0), (2, 8, 32))
    a = jnp.einsum("BTD,NDH->BTNH", x, w).reshape(2, 8, 32)
    np.testing.assert_allclose(a, x @ w.transpose(1, 0, 2).reshape(32, 32), rtol=1e-5,
                               atol=1e-5)
