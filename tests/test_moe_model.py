"""The Qwen3-MoE reference model (lora_jax.models.moe) against transformers' Qwen3MoeForCausalLM.

Reference data: tests/data/moe (tests/data/generators/make_moe_refs.py, see tests/data/README.md).
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_err

import lora_jax
from lora_jax import lora as L
from lora_jax.models import moe
from lora_jax.models.tensor_files import TensorFiles, write

DATA = os.path.join(os.path.dirname(__file__), "data", "moe")
MODEL = os.path.join(DATA, "model")


@pytest.fixture(scope="module")
def io():
    with np.load(os.path.join(DATA, "io.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def loaded():
    return moe.from_safetensors(MODEL)


def _logits(cfg, variables, ids):
    return np.asarray(jax.jit(moe.MoeModel(cfg).apply)(variables, jnp.asarray(ids, jnp.int32)))


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def test_logits_match_transformers(loaded, io):
    cfg, variables = loaded
    assert cfg.experts == 8 and cfg.top_k == 2 and cfg.norm_topk_prob
    assert not cfg.is_sparse(1) and cfg.is_sparse(0) and cfg.is_sparse(2)  # mlp_only_layers
    assert float(io["route_gap"]) > 1e-4  # float32 rounding cannot change the routing
    assert _rel(_logits(cfg, variables, io["input_ids"]), io["logits"]) <= 1e-4


def test_expert_mlp_against_a_loop_in_float64():
    """Sorted ragged_dot, unsorted and gate-weighted == each token through each chosen expert."""
    rng = np.random.default_rng(0)
    tokens, d, f, n, k = 10, 6, 4, 5, 2
    x = rng.standard_normal((tokens, d))
    experts = np.stack([rng.choice(n, k, replace=False) for _ in range(tokens)])
    gates = rng.random((tokens, k))
    gate_up = rng.standard_normal((n, d, 2 * f))
    down = rng.standard_normal((n, f, d))
    with jax.enable_x64(True):
        got = np.asarray(moe.expert_mlp(*map(jnp.asarray, (x, experts, gates, gate_up, down))))
    want = np.zeros((tokens, d))
    for t in range(tokens):
        for j in range(k):
            e = experts[t, j]
            h = x[t] @ gate_up[e]
            act = h[:f] / (1 + np.exp(-h[:f])) * h[f:]
            want[t] += gates[t, j] * (act @ down[e])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def _fused_checkpoint(tmp_path):
    """The reference checkpoint with each layer's experts as transformers 5's fused 3-D
    parameters (E, 2f, d) and (E, d, f)."""
    files = TensorFiles(MODEL)
    cfg = moe.config_from_hf(MODEL)
    out = {}
    for name in files.keys():
        if ".mlp.experts." not in name:
            out[name] = files.read(name)
    for i in range(cfg.layers):
        if not cfg.is_sparse(i):
            continue
        w = lambda j, p: files.read(f"model.layers.{i}.mlp.experts.{j}.{p}.weight")  # noqa: E731
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([w(j, "gate_proj"), w(j, "up_proj")]) for j in range(cfg.experts)])
        out[f"model.layers.{i}.mlp.experts.down_proj"] = np.stack(
            [w(j, "down_proj") for j in range(cfg.experts)])
    write(tmp_path / "model.safetensors", out)
    shutil.copy(os.path.join(MODEL, "config.json"), tmp_path / "config.json")
    return tmp_path


def test_fused_expert_layout_loads_the_same(tmp_path, loaded):
    _, want = loaded
    _, got = moe.from_safetensors(_fused_checkpoint(tmp_path))
    assert max_rel_err(got, want) == 0.0


def test_expert_sources_read_any_slice():
    """The per-expert layout's sources (stacked experts of concatenated gate|up) give the
    slices a mesh or a quantized load reads, as the whole array would."""
    from lora_jax.models import streaming

    rng = np.random.default_rng(2)
    gates = [rng.standard_normal((5, 3)) for _ in range(4)]  # (f, d) each, as torch stores
    ups = [rng.standard_normal((5, 3)) for _ in range(4)]
    source = moe.Stacked(tuple(moe.Concatenated((
        streaming.Transposed(streaming.Array(g), (1, 0)),
        streaming.Transposed(streaming.Array(u), (1, 0)))) for g, u in zip(gates, ups)))
    whole = np.stack([np.concatenate([g.T, u.T], axis=-1) for g, u in zip(gates, ups)])
    assert source.shape == whole.shape == (4, 3, 10)
    for index in [(slice(None),) * 3, (slice(1, 3), slice(None), slice(2, 8)),
                  (slice(3, 4), slice(0, 2), slice(5, 10)),
                  (slice(0, 4), slice(2, 3), slice(0, 5))]:
        np.testing.assert_array_equal(source.read(index), whole[index])


def test_quantized_load(loaded, io):
    """NF4 on load (the experts, to keep the test fast; the other kernels quantize the same
    way as in the Llama loader), blocks within each expert."""
    cfg, dense = loaded
    opts = {"format": "nf4", "targets": r".*/experts/.*"}
    _, q = moe.from_safetensors(MODEL, quantize=opts)
    experts = q["params"]["layers_0"]["mlp"]["experts"]
    for name, shape in (("gate_up_proj", (8, 32, 32)), ("down_proj", (8, 16, 32))):
        leaf = experts[name]["kernel"]
        assert lora_jax.quant.is_quantized(leaf) and leaf.shape == shape
        assert leaf.order[0] == 0  # the expert axis leads: blocks stay within one expert
    # As the dense load quantized with the expert axis as a stack axis, codes bit for bit.
    want = lora_jax.quantize(dense, stack_axes=moe.EXPERT_STACK_AXES, **opts)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(want)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    deq = lora_jax.quant.dequantize_tree(q)
    for a, b in zip(jax.tree.leaves(deq), jax.tree.leaves(dense)):  # NF4: a few percent RMS
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)) < 0.15
    err = _rel(_logits(cfg, deq, io["input_ids"]), io["logits"])
    assert 1e-3 < err < 0.3, err  # measured 0.14 (0.56 with every kernel in NF4)


def test_lora_on_experts_matches_the_merged_weights(loaded, io):
    """LoRA on the stacked expert kernels (explicit targets and stack axes) == the model run on
    W + s·A·B computed here per expert."""
    cfg, base = loaded
    lora = lora_jax.init(base, r=2, alpha=3.0, key=jax.random.key(0),
                         targets=[r".*/experts/\w+/kernel", r".*/q_proj/kernel"],
                         stack_axes=moe.EXPERT_STACK_AXES)
    rng = np.random.default_rng(1)
    lora = L.from_leaves({p: x.replace(b=jnp.asarray(0.3 * rng.standard_normal(x.b.shape),
                                                     jnp.float32))
                          for p, x in L.leaves(lora).items()})
    leaf = lora["params"]["layers_2"]["mlp"]["experts"]["gate_up_proj"]["kernel"]
    assert leaf.a.shape == (8, 32, 2) and leaf.b.shape == (8, 2, 32)
    merged = jax.tree.map(lambda x: x, base)
    for path, x in L.leaves(lora).items():
        keys = path.split("/")
        node = merged
        for k in keys[:-1]:
            node = node[k]
        a, b = np.asarray(x.a, np.float64), np.asarray(x.b, np.float64)
        delta = np.einsum("...ir,...ro->...io", a, b) * 3.0 / 2
        node[keys[-1]] = jnp.asarray(np.asarray(node[keys[-1]], np.float64) + delta, jnp.float32)
    ids = jnp.asarray(io["input_ids"], jnp.int32)
    got = jax.jit(lora_jax.apply(moe.MoeModel(cfg).apply))(base, lora, ids)
    want = _logits(cfg, merged, io["input_ids"])
    assert _rel(want, io["logits"]) > 0.05  # the adapters change the outputs
    assert _rel(got, want) <= 1e-5


def test_lora_on_experts_gradients_match_the_merged_formula(loaded, io):
    """d loss / d (a, b) through lora_jax.apply == through the model run on W + s·a·b
    written out in jnp (per expert)."""
    cfg, base = loaded
    lora = lora_jax.init(base, r=2, alpha=4.0, key=jax.random.key(5),
                         targets=r".*/experts/\w+/kernel", stack_axes=moe.EXPERT_STACK_AXES)
    rng = np.random.default_rng(6)
    lora = L.from_leaves({p: x.replace(b=jnp.asarray(0.3 * rng.standard_normal(x.b.shape),
                                                     jnp.float32))
                          for p, x in L.leaves(lora).items()})
    ids = jnp.asarray(io["input_ids"], jnp.int32)
    model = moe.MoeModel(cfg)
    weights = jnp.asarray(rng.standard_normal(io["logits"].shape), jnp.float32)

    def by_apply(lo):
        return jnp.sum(lora_jax.apply(model.apply)(base, lo, ids) * weights)

    def by_formula(lo):
        params = jax.tree.map(lambda x: x, base)
        for path, x in L.leaves(lo).items():
            node = params
            keys = path.split("/")
            for k in keys[:-1]:
                node = node[k]
            node[keys[-1]] = node[keys[-1]] + jnp.einsum("eir,ero->eio", x.a, x.b) * x.scale
        return jnp.sum(model.apply(params, ids) * weights)

    got = jax.jit(jax.grad(by_apply))(lora)
    want = jax.jit(jax.grad(by_formula))(lora)
    assert max_rel_err(got, want) < 1e-4
    assert float(jnp.abs(got["params"]["layers_0"]["mlp"]["experts"]["down_proj"]["kernel"].a)
                 .max()) > 0


def _edit_config(tmp_path, **changes):
    for name in os.listdir(MODEL):
        shutil.copy(os.path.join(MODEL, name), tmp_path / name)
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    config.update(changes)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    return tmp_path


@pytest.mark.parametrize("changes, message", [
    ({"some_new_option": 1}, r"unknown config keys \['some_new_option'\]"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"use_sliding_window": True}, "use_sliding_window=True"),
    ({"shared_expert_intermediate_size": 64}, "shared_expert_intermediate_size=64"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
     "rope_type='yarn'"),
    ({"model_type": "qwen2_moe"}, "model_type='qwen2_moe'"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step=0"),
])
def test_config_refuses_what_it_does_not_compute(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        moe.config_from_hf(_edit_config(tmp_path, **changes))


def test_config_sparse_layers_follow_hugging_face():
    base = moe.config_from_hf(MODEL)
    cfg = moe.config_from_hf(os.path.join(MODEL, "config.json"))
    assert cfg == base
    with open(os.path.join(MODEL, "config.json")) as f:
        config = json.load(f)
    config.update(decoder_sparse_step=2, mlp_only_layers=[], num_hidden_layers=4)
    cfg = moe.config_from_hf(config)
    # Qwen3MoeDecoderLayer: experts when (i + 1) % decoder_sparse_step == 0
    assert [cfg.is_sparse(i) for i in range(4)] == [False, True, False, True]


def _without(tmp_path, drop=(), rename=None):
    files = TensorFiles(MODEL)
    out = {(rename or {}).get(n, n): files.read(n) for n in files.keys() if n not in drop}
    write(tmp_path / "model.safetensors", out)
    shutil.copy(os.path.join(MODEL, "config.json"), tmp_path / "config.json")
    return tmp_path


def test_missing_expert_tensor_is_named(tmp_path):
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    with pytest.raises(ValueError, match=r"layer 2 misses expert tensors \['" + name):
        moe.from_safetensors(_without(tmp_path, drop=[name]))


def test_wrong_expert_count(tmp_path):
    (tmp_path / "fewer").mkdir()
    with pytest.raises(ValueError, match=r"experts \[4, 5, 6, 7\].*num_experts=4"):
        moe.from_safetensors(_edit_config(tmp_path / "fewer", num_local_experts=4))
    (tmp_path / "more").mkdir()
    with pytest.raises(ValueError, match=r"misses expert tensors.*experts\.8\.gate_proj"):
        moe.from_safetensors(_edit_config(tmp_path / "more", num_local_experts=9))
    (tmp_path / "fused").mkdir()
    cfg = moe.config_from_hf(MODEL, experts=4)
    with pytest.raises(ValueError, match=r"gate_up_proj' has shape \(8, 32, 32\), expected "
                                         r"\(4, 32, 32\).*num_experts=4"):
        moe.from_safetensors(_fused_checkpoint(tmp_path / "fused"), cfg)


def test_unexpected_and_misplaced_tensors(tmp_path):
    (tmp_path / "renamed").mkdir()
    rename = {"model.layers.0.mlp.gate.weight": "model.layers.0.mlp.router.weight"}
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.mlp.router.weight'"):
        moe.from_safetensors(_without(tmp_path / "renamed", rename=rename))
    # with layer 0 dense too, its expert tensors have no place
    (tmp_path / "dense").mkdir()
    with pytest.raises(ValueError, match=r"expert tensors .*layers\.0.*layers without experts"):
        moe.from_safetensors(_edit_config(tmp_path / "dense", mlp_only_layers=[0, 1]))


# --------------------------------------------------------------------------- PEFT experts

PEFT_DIR = os.path.join(DATA, "peft_lora")


def test_peft_expert_adapter_matches_peft_logits(loaded, io):
    """PEFT's target_parameters (ParamWrapper) adapter on the 3-D experts, and target_modules
    on q/v: loaded, applied on our model == PEFT's logits."""
    cfg, base = loaded
    lora = lora_jax.peft.load(PEFT_DIR, base, name_map="qwen3_moe")
    gate_up = lora["params"]["layers_0"]["mlp"]["experts"]["gate_up_proj"]["kernel"]
    assert (gate_up.a.shape, gate_up.b.shape, gate_up.scale) == ((8, 32, 4), (8, 4, 32), 2.0)
    assert "experts" not in lora["params"]["layers_1"].get("mlp", {})
    ids = jnp.asarray(io["input_ids"], jnp.int32)
    got = jax.jit(lora_jax.apply(moe.MoeModel(cfg).apply))(base, lora, ids)
    assert _rel(io["peft_logits"], io["logits"]) > 0.5  # the adapter matters
    assert _rel(got, io["peft_logits"]) <= 1e-4


def test_peft_expert_factors_by_hand(loaded):
    """Expert e's update is scaling · B[:, :, e] @ A[e] with A = lora_A.reshape(E, r, in),
    B = lora_B.reshape(out, r, E) (PEFT ParamWrapper.get_delta_weight), as a (out, in)
    weight: our (in, out) kernel's update is its transpose."""
    from safetensors.numpy import load_file

    _, base = loaded
    tensors = load_file(os.path.join(PEFT_DIR, "adapter_model.safetensors"))
    lora = lora_jax.peft.load(PEFT_DIR, base, name_map="qwen3_moe")
    head = "base_model.model.model.layers.2.mlp.experts."
    for param, prefix, (n_in, n_out) in (("gate_up_proj", head + "base_layer.", (32, 32)),
                                         ("down_proj", head, (16, 32))):
        a = tensors[prefix + "lora_A.weight"].astype(np.float64).reshape(8, 4, n_in)
        b = tensors[prefix + "lora_B.weight"].astype(np.float64).reshape(n_out, 4, 8)
        want = np.einsum("ore,eri->eio", b, a) * 8 / 4  # (E, in, out)
        leaf = lora["params"]["layers_2"]["mlp"]["experts"][param]["kernel"]
        got = np.asarray(leaf.delta(), np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_peft_expert_adapter_saves_as_peft_wrote_it(loaded, tmp_path):
    _, base = loaded
    from safetensors.numpy import load_file

    lora = lora_jax.peft.load(PEFT_DIR, base, name_map="qwen3_moe")
    cfg = lora_jax.peft.save(tmp_path, lora, name_map="qwen3_moe")
    ours = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    theirs = load_file(os.path.join(PEFT_DIR, "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert np.array_equal(ours[k], theirs[k]), k
    with open(os.path.join(PEFT_DIR, "adapter_config.json")) as f:
        peft_cfg = json.load(f)
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"]) == (
        peft_cfg["r"], peft_cfg["lora_alpha"], {}, {})
    # PEFT matches both spellings: full names, or suffixes as the reference config has them
    assert all(any(k.endswith("." + t) for t in peft_cfg["target_parameters"])
               for k in cfg["target_parameters"])
    assert len(cfg["target_parameters"]) == 4  # 2 sparse layers x 2 parameters


def test_peft_expert_roundtrip_with_rank_pattern(loaded, io, tmp_path):
    """Different ranks and alphas per expert parameter (rank_pattern/alpha_pattern keyed by
    the parameter's name), one parameter alone in its module (no base_layer nesting)."""
    cfg, base = loaded
    key = jax.random.key(3)
    first = lora_jax.init(base, r=3, alpha=5.0, key=key, targets=r".*/experts/gate_up_proj/kernel",
                          stack_axes=moe.EXPERT_STACK_AXES)
    second = lora_jax.init(base, r=2, alpha=7.0, key=key,
                           targets=[r".*layers_0/mlp/experts/down_proj/kernel", ".*o_proj/kernel"],
                           stack_axes=moe.EXPERT_STACK_AXES)
    rng = np.random.default_rng(4)
    leaves = {**L.leaves(first), **L.leaves(second)}
    leaves = {p: x.replace(b=jnp.asarray(0.3 * rng.standard_normal(x.b.shape), jnp.float32))
              for p, x in leaves.items()}
    lora = L.from_leaves(leaves)
    saved = lora_jax.peft.save(tmp_path, lora, name_map="qwen3_moe")
    assert "model.layers.2.mlp.experts.gate_up_proj" in saved["target_parameters"]
    assert "model.layers.2.mlp.experts.down_proj" not in saved["target_parameters"]
    from safetensors.numpy import load_file

    keys = set(load_file(os.path.join(tmp_path, "adapter_model.safetensors")))
    # layer 2: gate_up_proj alone -> no base_layer; layer 0: gate_up_proj inside down_proj's
    assert "base_model.model.model.layers.2.mlp.experts.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in keys
    back = lora_jax.peft.load(tmp_path, base, name_map="qwen3_moe")
    assert sorted(L.leaves(back)) == sorted(leaves)
    for p, x in leaves.items():
        y = L.leaves(back)[p]
        assert y.scale == x.scale and y.r == x.r, p
        assert max_rel_err(y.delta(), x.delta()) < 1e-6, p


def _peft_copy(tmp_path, change_config=None, drop=()):
    from safetensors.numpy import load_file, save_file

    tmp_path.mkdir()
    with open(os.path.join(PEFT_DIR, "adapter_config.json")) as f:
        config = json.load(f)
    config.update(change_config or {})
    with open(tmp_path / "adapter_config.json", "w") as f:
        json.dump(config, f)
    tensors = {k: v for k, v in load_file(os.path.join(PEFT_DIR, "adapter_model.safetensors"))
               .items() if k not in drop}
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    return tmp_path


def test_peft_expert_bad_inputs(loaded, tmp_path):
    _, base = loaded
    load = lora_jax.peft.load
    bad = _peft_copy(tmp_path / "a",
                     {"target_parameters": ["mlp.experts.gate_proj", "mlp.experts.down_proj"]})
    with pytest.raises(ValueError, match=r"target_parameters entry 'mlp.experts.gate_proj' "
                                         r"names no parameter"):
        load(bad, base, name_map="qwen3_moe")
    missing = "base_model.model.model.layers.2.mlp.experts.base_layer.lora_B.weight"
    bad = _peft_copy(tmp_path / "b", drop=[missing])
    with pytest.raises(ValueError, match=f"no tensor '{missing}'"):
        load(bad, base, name_map="qwen3_moe")
    bad = _peft_copy(tmp_path / "c", {"r": 2})
    with pytest.raises(ValueError, match=r"experts.lora_A.weight' has shape \(32, 16\), "
                                         r"expected \(16, 16\) \(r=2, 8 experts"):
        load(bad, base, name_map="qwen3_moe")
    with pytest.raises(ValueError, match="target_parameters.*name_map='llama' has none"):
        load(PEFT_DIR, base, name_map="llama")


def test_peft_expert_save_refuses_what_peft_cannot_read(loaded, tmp_path):
    _, base = loaded
    flat = lora_jax.init(base, r=2, key=jax.random.key(0), targets=r".*/experts/down_proj/kernel")
    with pytest.raises(ValueError, match=r"down_proj/kernel' must be laid out as \(experts, in, "
                                         r"out\) with one stack axis"):
        lora_jax.peft.save(tmp_path / "a", flat, name_map="qwen3_moe")
    dropped = lora_jax.init(base, r=2, key=jax.random.key(0), dropout=0.1,
                            targets=r".*/experts/down_proj/kernel",
                            stack_axes=moe.EXPERT_STACK_AXES)
    with pytest.raises(ValueError, match="dropout 0.1; PEFT's target_parameters adapters refuse"):
        lora_jax.peft.save(tmp_path / "b", dropped, name_map="qwen3_moe")


def test_qwen3_moe_name_map_agrees_with_the_loader(loaded):
    """Every adaptable parameter's PEFT module is its Hugging Face tensor name without
    ``.weight`` (as transformers names the modules); the expert kernels are parameters."""
    from lora_jax.peft.experts import EXPERT_MAPS
    from lora_jax.peft.names import map_parts, resolve

    cfg, base = loaded
    fn = resolve("qwen3_moe")
    for hf, where in moe.hf_names(cfg).items():
        path = "/".join(("params",) + where)
        assert [p.template for p in map_parts(fn, path)] == [hf.removesuffix(".weight")], path
    emap = EXPERT_MAPS["qwen3_moe"]
    for i in (0, 2):
        for p in ("gate_up_proj", "down_proj"):
            path = f"params/layers_{i}/mlp/experts/{p}/kernel"
            assert map_parts(fn, path) is None
            assert emap.lookup(path) == (f"model.layers.{i}.mlp.experts", p)


def _legacy_adapter(folder, cfg, targets, r=2, alpha=6, seed=11):
    """A PEFT folder in transformers 4's per-expert module layout (``mlp.experts.{j}.gate_proj``
    ... as Linear modules) with random factors; returns the tensors."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    f = cfg.expert_ffn
    shapes = {"gate_proj": (f, cfg.d), "up_proj": (f, cfg.d), "down_proj": (cfg.d, f)}
    dense = {"gate_proj": (cfg.ffn, cfg.d), "up_proj": (cfg.ffn, cfg.d),
             "down_proj": (cfg.d, cfg.ffn)}
    tensors = {}
    for i in range(cfg.layers):
        mods = ({f"model.layers.{i}.mlp.experts.{j}.{p}": shapes[p]
                 for j in range(cfg.experts) for p in targets} if cfg.is_sparse(i)
                else {f"model.layers.{i}.mlp.{p}": dense[p] for p in targets})
        for name, (n_out, n_in) in mods.items():
            key = "base_model.model." + name
            tensors[key + ".lora_A.weight"] = (0.3 * rng.standard_normal((r, n_in))).astype(
                np.float32)
            tensors[key + ".lora_B.weight"] = (0.3 * rng.standard_normal((n_out, r))).astype(
                np.float32)
    os.makedirs(folder)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as fh:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets,
                   "lora_dropout": 0.0, "bias": "none"}, fh)
    return tensors


@pytest.mark.parametrize("targets", [["gate_proj", "up_proj", "down_proj"], ["up_proj"]])
def test_per_expert_module_adapter_matches_merged_weights(loaded, io, tmp_path, targets):
    """Adapters of older transformers' per-expert Linear modules load into the stacked kernels
    (gate and up ranks stacked in gate_up_proj): == the model on W + scale·B@A per expert
    module, merged here in float64. (PEFT 0.21 itself converts such folders for transformers
    5 but then drops the dense layers' gate/up/down_proj adapters: checked by hand, see the
    report.)"""
    cfg, base = loaded
    tensors = _legacy_adapter(tmp_path / "legacy", cfg, targets)
    lora = lora_jax.peft.load(tmp_path / "legacy", base, name_map="qwen3_moe")
    merged = jax.tree.map(lambda x: np.asarray(x, np.float64), base)

    def delta(name):
        key = "base_model.model." + name
        a, b = (tensors[f"{key}.lora_{m}.weight"].astype(np.float64) for m in "AB")
        return (b @ a).T * 6 / 2  # Flax (in, out)

    f = cfg.expert_ffn
    for i in range(cfg.layers):
        mlp = merged["params"][f"layers_{i}"]["mlp"]
        if not cfg.is_sparse(i):
            for p in targets:
                mlp[p]["kernel"] += delta(f"model.layers.{i}.mlp.{p}")
            continue
        for j in range(cfg.experts):
            for p in targets:
                d = delta(f"model.layers.{i}.mlp.experts.{j}.{p}")
                if p == "down_proj":
                    mlp["experts"]["down_proj"]["kernel"][j] += d
                else:
                    cols = slice(0, f) if p == "gate_proj" else slice(f, 2 * f)
                    mlp["experts"]["gate_up_proj"]["kernel"][j][:, cols] += d
    want = _logits(cfg, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), merged),
                   io["input_ids"])
    got = jax.jit(lora_jax.apply(moe.MoeModel(cfg).apply))(
        base, lora, jnp.asarray(io["input_ids"], jnp.int32))
    assert _rel(want, io["logits"]) > 0.05
    assert _rel(got, want) <= 1e-5


def test_save_warns_where_peft_would_drop_dense_mlp_adapters(loaded, tmp_path):
    """PEFT 0.21 + transformers 5 converts target_modules named gate/up/down_proj of a
    Qwen3-MoE into expert parameters: a dense layer's MLP adapter would be ignored there."""
    _, base = loaded
    lora = lora_jax.init(base, r=2, key=jax.random.key(0), targets=r".*layers_1/mlp/up_proj/kernel")
    with pytest.warns(UserWarning, match=r"model.layers.1.mlp.up_proj.*ignores"):
        lora_jax.peft.save(tmp_path / "a", lora, name_map="qwen3_moe")
    lora = lora_jax.init(base, r=2, key=jax.random.key(0), targets=r".*q_proj/kernel")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora_jax.peft.save(tmp_path / "b", lora, name_map="qwen3_moe")
