"""Tests for lora_jax.peft: the PEFT adapter format, checked against a real PEFT adapter.

`tests/data/peft_mlp_*` were written by PEFT 0.21.2 (see tests/data/README.md):
the adapter, its base weights, and the adapted model's outputs. The torch-free checks here
compare against those files and against float64 numpy versions of PEFT's formulas.
"""

import functools
import json
import math
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PeftMLP as MLP
from safetensors.numpy import load_file, save_file

import lora_jax
from lora_jax import adalora, peft
from lora_jax.models.gpt import GPT, GPTConfig

DATA = pathlib.Path(__file__).parent / "data"
REF = DATA / "peft_mlp_lora"
MODULES = ("fc1", "fc2", "out")


@functools.lru_cache
def _mlp_fn():
    """``f(base, lora, x)``, jitted once for the module (compiles once per tree structure)."""
    return jax.jit(lora_jax.apply(MLP().apply))


def _base():
    w = load_file(DATA / "peft_mlp_base.safetensors")
    return {"params": {m: {"kernel": jnp.asarray(w[f"{m}.weight"].T),
                           "bias": jnp.asarray(w[f"{m}.bias"])} for m in MODULES}}


def _io():
    io = load_file(DATA / "peft_mlp_io.safetensors")
    return jnp.asarray(io["x"]), io["y"]


def _randn(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _randomize(lora, seed=0, scale=0.3):
    """Fresh non-zero values for every factor (B included)."""
    leaves, tdef = jax.tree.flatten(lora)
    return tdef.unflatten([_randn(seed + i, x.shape, scale) for i, x in enumerate(leaves)])


def _assert_same_tree(got, want):
    g, w = lora_jax.lora.leaves(got), lora_jax.lora.leaves(want)
    assert sorted(g) == sorted(w)
    for p in w:
        assert type(g[p]) is type(w[p]), p
        for x, y in zip(jax.tree.leaves(g[p]), jax.tree.leaves(w[p])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=p)
        assert g[p].scale == pytest.approx(w[p].scale, rel=1e-12), p
        assert (g[p].in_axes, g[p].stack_axes) == (w[p].in_axes, w[p].stack_axes), p


def _peft_forward_np(x, base, tensors, cfg):
    """PEFT's LoRA MLP forward in float64 numpy: y = x W^T + b + s * x A^T B^T."""
    from math import erf

    gelu = np.vectorize(lambda v: 0.5 * v * (1.0 + erf(v / math.sqrt(2.0))))
    h = np.asarray(x, np.float64)
    for i, m in enumerate(MODULES):
        y = h @ base[f"{m}.weight"].T.astype(np.float64) + base[f"{m}.bias"]
        ka = f"base_model.model.{m}.lora_A.weight"
        if ka in tensors:
            a, b = tensors[ka].astype(np.float64), tensors[ka.replace("lora_A", "lora_B")]
            r = cfg["rank_pattern"].get(m, cfg["r"])
            alpha = cfg["alpha_pattern"].get(m, cfg["lora_alpha"])
            s = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
            y = y + s * (h @ a.T @ b.T.astype(np.float64))
        h = gelu(y) if i < len(MODULES) - 1 else y
    return h


# ------------------------------------------------------------------------------------------
# The reference PEFT adapter


def test_reference_adapter_matches_peft_outputs():
    params, (x, y) = _base(), _io()
    lora = peft.load(REF, params)
    w = lora["params"]
    assert sorted(w) == ["fc1", "fc2"]
    assert (w["fc1"]["kernel"].r, w["fc2"]["kernel"].r) == (4, 2)
    fc2 = w["fc2"]["kernel"]
    assert fc2.rslora and fc2.scale == pytest.approx(12 / math.sqrt(2))
    f = _mlp_fn()
    np.testing.assert_allclose(np.asarray(f(params, lora, x)), y, atol=1e-5, rtol=1e-5)
    # and our reading of PEFT's formulas (float64, independent of lora_jax) gives y too
    cfg = json.loads((REF / "adapter_config.json").read_text())
    ref = _peft_forward_np(x, load_file(DATA / "peft_mlp_base.safetensors"),
                           load_file(REF / "adapter_model.safetensors"), cfg)
    np.testing.assert_allclose(ref, y, atol=1e-5, rtol=1e-5)


def test_resaving_reference_gives_the_same_tensors_and_config(tmp_path):
    lora = peft.load(REF, _base())
    cfg = peft.save(tmp_path, lora)
    ref_t, new_t = load_file(REF / "adapter_model.safetensors"), load_file(
        tmp_path / "adapter_model.safetensors")
    assert sorted(ref_t) == sorted(new_t)
    for k in ref_t:
        assert ref_t[k].dtype == new_t[k].dtype and ref_t[k].tobytes() == new_t[k].tobytes(), k
    ref_cfg = json.loads((REF / "adapter_config.json").read_text())
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == cfg
    for k in ("peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora",
              "bias", "lora_dropout", "use_dora", "fan_in_fan_out", "modules_to_save"):
        assert cfg[k] == ref_cfg[k], k
    assert sorted(cfg["target_modules"]) == sorted(ref_cfg["target_modules"])


def test_save_merged_is_torch_layout(tmp_path):
    params = _base()
    out = peft.save_merged(tmp_path / "base.safetensors", params)
    ref = load_file(DATA / "peft_mlp_base.safetensors")
    assert sorted(out) == sorted(ref)
    for k in ref:
        assert ref[k].tobytes() == load_file(tmp_path / "base.safetensors")[k].tobytes(), k
    # merged: PEFT's merge W + s * B @ A, in float64 numpy
    lora = peft.load(REF, params)
    peft.save_merged(tmp_path / "merged.safetensors", params, lora)
    got = load_file(tmp_path / "merged.safetensors")
    t = load_file(REF / "adapter_model.safetensors")
    for m, s in (("fc1", 12 / 2.0), ("fc2", 12 / math.sqrt(2))):
        a = t[f"base_model.model.{m}.lora_A.weight"].astype(np.float64)
        b = t[f"base_model.model.{m}.lora_B.weight"].astype(np.float64)
        np.testing.assert_allclose(got[f"{m}.weight"], ref[f"{m}.weight"] + s * b @ a,
                                   atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(got["out.weight"], ref["out.weight"])


# ------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_round_trip_with_patterns(tmp_path, rslora):
    params, (x, _) = _base(), _io()
    rules = [lora_jax.Rule(pattern=".*fc1.*", r=3, alpha=5.0),
             lora_jax.Rule(pattern=".*fc2.*", r=2, alpha=4.0 if not rslora else 5.0),
             lora_jax.Rule(pattern=".*out.*", r=2, alpha=5.0)]
    lora = _randomize(lora_jax.init(params, key=jax.random.key(0), rules=rules, rslora=rslora))
    cfg = peft.save(tmp_path, lora)
    assert (cfg["peft_type"], cfg["r"], cfg["use_rslora"]) == ("LORA", 2, rslora)
    assert cfg["rank_pattern"] == {"fc1": 3}
    if rslora:
        assert (cfg["lora_alpha"], cfg["alpha_pattern"]) == (5, {})
    else:
        assert cfg["lora_alpha"] in (4, 5)
        assert len(cfg["alpha_pattern"]) == 1
    back = peft.load(tmp_path, params)
    _assert_same_tree(back, lora)
    f = _mlp_fn()
    np.testing.assert_allclose(f(params, back, x), f(params, lora, x), rtol=1e-6, atol=1e-6)
    # the file, read with PEFT's rules in float64, gives the same outputs
    ref = _peft_forward_np(x, load_file(DATA / "peft_mlp_base.safetensors"),
                           load_file(tmp_path / "adapter_model.safetensors"), cfg)
    np.testing.assert_allclose(f(params, lora, x), ref, rtol=1e-5, atol=1e-5)


def test_saved_tensors_are_exact_transposes(tmp_path):
    params = _base()
    lora = _randomize(lora_jax.init(params, r=3, key=jax.random.key(1)))
    peft.save(tmp_path, lora)
    t = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(t) == sorted(f"base_model.model.{m}.lora_{ab}.weight"
                               for m in MODULES for ab in "AB")
    for m in MODULES:
        w = lora["params"][m]["kernel"]
        a, b = t[f"base_model.model.{m}.lora_A.weight"], t[f"base_model.model.{m}.lora_B.weight"]
        assert a.dtype == np.float32 and a.flags.c_contiguous
        assert a.tobytes() == np.ascontiguousarray(np.asarray(w.a).T).tobytes()
        assert b.tobytes() == np.ascontiguousarray(np.asarray(w.b).T).tobytes()
    # dtype override
    peft.save(tmp_path / "bf16", lora, dtype=jnp.bfloat16)
    assert load_file(tmp_path / "bf16" / "adapter_model.safetensors")[
        "base_model.model.fc1.lora_A.weight"].dtype == jnp.bfloat16


def test_adalora_round_trip(tmp_path):
    params, (x, _) = _base(), _io()
    lora = _randomize(adalora.init(params, init_r=4, target_r=2, alpha=6.0,
                                   key=jax.random.key(2)))
    cfg = peft.save(tmp_path, lora, extra_config={"total_step": 100, "tinit": 10})
    assert (cfg["peft_type"], cfg["init_r"], cfg["target_r"], cfg["lora_alpha"]) == (
        "ADALORA", 4, 2, 6)
    assert cfg["total_step"] == 100 and cfg["rank_pattern"] is None
    t = load_file(tmp_path / "adapter_model.safetensors")
    w = lora["params"]["fc2"]["kernel"]
    np.testing.assert_array_equal(t["base_model.model.fc2.lora_A"], np.asarray(w.p).T)
    np.testing.assert_array_equal(t["base_model.model.fc2.lora_B"], np.asarray(w.q).T)
    np.testing.assert_array_equal(t["base_model.model.fc2.lora_E"], np.asarray(w.e)[:, None])
    back = peft.load(tmp_path, params)
    _assert_same_tree(back, lora)
    assert back["params"]["fc1"]["kernel"].scale == pytest.approx(6.0 / (4 + 1e-5), rel=1e-12)
    f = _mlp_fn()
    np.testing.assert_allclose(f(params, back, x), f(params, lora, x), rtol=1e-6, atol=1e-6)


def test_adalora_rank_pattern_restores_pruned_ranks(tmp_path):
    """A PEFT AdaLoRA checkpoint after pruning: rows dropped, rank_pattern masks in the config."""
    params, rng = _base(), np.random.default_rng(3)
    keep = [True, False, True, True, False]
    k = sum(keep)
    A, B, E = (rng.standard_normal(s) for s in ((k, 32), (64, k), (k, 1)))
    save_file({"base_model.model.fc1.lora_A": A.astype(np.float32),
               "base_model.model.fc1.lora_B": B.astype(np.float32),
               "base_model.model.fc1.lora_E": E.astype(np.float32)},
              tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="ADALORA", r=8, init_r=5, target_r=2, lora_alpha=3, target_modules=["fc1"],
        rank_pattern={"fc1.lora_E": keep}, total_step=10)))
    w = peft.load(tmp_path, params)["params"]["fc1"]["kernel"]
    assert w.r == 5 and np.count_nonzero(np.asarray(w.e)) == k
    # PEFT: delta (out, in) = B @ (A * E) * alpha / (ranknum + 1e-5), ranknum = init_r = 5
    want = (B.astype(np.float32) @ (A.astype(np.float32) * E.astype(np.float32))).astype(
        np.float64) * 3 / (5 + 1e-5)
    np.testing.assert_allclose(np.asarray(w.delta()).T, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Name maps, stacking, fused kernels, other layer kinds


@functools.lru_cache
def _gpt_shapes(scan):
    cfg = GPTConfig(vocab=32, d=16, heads=2, layers=2, mlp=24, seq=8, scan=scan)
    return jax.eval_shape(GPT(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))


def _gpt(scan):
    """A small GPT's parameter tree (random values; eager Flax init is slow on CPU)."""
    leaves, tdef = jax.tree.flatten(_gpt_shapes(scan))
    return tdef.unflatten([_randn(i, x.shape, 0.1) for i, x in enumerate(leaves)])


def test_gpt_name_map_round_trip_and_scan(tmp_path):
    params = _gpt(False)
    lora = _randomize(lora_jax.init(params, r=2, key=jax.random.key(1)))
    cfg = peft.save(tmp_path, lora, name_map="gpt")
    assert "transformer.h.1.attn.q_proj" in cfg["target_modules"]
    assert {"lm_head", "transformer.h.0.mlp.fc_in", "transformer.h.0.attn.out_proj"} <= set(
        cfg["target_modules"])
    back = peft.load(tmp_path, params, name_map="gpt")
    _assert_same_tree(back, lora)
    # the same adapter loads into the nn.scan GPT, one torch module per stacked layer
    sparams = _gpt(True)
    slora = peft.load(tmp_path, sparams, name_map="gpt")
    sq = slora["params"]["layers"]["block"]["q"]["kernel"]
    assert sq.stack_axes == 1 and sq.a.shape == (2, 16, 2)
    for i in range(2):
        np.testing.assert_array_equal(sq.a[i], lora["params"][f"block_{i}"]["q"]["kernel"].a)
        np.testing.assert_array_equal(sq.b[i], lora["params"][f"block_{i}"]["q"]["kernel"].b)
    peft.save(tmp_path / "scan", slora, name_map="gpt")
    a, b = (load_file(d / "adapter_model.safetensors") for d in (tmp_path, tmp_path / "scan"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    # merged export names
    out = peft.save_merged(tmp_path / "m.safetensors", params, lora, name_map="gpt")
    assert out["transformer.h.0.attn.q_proj.weight"].shape == (16, 16)
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.1.ln_2.weight",
            "transformer.ln_f.bias", "lm_head.weight", "lm_head.bias"} <= set(out)
    sout = peft.save_merged(tmp_path / "s.safetensors", sparams, slora, name_map="gpt")
    assert sorted(sout) == sorted(out)


def test_rank_pattern_suffix_ambiguity(tmp_path):
    # PEFT's pattern "fc2" would also claim "block.fc2"; save must still resolve exactly.
    p = {"params": {"fc1": {"kernel": jnp.ones((8, 8))}, "fc2": {"kernel": jnp.ones((8, 8))},
                    "block": {"fc2": {"kernel": jnp.ones((8, 8))}}}}
    lora = _randomize(lora_jax.init(p, r=4, key=jax.random.key(0),
                                    rules=[lora_jax.Rule(pattern="params/fc2/kernel", r=2),
                                           lora_jax.Rule(pattern=".*", r=4)]))
    cfg = peft.save(tmp_path, lora)
    for name, r in (("fc1", 4), ("fc2", 2), ("block.fc2", 4)):
        key = peft.config.pattern_key(list(cfg["rank_pattern"]), name)
        assert cfg["rank_pattern"].get(key, cfg["r"]) == r, name
    _assert_same_tree(peft.load(tmp_path, p), lora)


QKV = {"params/attn/qkv/kernel": [("attn.q_proj", slice(0, 8)), ("attn.k_proj", (8, 16)),
                                  ("attn.v_proj", slice(16, 24))],
       r"params/attn/(o)/kernel": r"attn.\1_proj"}


def test_fused_kernel_splits_and_concatenates(tmp_path):
    p = {"params": {"attn": {"qkv": {"kernel": _randn(0, (8, 24))},
                             "o": {"kernel": _randn(1, (8, 8))}}}}
    lora = _randomize(lora_jax.init(p, r=2, alpha=3.0, key=jax.random.key(0)))
    cfg = peft.save(tmp_path, lora, name_map=QKV)
    assert cfg["target_modules"] == ["attn.k_proj", "attn.o_proj", "attn.q_proj", "attn.v_proj"]
    t = load_file(tmp_path / "adapter_model.safetensors")
    w = lora["params"]["attn"]["qkv"]["kernel"]
    for j, m in enumerate("qkv"):
        np.testing.assert_array_equal(t[f"base_model.model.attn.{m}_proj.lora_A.weight"],
                                      np.asarray(w.a).T)
        np.testing.assert_array_equal(t[f"base_model.model.attn.{m}_proj.lora_B.weight"],
                                      np.asarray(w.b)[:, 8 * j: 8 * j + 8].T)
    _assert_same_tree(peft.load(tmp_path, p, name_map=QKV), lora)
    # merged export splits the fused kernel into three torch weights
    out = peft.save_merged(tmp_path / "m.safetensors", p, lora, name_map=QKV)
    merged = np.asarray(lora_jax.merge(p, lora)["params"]["attn"]["qkv"]["kernel"])
    for j, m in enumerate("qkv"):
        np.testing.assert_array_equal(out[f"attn.{m}_proj.weight"], merged[:, 8 * j: 8 * j + 8].T)


def test_separate_torch_modules_load_into_a_fused_kernel(tmp_path):
    """q/k/v with their own A, ranks and alphas load exactly into one fused kernel."""
    sep = {"params": {"attn": {m: {"kernel": _randn(i, (8, 8))} for i, m in enumerate("qkv")}}}
    rules = [lora_jax.Rule(pattern=".*/q/.*", r=1, alpha=2.0),
             lora_jax.Rule(pattern=".*/k/.*", r=2, alpha=2.0),
             lora_jax.Rule(pattern=".*/v/.*", r=3, alpha=2.0)]
    lora = _randomize(lora_jax.init(sep, key=jax.random.key(0), rules=rules))
    peft.save(tmp_path, lora, name_map={r"params/attn/(\w)/kernel": r"attn.\1_proj"})
    fused = {"params": {"attn": {"qkv": {"kernel": jnp.concatenate(
        [sep["params"]["attn"][m]["kernel"] for m in "qkv"], axis=1)}}}}
    back = peft.load(tmp_path, fused, name_map=QKV)
    w = back["params"]["attn"]["qkv"]["kernel"]
    assert w.r == 6
    want = jnp.concatenate([lora["params"]["attn"][m]["kernel"].delta() for m in "qkv"], axis=1)
    np.testing.assert_allclose(w.delta(), want, rtol=1e-6, atol=1e-6)


def test_multi_axis_kernels_flatten_row_major(tmp_path):
    # attention-style DenseGeneral kernels: query (d, heads, hd), out (heads, hd, d)
    p = {"params": {"query": {"kernel": _randn(0, (8, 2, 4))},
                    "out": {"kernel": _randn(1, (2, 4, 8))}}}
    lora = _randomize(lora_jax.init(p, r=2, key=jax.random.key(0)))
    assert lora["params"]["out"]["kernel"].in_axes == 2
    peft.save(tmp_path, lora)
    t = load_file(tmp_path / "adapter_model.safetensors")
    merged = peft.save_merged(tmp_path / "m.safetensors", p, lora)
    for m in ("query", "out"):
        w = lora["params"][m]["kernel"]
        a, b = t[f"base_model.model.{m}.lora_A.weight"], t[f"base_model.model.{m}.lora_B.weight"]
        assert a.shape == (2, 8) and b.shape == (8, 2)
        # torch Linear on the flattened input: W (out, in) + s * B @ A
        base = np.asarray(p["params"][m]["kernel"]).reshape(8, 8).T
        np.testing.assert_allclose(merged[f"{m}.weight"], base + w.scale * b @ a, rtol=1e-5,
                                   atol=1e-6)
    _assert_same_tree(peft.load(tmp_path, p), lora)


def test_conv_kernels_use_peft_conv_lora(tmp_path):
    p = {"params": {"Conv_0": {"kernel": _randn(0, (3, 3, 4, 6)), "bias": _randn(1, (6,))}}}
    lora = _randomize(lora_jax.init(p, r=2, alpha=4.0, key=jax.random.key(0)))
    peft.save(tmp_path, lora)
    t = load_file(tmp_path / "adapter_model.safetensors")
    A, B = t["base_model.model.Conv_0.lora_A.weight"], t["base_model.model.Conv_0.lora_B.weight"]
    assert A.shape == (2, 4, 3, 3) and B.shape == (6, 2, 1, 1)
    merged = peft.save_merged(tmp_path / "m.safetensors", p, lora)
    w0 = np.asarray(p["params"]["Conv_0"]["kernel"]).transpose(3, 2, 0, 1)  # (cout, cin, kh, kw)
    # PEFT Conv2d get_delta_weight: conv2d(A.permute(1,0,2,3), B).permute(1,0,2,3) * scaling
    delta = np.einsum("or,rchw->ochw", B[:, :, 0, 0], A) * 2.0
    np.testing.assert_allclose(merged["Conv_0.weight"], w0 + delta, rtol=1e-5, atol=1e-6)
    _assert_same_tree(peft.load(tmp_path, p), lora)


def test_embedding_lora(tmp_path):
    params = _gpt(False)
    lora = _randomize(lora_jax.init(params, r=2, key=jax.random.key(0),
                                    targets=["params/embed/embedding", ".*/q/kernel"]))
    peft.save(tmp_path, lora, name_map="gpt")
    t = load_file(tmp_path / "adapter_model.safetensors")
    e = lora["params"]["embed"]["embedding"]
    np.testing.assert_array_equal(t["base_model.model.transformer.wte.lora_embedding_A"],
                                  np.asarray(e.a).T)  # (r, vocab)
    assert t["base_model.model.transformer.wte.lora_embedding_B"].shape == (16, 2)
    _assert_same_tree(peft.load(tmp_path, params, name_map="gpt"), lora)


def test_module_names_and_registry():
    params = _gpt(True)
    names = peft.module_names(params, name_map="gpt")
    assert names["params/layers/block/v/kernel"] == ["transformer.h.0.attn.v_proj",
                                                     "transformer.h.1.attn.v_proj"]
    assert names["params/embed/embedding"] == ["transformer.wte"]
    peft.NAME_MAPS["test-only"] = {r"params/(\w+)/kernel": r"model.\1"}
    try:
        names = peft.module_names(_base(), name_map="test-only")
        assert names["params/fc1/kernel"] == ["model.fc1"]
    finally:
        del peft.NAME_MAPS["test-only"]
    with pytest.raises(ValueError, match="unknown name_map"):
        peft.module_names(params, name_map="nope")


# ------------------------------------------------------------------------------------------
# Errors


def _edit_ref(tmp_path, cfg_edit=None, tensor_edit=None):
    d = tmp_path / "adapter"
    shutil.copytree(REF, d)
    if cfg_edit:
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg_edit(cfg)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    if tensor_edit:
        t = load_file(d / "adapter_model.safetensors")
        tensor_edit(t)
        save_file(t, d / "adapter_model.safetensors")
    return d


def _rename(t, old, new):
    for k in list(t):
        if f".{old}." in k:
            t[k.replace(f".{old}.", f".{new}.")] = t.pop(k)


@pytest.mark.parametrize("cfg_edit,tensor_edit,match", [
    (lambda c: c.update(use_dora=True), None, "use_dora"),
    (lambda c: c.update(peft_type="IA3"), None, "unsupported peft_type 'IA3'"),
    (lambda c: c.update(bias="all"), None, "bias='all'"),
    (lambda c: c.update(modules_to_save=["out"]), None, "modules_to_save"),
    (lambda c: c.update(target_modules=["fc1", "fc3"]), lambda t: _rename(t, "fc2", "fc3"),
     r"module\(s\).*\['fc3'\].*modules are e.g. \['fc1', 'fc2', 'out'\]"),
    (None, lambda t: t.update({"base_model.model.fc1.lora_B.weight": np.zeros((63, 4),
                                                                           np.float32)}),
     r"'base_model.model.fc1.lora_B.weight' has shape \(63, 4\), expected \(64, 4\)"),
    (lambda c: c.update(rank_pattern={}), None, "rank 2 but the config"),
    (None, lambda t: t.update({"base_model.model.fc1.lora_B.bias": np.zeros(64, np.float32)}),
     "unsupported tensor 'base_model.model.fc1.lora_B.bias'"),
    (None, lambda t: t.pop("base_model.model.fc2.lora_A.weight"), "missing"),
    (lambda c: c.update(target_modules=["fc1"]), None, r"target_modules \['fc1'\] do not select"),
    (lambda c: c.update(target_modules=["fc1", "fc2", "out"]), None,
     r"selects \['out'\] but the adapter has no tensors"),
])
def test_load_errors(tmp_path, cfg_edit, tensor_edit, match):
    d = _edit_ref(tmp_path, cfg_edit, tensor_edit)
    with pytest.raises(ValueError, match=match):
        peft.load(d, _base())


def test_save_errors(tmp_path):
    params = _base()
    mixed = lora_jax.lora.from_leaves({
        "params/fc1/kernel": lora_jax.LoraWeight(a=jnp.ones((32, 2)), b=jnp.ones((2, 64)),
                                                 rslora=True),
        "params/fc2/kernel": lora_jax.LoraWeight(a=jnp.ones((64, 2)), b=jnp.ones((2, 48)))})
    with pytest.raises(ValueError, match="one use_rslora"):
        peft.save(tmp_path, mixed)
    lora = lora_jax.init(params, r=2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="no PyTorch module name for 'params/out/kernel'"):
        peft.save(tmp_path, lora, name_map={r"params/(fc\d)/kernel": r"\1"})
    with pytest.raises(ValueError, match="both map to module 'x'"):
        peft.save(tmp_path, lora, name_map=lambda p: "x")
    with pytest.raises(ValueError, match="may not set 'r'"):
        peft.save(tmp_path, lora, extra_config={"r": 3})
    with pytest.raises(ValueError, match="do not tile"):
        peft.save(tmp_path, lora, name_map=lambda p: [("a", slice(0, 3)), ("b", slice(4, 999))])
    ada = adalora.init(params, init_r=3, target_r=1, key=jax.random.key(0),
                       rules=[lora_jax.Rule(pattern=".*fc1.*", r=2), lora_jax.Rule(pattern=".*")])
    with pytest.raises(ValueError, match="one init_r"):
        peft.save(tmp_path, ada)
    with pytest.raises(TypeError, match="only LoRA or only AdaLoRA"):
        peft.save(tmp_path, {"a": lora["params"]["fc1"], "b": adalora.init(
            params, init_r=2, target_r=1, key=jax.random.key(0))["params"]["fc2"]})
    conv = {"Conv_0": {"kernel": jnp.ones((3, 3, 4, 6))}}
    with pytest.raises(NotImplementedError, match="Linear layers only"):
        peft.save(tmp_path, adalora.init(conv, init_r=2, target_r=1, key=jax.random.key(0)))


def test_unsupported_layers_are_named(tmp_path):
    p = {"params": {"ConvTranspose_0": {"kernel": jnp.ones((3, 3, 4, 6))},
                    "fc": {"kernel": jnp.ones((4, 4))}}}
    lora = lora_jax.init(p, r=2, key=jax.random.key(0))
    with pytest.raises(NotImplementedError, match="'params/ConvTranspose_0/kernel'.*transposed"):
        peft.save(tmp_path, lora)
    # a model that has one still loads adapters for its other layers
    fc = {"params": {"fc": lora["params"]["fc"]}}
    peft.save(tmp_path, fc)
    _assert_same_tree(peft.load(tmp_path, p), fc)


# --- Built-in name maps for the bundled models --------------------------------------------------

def _tiny_llama(tied=False):
    from lora_jax.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab=40, d=16, layers=2, heads=4, kv_heads=2, ffn=24, max_len=16,
                      tied=tied)
    tokens = jax.random.randint(jax.random.key(3), (2, 6), 0, cfg.vocab)
    model = Llama(cfg)
    return cfg, model, model.init(jax.random.key(4), tokens), tokens


def test_llama_name_map_agrees_with_hf_names():
    from lora_jax.models.llama import hf_names

    for tied in (False, True):
        cfg, _, params, _ = _tiny_llama(tied)
        names = {"/".join(("params",) + where): hf.rsplit(".", 1)[0]
                 for hf, where in hf_names(cfg).items()}
        got = {p: m[0] for p, m in peft.module_names(params, name_map="llama").items()}
        assert got and all(names[p] == m for p, m in got.items())
        kernels = {p for p in names if p.endswith(("/kernel", "/embedding"))}
        assert set(got) == kernels


def test_llama_peft_round_trip_with_the_builtin_map(tmp_path):
    cfg, model, params, tokens = _tiny_llama()
    targets = r".*(q|k|v|o|gate|up|down)_proj/kernel"
    lora = _randomize(lora_jax.init(params, r=4, alpha=8, targets=targets, key=jax.random.key(0)))
    saved = peft.save(tmp_path / "a", lora, name_map="llama")
    assert {m.rsplit(".", 1)[-1] for m in saved["target_modules"]} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "model.layers.1.mlp.gate_proj" in saved["target_modules"]
    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in keys
    back = peft.load(tmp_path / "a", params, name_map="llama")
    out = lora_jax.apply(model.apply)(params, back, tokens)
    np.testing.assert_allclose(out, model.apply(lora_jax.merge(params, lora), tokens), rtol=1e-5,
                               atol=1e-5)


def test_unknown_modules_error_is_short_and_suggests_the_map(tmp_path):
    cfg, model, params, tokens = _tiny_llama()
    lora = lora_jax.init(params, r=2, key=jax.random.key(0), targets=r".*_proj/kernel")
    peft.save(tmp_path / "a", lora, name_map="llama")
    with pytest.raises(ValueError) as e:
        peft.load(tmp_path / "a", params)  # the default map: 'layers_0.self_attn.q_proj', ...
    msg = str(e.value)
    assert "14 module(s)" in msg and "(14 in all)" in msg and len(msg) < 700, msg
    assert "name_map='llama'" in msg


def test_save_merged_llama_folder_has_config(tmp_path):
    from lora_jax.models.llama import config_from_hf

    cfg, model, params, tokens = _tiny_llama()
    lora = _randomize(lora_jax.init(params, r=2, key=jax.random.key(0), targets=r".*q_proj/kernel"))
    out = peft.save_merged(tmp_path / "m", params, lora, name_map="llama", config=cfg)
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    back_cfg = config_from_hf(tmp_path / "m")
    assert back_cfg == cfg
    merged = lora_jax.merge(params, lora)
    q = merged["params"]["layers_1"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(out["model.layers.1.self_attn.q_proj.weight"], np.asarray(q).T)
    assert "lm_head.weight" in out and len(out) == 2 + 9 * cfg.layers + 1
