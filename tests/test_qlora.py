"""QLoRA: apply() on a quantized base equals LoRA on the dequantized weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_err, randomize

import lora_jax
from lora_jax.models.gpt import GPT, GPTConfig, loss_fn

CFG = dict(vocab=64, d=64, heads=4, layers=2, mlp=256, seq=16)
TOK = jax.random.randint(jax.random.key(5), (2, 16), 0, 64)


def _setup(scan=False, fmt="nf4", dq=True, targets=r".*/(q|v|up)/kernel"):
    model = GPT(GPTConfig(**CFG, scan=scan))
    params = model.init(jax.random.key(1), TOK)
    # The traced layouts give nn.scan kernels their stack axis: blocks stay within a layer.
    layouts = lora_jax.trace(model.apply, params, TOK) if scan else None
    qbase = lora_jax.quantize(params, fmt, double_quant=dq, layouts=layouts)
    lora = lora_jax.init(params, r=4, key=jax.random.key(2), targets=targets,
                         stack_axes={".*layers.*": 1} if scan else None)
    return model, params, qbase, randomize(lora, jax.random.key(3), 0.05)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "nn.scan"])
def test_qlora_values_and_grads_equal_lora_on_dequantized_weights(scan):
    # Without double quantization a 64x64 layer holds 64 blocks, so layers split cleanly.
    model, params, qbase, lora = _setup(scan=scan, dq=not scan)
    dense = lora_jax.dequantize_tree(qbase)
    f = lora_jax.apply(model.apply)
    v, g = jax.jit(jax.value_and_grad(lambda l: loss_fn(f(qbase, l, TOK), TOK)))(lora)
    v_ref, g_ref = jax.jit(jax.value_and_grad(
        lambda l: loss_fn(model.apply(lora_jax.merge(dense, l), TOK), TOK)))(lora)
    assert abs(float(v) - float(v_ref)) < 1e-5
    assert max_rel_err(g, g_ref) < 1e-4
    rep = lora_jax.report(model.apply, qbase, lora, TOK)
    for path, w in rep.weights.items():
        want = "fast" if path in lora_jax.lora.leaves(lora) else "dequantize"
        assert w.uses and all(r == want for r in w.routes), (path, w)


def test_stacked_layers_that_straddle_blocks_fall_back_correctly():
    model, params, qbase, lora = _setup(scan=True, dq=True)  # 64 blocks/layer < 256
    dense = lora_jax.dequantize_tree(qbase)
    out = jax.jit(lora_jax.apply(model.apply))(qbase, lora, TOK)
    ref = model.apply(lora_jax.merge(dense, lora), TOK)
    assert max_rel_err(out, ref) < 1e-5
    rep = lora_jax.report(model.apply, qbase, lora, TOK)
    assert "blocks straddle layers" in rep["params/layers/block/q/kernel"].uses[0].reason


@pytest.mark.parametrize("fmt", ["fp4", "int4", "int8"])
def test_every_format_under_jit(fmt):
    model, params, qbase, lora = _setup(fmt=fmt, dq=fmt != "int8")
    dense = lora_jax.dequantize_tree(qbase)
    out = jax.jit(lora_jax.apply(model.apply))(qbase, lora, TOK)
    assert max_rel_err(out, model.apply(lora_jax.merge(dense, lora), TOK)) < 1e-5
    rel = float(jnp.linalg.norm(out - model.apply(lora_jax.merge(params, lora), TOK)) /
                jnp.linalg.norm(out))
    assert rel < (0.02 if fmt == "int8" else 0.4)  # quantization changes the model a little


def test_bf16_compute_dtype_on_quantized_base():
    model, params, qbase, lora = _setup()
    ref = model.apply(lora_jax.merge(lora_jax.dequantize_tree(qbase), lora), TOK)
    out = jax.jit(lora_jax.apply(model.apply, compute_dtype=jnp.bfloat16))(qbase, lora, TOK)
    assert out.dtype == ref.dtype
    assert 0 < max_rel_err(out, ref) < 3e-2


def test_merge_dense_and_requantized():
    model, params, qbase, lora = _setup()
    dense = jax.jit(lora_jax.merge, static_argnames="dtype")(qbase, lora, dtype=jnp.bfloat16)
    qd = lora_jax.dequantize_tree(qbase)
    ref = lora_jax.merge(qd, lora)
    for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(ref)):
        assert a.dtype == jnp.bfloat16 or a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=1e-2, atol=1e-2)
    requant, errors = lora_jax.merge(qbase, lora, requantize=True)
    path = "params/block_0/q/kernel"
    leaf = dict(lora_jax.paths.flatten(requant))[path]
    assert isinstance(leaf, lora_jax.QuantizedArray) and leaf.format == "nf4" and leaf.double_quant
    assert sorted(errors) == sorted(lora_jax.lora.leaves(lora))
    merged = dict(lora_jax.paths.flatten(ref))[path]
    w0 = dict(lora_jax.paths.flatten(qd))[path]
    delta = lora_jax.lora.leaves(lora)[path].delta()
    back = leaf.dequantize()
    np.testing.assert_allclose(errors[path]["weight_rel_error"],
                               np.linalg.norm(back - merged) / np.linalg.norm(merged), rtol=1e-4)
    np.testing.assert_allclose(errors[path]["update_rel_error"],
                               np.linalg.norm(back - w0 - delta) / np.linalg.norm(delta),
                               rtol=1e-4)
    # Untargeted quantized leaves stay quantized and untouched.
    k = dict(lora_jax.paths.flatten(requant))["params/block_0/k/kernel"]
    assert k is dict(lora_jax.paths.flatten(qbase))["params/block_0/k/kernel"]


def test_quantized_weights_are_dequantized_one_layer_at_a_time():
    """The compiled forward keeps about one layer's dense weight alive, not all of them."""
    d, n_layers = 512, 6
    ws = {f"l{i}": {"kernel": jax.random.normal(jax.random.key(i), (d, d)) / 20}
          for i in range(n_layers)}
    q = lora_jax.quantize(ws, "nf4", double_quant=True)
    lora = lora_jax.init(ws, r=4, key=jax.random.key(9), targets=r"l[024]/kernel")

    def fn(p, x):
        for i in range(n_layers):
            x = jnp.tanh(x @ p[f"l{i}"]["kernel"])
        return x

    x = jax.random.normal(jax.random.key(0), (8, d))
    f = lora_jax.apply(fn)
    layer_bytes = d * d * 4
    fwd = jax.jit(f).lower(q, lora, x).compile().memory_analysis()
    assert fwd.temp_size_in_bytes < 2.5 * layer_bytes
    grad = jax.jit(jax.grad(lambda l: f(q, l, x).sum())).lower(lora).compile()
    assert grad.memory_analysis().temp_size_in_bytes < 3.5 * layer_bytes
