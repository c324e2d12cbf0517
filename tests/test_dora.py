"""DoRA: against PEFT 0.21.2's outputs, merged weights and gradients (tests/data/peft_dora*,
see tests/data/README.md), float64 autodiff of the merged model on other layouts
and a quantized base, and round trips through PEFT files and orbax."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PeftMLP as MLP
from safetensors.numpy import load_file

import lora_jax
from lora_jax import dora, peft

DATA = pathlib.Path(__file__).parent / "data"
MODULES = ("fc1", "fc2", "out")


@functools.lru_cache
def _ref():
    w = load_file(DATA / "peft_dora_base.safetensors")
    base = {"params": {m: {"kernel": jnp.asarray(w[f"{m}.weight"].T),
                           "bias": jnp.asarray(w[f"{m}.bias"])} for m in MODULES}}
    return base, load_file(DATA / "peft_dora_io.safetensors"), load_file(
        DATA / "peft_dora_grads.safetensors")


def _load():
    base, _, _ = _ref()
    return base, peft.load(DATA / "peft_dora", base)


def test_peft_outputs_merge_and_gradients():
    base, io, gr = _ref()
    _, lora = _load()
    leaf = lora["params"]["fc1"]["kernel"]
    assert isinstance(leaf, dora.DoraWeight) and leaf.scale == 2.0 and leaf.m.shape == (64,)
    f = jax.jit(lora_jax.apply(MLP().apply, strict=True))
    x = jnp.asarray(io["x"])
    np.testing.assert_allclose(f(base, lora, x), io["y"], rtol=1e-5, atol=1e-5)
    merged = lora_jax.merge(base, lora)
    for m in MODULES:
        np.testing.assert_allclose(merged["params"][m]["kernel"].T, io[f"merged.{m}.weight"],
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(MLP().apply(merged, x), io["y_merged"], rtol=1e-5, atol=1e-5)
    tgt = jnp.asarray(gr["target"])
    loss, g = jax.value_and_grad(lambda l: jnp.sum(f(base, l, x) * tgt))(lora)
    np.testing.assert_allclose(loss, gr["loss"], rtol=1e-5)
    for m in ("fc1", "fc2"):
        gl = g["params"][m]["kernel"]
        np.testing.assert_allclose(gl.a.T, gr[f"{m}.lora_A"], rtol=2e-4, atol=1e-5)
        np.testing.assert_allclose(gl.b.T, gr[f"{m}.lora_B"], rtol=2e-4, atol=1e-5)
        np.testing.assert_allclose(gl.m, gr[f"{m}.lora_magnitude_vector"], rtol=2e-4, atol=1e-5)
    rep = lora_jax.report(MLP().apply, base, lora, x)
    assert set(rep.weights["params/fc1/kernel"].routes) == {"fast+rescale"}


def test_peft_round_trip(tmp_path):
    base, lora = _load()
    cfg = peft.save(tmp_path, lora)
    assert cfg["use_dora"] is True and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    ours, ref = load_file(tmp_path / "adapter_model.safetensors"), load_file(
        DATA / "peft_dora" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k])
    back = peft.load(tmp_path, base)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, lora))


def test_orbax_round_trip(tmp_path):
    from lora_jax import checkpoint

    _, lora = _load()
    checkpoint.save_adapter(tmp_path / "a", lora)
    back = checkpoint.load_adapter(tmp_path / "a")
    leaf = back["params"]["fc2"]["kernel"]
    assert isinstance(leaf, dora.DoraWeight)
    np.testing.assert_array_equal(leaf.m, lora["params"]["fc2"]["kernel"].m)


def _rand_dora(params, key, **kw):
    lora = lora_jax.init(params, r=3, alpha=6.0, key=key, dora=True, **kw)
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**30)))
    # B away from zero and m away from the norms, so every term of the gradient is exercised.
    return jax.tree.map(lambda x: (x * (1 + 0.3 * rng.standard_normal(x.shape))
                                   + 0.2 * rng.standard_normal(x.shape)).astype(x.dtype), lora)


def _einsum_model(p, x):
    # heads-first query kernel (roles "oio"), then a Dense kernel on the flattened heads
    h = jnp.einsum("btd,ndh->btnh", x, p["q"]["w"])
    h = jnp.tanh(h.reshape(h.shape[:2] + (-1,)))
    return h @ p["o"]["kernel"]


def test_gradients_match_float64_autodiff_any_layout():
    with jax.enable_x64():
        k = jax.random.split(jax.random.key(3), 4)
        params = {"q": {"w": jax.random.normal(k[0], (2, 8, 4), jnp.float64)},
                  "o": {"kernel": jax.random.normal(k[1], (8, 5), jnp.float64)}}
        x = jax.random.normal(k[2], (2, 3, 8), jnp.float64)
        layouts = lora_jax.trace(_einsum_model, params, x)
        lora = _rand_dora(params, k[3], layouts=layouts, dtype=jnp.float64)
        assert lora["q"]["w"].m.shape == (2, 4)
        f = lora_jax.apply(_einsum_model, strict=True)

        def ref(l):  # the merged model, by plain autodiff (norm detached inside merge)
            return jnp.sum(jnp.sin(_einsum_model(lora_jax.merge(params, l), x)))

        def fast(l):
            return jnp.sum(jnp.sin(f(params, l, x)))

        (v1, g1), (v2, g2) = (jax.jit(jax.value_and_grad(h))(lora) for h in (fast, ref))
        np.testing.assert_allclose(v1, v2, rtol=1e-12)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_norm_expansion_matches_direct_norm():
    # the fast path's ‖W0‖² + 2s⟨W0, AB⟩ + s²‖AB‖² against the norm of the formed kernel
    k = jax.random.split(jax.random.key(5), 2)
    w = jax.random.normal(k[0], (3, 64, 32))
    lora = _rand_dora({"kernel": w}, k[1], stack_axes=1)["kernel"]
    direct = jnp.linalg.norm(w + lora.delta(), axis=1)
    np.testing.assert_allclose(lora.m / lora.output_scale(w), direct, rtol=1e-5)


def test_quantized_base_init_and_unmerge():
    k = jax.random.split(jax.random.key(9), 3)
    params = {"d": {"kernel": jax.random.normal(k[0], (64, 32))}}
    q = lora_jax.quantize(params, "nf4")
    lora = lora_jax.init(q, r=4, key=k[1], dora=True)
    wq = lora_jax.dequantize_tree(q)["d"]["kernel"]
    np.testing.assert_allclose(lora["d"]["kernel"].m, jnp.linalg.norm(wq, axis=0), rtol=1e-6)
    lora = _rand_dora(params, k[1])
    x = jax.random.normal(k[2], (5, 64))
    f = jax.jit(lora_jax.apply(lambda p, x: x @ p["d"]["kernel"], strict=True))
    merged = lora_jax.merge(q, lora)
    np.testing.assert_allclose(f(q, lora, x), x @ merged["d"]["kernel"], rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="dora.unmerge"):
        lora_jax.unmerge(merged, lora)
    back = dora.unmerge(merged, lora, dora.norms(q, lora))
    np.testing.assert_allclose(back["d"]["kernel"], wq, atol=1e-5)


def test_init_schemes_leave_model_unchanged():
    w = jax.random.normal(jax.random.key(1), (16, 12))
    for scheme in ("default", "pissa", "olora"):
        lora = lora_jax.init({"kernel": w}, r=4, key=jax.random.key(2), dora=True, init=scheme)
        base = {"kernel": w} if scheme == "default" else lora_jax.unmerge(
            {"kernel": w}, lora_jax.lora.from_leaves(
                {"kernel": lora["kernel"].linear_part()}))
        np.testing.assert_allclose(lora_jax.merge(base, lora)["kernel"], w, atol=1e-5)


def test_bad_magnitude_shape_is_named():
    lora = _rand_dora({"kernel": jnp.ones((8, 4))}, jax.random.key(0))
    bad = {"kernel": lora["kernel"].replace(m=jnp.ones(5))}
    with pytest.raises(ValueError, match="'kernel'.*m has shape"):
        lora_jax.merge({"kernel": jnp.ones((8, 4))}, bad)


def test_sharding_specs_follow_the_kernel():
    from jax.sharding import PartitionSpec as PS

    from lora_jax import sharding

    params = {"d": {"kernel": jnp.ones((3, 8, 4))}}
    lora = lora_jax.init(params, r=2, key=jax.random.key(0), dora=True, stack_axes=1)
    s = sharding.specs(lora, {"d/kernel": PS("pp", "data", "model")})["d"]["kernel"]
    assert (s.a, s.b, s.m) == (PS("pp", "data"), PS("pp", None, "model"),
                               PS("pp", "model"))


def test_fast_path_forms_no_dw():
    # compiled FLOPs of the train gradient: DoRA's fast path costs LoRA's plus the norm's thin
    # matmuls, well under the merged-weight route, which forms dW = xᵀ·dy
    k = jax.random.split(jax.random.key(4), 2)
    params = {"d": {"kernel": jax.random.normal(k[0], (256, 256))}}
    x = jax.random.normal(k[1], (64, 256))
    fn = lambda p, x: x @ p["d"]["kernel"]  # noqa: E731

    def flops(lora, mode):
        f = lora_jax.apply(fn, mode=mode)
        g = jax.jit(jax.grad(lambda l: jnp.sum(jnp.sin(f(params, l, x)))))
        cost = g.lower(lora).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

    lora = lora_jax.init(params, r=8, key=jax.random.key(0))
    d = lora_jax.init(params, r=8, key=jax.random.key(0), dora=True)
    lora_fast, dora_fast, dora_merged = flops(lora, "fast"), flops(d, "fast"), flops(d, "merged")
    assert dora_fast < 1.15 * lora_fast
    assert dora_merged > dora_fast + 0.8 * 2 * 64 * 256 * 256  # at least one more big matmul


def test_transposed_use_takes_the_merged_weight():
    # x·Wᵀ contracts the output axis, where the rescale lives: the merged weight, correctly
    k = jax.random.split(jax.random.key(8), 2)
    params = {"e": {"kernel": jax.random.normal(k[0], (16, 12))}}
    lora = _rand_dora(params, k[1])
    fn = lambda p, x: x @ p["e"]["kernel"].T  # noqa: E731
    x = jax.random.normal(k[1], (3, 12))
    rep = lora_jax.report(fn, params, lora, x)
    assert rep.weights["e/kernel"].routes == ["fallback"]
    np.testing.assert_allclose(lora_jax.apply(fn)(params, lora, x),
                               fn(lora_jax.merge(params, lora), x), rtol=1e-5, atol=1e-5)
