"""Every Hugging Face config key that changes Llama's math is honoured or refused.

References: ``tests/data/llama_config/<case>/`` holds random tiny ``LlamaForCausalLM`` checkpoints
saved by transformers 5.25 (``save_pretrained``) with the logits transformers computes for
``io.npz``'s input ids (generator: ``tests/data/generators/make_llama_config_refs.py``).
Each case differs from the plain one in one config key; the tests require the loaded model to
match transformers' logits and show that ignoring the key would miss them by far more than the
tolerance.
"""

import dataclasses
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from lora_jax.models import llama as L

DATA = os.path.join(os.path.dirname(__file__), "data", "llama_config")
CASES = ["default", "rope_theta_1e6", "rope_llama3", "rope_linear", "rope_yarn", "gelu",
         "gelu_pytorch_tanh", "biases", "head_dim_16", "untied"]
TOL = 1e-4  # max |diff| <= TOL * max |logit|


def logits_of(cfg, variables, ids):
    return np.asarray(jax.jit(L.Llama(cfg).apply)(variables, jnp.asarray(ids)))


def reference(case):
    io = np.load(os.path.join(DATA, case, "io.npz"))
    return io["input_ids"].astype(np.int32), io["logits"]


def rel_diff(got, want):
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def plain_math(case, cfg, variables):
    """The config and variables of the same weights with the case's key at its default."""
    params = variables["params"]
    if case == "rope_theta_1e6":
        return dataclasses.replace(cfg, rope_theta=10000.0), variables
    if case in ("rope_llama3", "rope_linear", "rope_yarn"):
        return dataclasses.replace(cfg, rope_type="default", rope_factor=None,
                                   rope_low_freq_factor=None, rope_high_freq_factor=None,
                                   rope_original_max_len=None, rope_beta_fast=None,
                                   rope_beta_slow=None, rope_attention_factor=None,
                                   rope_truncate=None), variables
    if case in ("gelu", "gelu_pytorch_tanh"):
        return dataclasses.replace(cfg, activation="silu"), variables
    if case == "biases":
        no_bias = jax.tree_util.tree_map_with_path(
            lambda path, x: None if path[-1].key == "bias" else x, params)
        return (dataclasses.replace(cfg, attention_bias=False, mlp_bias=False),
                {"params": jax.tree.map(lambda x: x, no_bias)})
    if case == "untied":
        rest = {k: v for k, v in params.items() if k != "lm_head"}
        return dataclasses.replace(cfg, tied=True), {"params": rest}
    raise AssertionError(case)


@pytest.mark.parametrize("case", CASES)
def test_matches_transformers(case):
    cfg, variables = L.from_safetensors(os.path.join(DATA, case))
    ids, want = reference(case)
    got = logits_of(cfg, variables, ids)
    assert rel_diff(got, want) <= TOL, (case, rel_diff(got, want))
    if case in ("default", "head_dim_16"):
        return
    # the key matters: the same weights under the plain math miss by far more than TOL
    plain_cfg, plain_vars = plain_math(case, cfg, variables)
    assert rel_diff(logits_of(plain_cfg, plain_vars, ids), want) > 30 * TOL, case


def test_config_fields_read():
    cfg = L.config_from_hf(os.path.join(DATA, "rope_llama3"))
    assert (cfg.rope_type, cfg.rope_theta, cfg.rope_factor, cfg.rope_low_freq_factor,
            cfg.rope_high_freq_factor, cfg.rope_original_max_len) == \
        ("llama3", 5e5, 8.0, 1.0, 4.0, 16)
    # original_max_position_embeddings defaults to the file's max_position_embeddings, also when
    # max_len is overridden
    rope = {k: v for k, v in config("rope_llama3")["rope_parameters"].items()
            if k != "original_max_position_embeddings"}
    short = L.config_from_hf(config("rope_llama3", rope_parameters=rope), max_len=8)
    assert (short.max_len, short.rope_original_max_len) == (8, 64)
    top = config("rope_llama3", original_max_position_embeddings=32)
    assert L.config_from_hf(top).rope_original_max_len == 32
    assert L.config_from_hf(os.path.join(DATA, "head_dim_16")).head_dim == 16
    assert L.config_from_hf(os.path.join(DATA, "gelu")).activation == "gelu"
    assert not L.config_from_hf(os.path.join(DATA, "untied")).tied
    biases = L.config_from_hf(os.path.join(DATA, "biases"))
    assert biases.attention_bias and biases.mlp_bias


def test_yarn_attention_factor_as_transformers_infers_it():
    """0.1 ln(factor) + 1, or the ratio of the two mscale terms; an explicit one wins."""
    rope = config("rope_yarn")["rope_parameters"]
    assert L.config_from_hf(config("rope_yarn")).rope_attention_factor == \
        pytest.approx(0.1 * math.log(4) + 1)
    both = config("rope_yarn", rope_parameters={**rope, "mscale": 2.0, "mscale_all_dim": 0.5})
    assert L.config_from_hf(both).rope_attention_factor == \
        pytest.approx((0.2 * math.log(4) + 1) / (0.05 * math.log(4) + 1))
    given = config("rope_yarn", rope_parameters={**rope, "attention_factor": 1.5, "mscale": 2.0})
    assert L.config_from_hf(given).rope_attention_factor == 1.5
    # factor null: max_position_embeddings / original_max_position_embeddings = 1024 / 256
    implicit = L.config_from_hf(config("rope_yarn", rope_parameters={**rope, "factor": None}))
    assert implicit == L.config_from_hf(config("rope_yarn"))


def test_head_dim_is_not_hidden_over_heads():
    # hidden 32 / 4 heads = 8, but the checkpoint's heads are 16 wide
    with pytest.raises(ValueError, match=r"self_attn/[qk]_proj/kernel: the checkpoint holds"):
        L.from_safetensors(os.path.join(DATA, "head_dim_16"),
                           L.config_from_hf(os.path.join(DATA, "head_dim_16"), head_dim=8))


def test_gelu_erf_and_tanh_differ():
    """gelu (erf) and gelu_pytorch_tanh are not swapped: each misses the other's logits."""
    for case, other in (("gelu", "gelu_pytorch_tanh"), ("gelu_pytorch_tanh", "gelu")):
        cfg, variables = L.from_safetensors(os.path.join(DATA, case))
        ids, want = reference(case)
        right = rel_diff(logits_of(cfg, variables, ids), want)
        swapped = rel_diff(logits_of(dataclasses.replace(cfg, activation=other), variables, ids),
                           want)
        # the two GELUs differ by ~1e-3 at most, so the logits move by only a few TOL
        assert swapped > 2 * TOL and swapped > 50 * right, (case, right, swapped)


def v4_spelling(config):
    """The transformers 4 spelling of a transformers 5 config.json: top-level rope_theta,
    rope_scaling with ``type``."""
    out = dict(config)
    rope = dict(out.pop("rope_parameters"))
    out["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    if rope_type != "default":
        out["rope_scaling"] = {"type": rope_type, **rope}
    return out


@pytest.mark.parametrize("case", ["rope_theta_1e6", "rope_llama3", "rope_linear", "rope_yarn"])
def test_transformers4_spelling(case, tmp_path):
    folder = tmp_path / case
    shutil.copytree(os.path.join(DATA, case), folder)
    config = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" in config and "rope_theta" not in config
    old = v4_spelling(config)
    (folder / "config.json").write_text(json.dumps(old))
    cfg, variables = L.from_safetensors(folder)
    assert cfg == L.config_from_hf(os.path.join(DATA, case))
    ids, want = reference(case)
    assert rel_diff(logits_of(cfg, variables, ids), want) <= TOL
    # "rope_type" inside rope_scaling (transformers >= 4.43) reads the same
    if "rope_scaling" in old:
        old["rope_scaling"]["rope_type"] = old["rope_scaling"].pop("type")
        assert L.config_from_hf(old) == cfg


@pytest.mark.parametrize("case", CASES)
def test_config_to_hf_round_trip(case):
    cfg = L.config_from_hf(os.path.join(DATA, case))
    assert L.config_from_hf(L.config_to_hf(cfg)) == cfg
    assert L.config_from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg


def test_activations_match_transformers_formulas():
    x = np.random.default_rng(0).normal(0, 3, 257)
    erf = np.vectorize(math.erf)
    tanh_gelu = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    want = {
        "silu": x / (1 + np.exp(-x)), "swish": x / (1 + np.exp(-x)),
        "gelu": 0.5 * x * (1 + erf(x / math.sqrt(2))),
        "gelu_python": 0.5 * x * (1 + erf(x / math.sqrt(2))),
        "gelu_new": tanh_gelu, "gelu_pytorch_tanh": tanh_gelu, "gelu_python_tanh": tanh_gelu,
        "gelu_fast": 0.5 * x * (1 + np.tanh(x * 0.7978845608 * (1 + 0.044715 * x * x))),
        "relu": np.maximum(x, 0),
    }
    assert sorted(want) == sorted(L.ACTIVATIONS)
    for name, ref in want.items():
        got = np.asarray(L.ACTIVATIONS[name](jnp.asarray(x, jnp.float32)))
        np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6, err_msg=name)


def test_rope_frequencies_llama3_bands():
    """llama3 scaling, by hand: long wavelengths / factor, short kept, the band between mixed."""
    cfg = L.LlamaConfig(vocab=8, d=64, layers=1, heads=2, kv_heads=2, ffn=8, rope_theta=5e5,
                        rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                        rope_high_freq_factor=4.0, rope_original_max_len=64)
    base = 1.0 / 5e5 ** (np.arange(0, 32, 2) / 32)
    wavelen = 2 * np.pi / base
    got = L.rope_frequencies(cfg)
    short, long = wavelen < 16, wavelen > 64
    middle = ~short & ~long
    assert short.any() and long.any() and middle.any()
    np.testing.assert_allclose(got[short], base[short], rtol=1e-6)
    np.testing.assert_allclose(got[long], base[long] / 8, rtol=1e-6)
    smooth = (64 / wavelen[middle] - 1) / 3
    np.testing.assert_allclose(got[middle], (1 - smooth) * base[middle] / 8
                               + smooth * base[middle], rtol=1e-6)


# --------------------------------------------------------------------------- refusals


def config(case="default", **changes):
    with open(os.path.join(DATA, case, "config.json")) as f:
        out = json.load(f)
    out.update(changes)
    return out


@pytest.mark.parametrize("changes, message", [
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
     r"rope_parameters\['rope_type'\]='dynamic' is not supported; supported: \['default'"),
    ({"rope_parameters": None, "rope_scaling": {"type": "longrope", "factor": 2.0}},
     r"rope_scaling\['rope_type'\]='longrope'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "beta_fast": 32}},
     r"rope_parameters\['beta_fast'\]"),
    ({"rope_parameters": {"rope_type": "linear"}}, "rope_factor"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                          "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"rope_theta": 5e5}, r"rope_theta=500000.0 and rope_parameters\['rope_theta'\]"),
    ({"hidden_act": "mish"}, r"hidden_act='mish' is not supported; supported: \["),
    ({"foo_scale": 2.0}, r"foo_scale=2.0.*ignore_keys=\('foo_scale',\)"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps=nan"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps=0.0"),
    ({"hidden_size": -8}, "hidden_size=-8"),
    ({"vocab_size": 64.0}, "vocab_size=64.0"),
    ({"num_hidden_layers": 0}, "num_hidden_layers=0"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
    ({"intermediate_size": None}, "intermediate_size"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings='false'"),
    ({"attention_bias": 1}, "attention_bias=1"),
    ({"pretraining_tp": 2}, "pretraining_tp=2"),
    ({"attention_dropout": 0.1}, r"attention_dropout=0.1.*ignore_keys=\('attention_dropout',\)"),
    ({"sliding_window": 4096}, "sliding_window=4096"),
    ({"use_sliding_window": True}, "use_sliding_window=True"),
    ({"model_type": "mistral"}, "model_type='mistral'"),
    ({"rope_interleaved": True}, "rope_interleaved=True"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
])
def test_refuses_bad_or_unknown_keys(changes, message):
    with pytest.raises(ValueError, match=message):
        L.config_from_hf(config(**changes))


def test_transformers4_era_keys_at_their_neutral_values_load():
    """Keys real Llama / SmolLM2 config.json files carry, at values that change nothing."""
    plain = L.config_from_hf(config())
    legacy = config(rope_scaling=None, pretraining_tp=1, attention_dropout=0.0,
                    torch_dtype="bfloat16", is_llama_config=True, rope_interleaved=False,
                    sliding_window=None, use_sliding_window=False, _name_or_path="x")
    assert L.config_from_hf(legacy) == plain


def test_ignore_keys():
    plain = L.config_from_hf(config())
    assert L.config_from_hf(config(foo_scale=2.0), ignore_keys=("foo_scale",)) == plain
    assert L.config_from_hf(config(attention_dropout=0.1),
                            ignore_keys=["attention_dropout"]) == plain
    with pytest.raises(ValueError, match="hidden_act"):
        L.config_from_hf(config(), ignore_keys=("hidden_act",))


def test_from_safetensors_refuses_and_names(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(os.path.join(DATA, "default"), folder)
    with pytest.raises(ValueError, match=r"dtype=.*int8.*not a floating"):
        L.from_safetensors(folder, dtype=jnp.int8)
    (folder / "config.json").write_text(json.dumps(config(rms_norm_eps=float("nan"))))
    with pytest.raises(ValueError, match=r"config\.json: rms_norm_eps=nan"):
        L.from_safetensors(folder)
    (folder / "config.json").write_text(json.dumps(config(foo_scale=2.0)))
    with pytest.raises(ValueError, match="foo_scale"):
        L.from_safetensors(folder)
    cfg, _ = L.from_safetensors(folder, ignore_keys=("foo_scale",))
    assert cfg == L.config_from_hf(config())


def test_tied_config_with_a_different_head_is_refused(tmp_path):
    from safetensors.numpy import save_file

    folder = tmp_path / "m"
    shutil.copytree(os.path.join(DATA, "untied"), folder)
    (folder / "config.json").write_text(json.dumps(config("untied", tie_word_embeddings=True)))
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        L.from_safetensors(folder)
    # a tied checkpoint that stores its head as a copy of the embedding loads
    weights = load_file(str(folder / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].copy()
    save_file(weights, str(folder / "model.safetensors"))
    cfg, _ = L.from_safetensors(folder)
    assert cfg.tied


@pytest.mark.parametrize("fields, message", [
    ({"d": -8}, "d=-8"),
    ({"rms_eps": float("nan")}, "rms_eps=nan"),
    ({"rope_factor": 4.0}, "rope_factor=4.0 has no effect with rope_type='default'"),
    ({"rope_type": "dynamic"}, "rope_type='dynamic' is not supported"),
    ({"rope_type": "yarn", "rope_factor": 4.0, "rope_truncate": 1}, "rope_truncate=1"),
    ({"rope_type": "llama3", "rope_factor": 8.0, "rope_low_freq_factor": 4.0,
      "rope_high_freq_factor": 1.0}, "rope_high_freq_factor=1.0 must exceed"),
    ({"activation": "tanh"}, "activation='tanh'"),
    ({"dtype": "int8"}, "dtype='int8'"),
    ({"tied": "no"}, "tied='no'"),
])
def test_llama_config_validates(fields, message):
    base = dict(vocab=16, d=16, layers=1, heads=2, kv_heads=1, ffn=16)
    with pytest.raises(ValueError, match=message):
        L.LlamaConfig(**{**base, **fields})


# --------------------------------------------------------------------------- GGUF metadata


def write_gguf(case, path, meta=None, drop=(), extra_tensors=None, block_count=None,
               freqs=True):
    """The case's transformers checkpoint as a float32 llama GGUF, written as llama.cpp's
    converter writes one (q/k rows permuted, llama3 RoPE as a ``rope_freqs.weight`` tensor)."""
    gguf = pytest.importorskip("gguf")
    from lora_jax.models.gguf import permute_qk

    folder = os.path.join(DATA, case)
    hf = json.load(open(os.path.join(folder, "config.json")))
    weights = load_file(os.path.join(folder, "model.safetensors"))
    heads, kv_heads = hf["num_attention_heads"], hf["num_key_value_heads"]
    tensors = {"token_embd.weight": weights["model.embed_tokens.weight"],
               "output_norm.weight": weights["model.norm.weight"]}
    if "lm_head.weight" in weights:
        tensors["output.weight"] = weights["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(hf["num_hidden_layers"]):
        for hf_name, name in names.items():
            w = weights[f"model.layers.{i}.{hf_name}.weight"]
            if name == "attn_q":
                w = permute_qk(w, heads)
            elif name == "attn_k":
                w = permute_qk(w, kv_heads)
            tensors[f"blk.{i}.{name}.weight"] = w
    rope = hf["rope_parameters"]
    head_dim = hf["head_dim"]
    if rope["rope_type"] == "llama3" and freqs:
        # convert_hf_to_gguf.py: LlamaModel's rope_freqs, one divisor per frequency
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        factors = []
        for freq in 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim):
            wavelen = 2 * math.pi / freq
            if wavelen < old_len / high:
                factors.append(1.0)
            elif wavelen > old_len / low:
                factors.append(factor)
            else:
                smooth = (old_len / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        tensors["rope_freqs.weight"] = np.asarray(factors, np.float32)
    tensors.update(extra_tensors or {})
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(hf["num_hidden_layers"] if block_count is None else block_count)
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_vocab_size(hf["vocab_size"])
    if rope["rope_type"] == "linear":
        w.add_string("llama.rope.scaling.type", "linear")
        w.add_float32("llama.rope.scaling.factor", rope["factor"])
    for key, value in (meta or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_float32(key, value)
    for name, x in tensors.items():
        if name not in drop:
            w.add_tensor(name, np.ascontiguousarray(x, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.mark.parametrize("case", ["default", "rope_theta_1e6", "rope_llama3", "rope_linear",
                                  "untied"])
def test_gguf_matches_transformers(case, tmp_path):
    from lora_jax.models import gguf as G

    cfg, variables = G.load_llama(write_gguf(case, tmp_path / "m.gguf"))
    ids, want = reference(case)
    assert rel_diff(logits_of(cfg, variables, ids), want) <= TOL, case
    if case == "rope_llama3":
        assert cfg.rope_freq_factors is not None
        # without its rope_freqs.weight the same file misses by far
        cfg, variables = G.load_llama(write_gguf(case, tmp_path / "plain.gguf", freqs=False))
        assert rel_diff(logits_of(cfg, variables, ids), want) > 30 * TOL
        with pytest.raises(ValueError, match="rope_freq_factors"):
            L.config_to_hf(G.llama_config(G.read(tmp_path / "m.gguf").metadata,
                                          rope_freq_factors=(1.0,) * 4))
    if case == "rope_linear":
        assert (cfg.rope_type, cfg.rope_factor) == ("linear", 4.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"block_count": 0}, "llama.block_count=0"),
    ({"block_count": 1}, r"llama.block_count=1 but the file has blk.N.\* tensors"),
    ({"block_count": 3}, "llama.block_count=3"),
    ({"meta": {"llama.expert_count": 4}}, "llama.expert_count=4"),
    ({"meta": {"llama.rope.scaling.type": "yarn"}}, "llama.rope.scaling.type='yarn'"),
    ({"meta": {"llama.attention.layer_norm_rms_epsilon": float("nan")}},
     "llama.attention.layer_norm_rms_epsilon=nan"),
    ({"meta": {"llama.attention.value_length": 4}}, "llama.attention.value_length=4"),
    ({"meta": {"llama.logit_scale": 0.5}}, "llama.logit_scale=0.5"),
    ({"extra_tensors": {"blk.0.attn_q.bias": np.ones(32, np.float32)}}, "blk.0.attn_q.bias"),
])
def test_gguf_refuses_and_names(kwargs, message, tmp_path):
    from lora_jax.models import gguf as G

    path = write_gguf("default", tmp_path / "m.gguf", **kwargs)
    with pytest.raises(ValueError, match=message):
        G.load_llama(path)


def test_gguf_int_dtype_is_refused(tmp_path):
    from lora_jax.models import gguf as G

    with pytest.raises(ValueError, match=r"load_llama: dtype=.*int8.*not a floating"):
        G.load_llama(write_gguf("default", tmp_path / "m.gguf"), dtype=jnp.int8)


def test_gguf_rope_dimension_count_must_be_head_dim():
    from lora_jax.models import gguf as G

    meta = {"general.architecture": "llama", "llama.block_count": 2,
            "llama.embedding_length": 32, "llama.feed_forward_length": 48,
            "llama.attention.head_count": 4, "llama.attention.layer_norm_rms_epsilon": 1e-5,
            "llama.vocab_size": 64}
    assert G.llama_config(meta).head_dim == 8
    with pytest.raises(ValueError, match="llama.rope.dimension_count=4 differs"):
        G.llama_config({**meta, "llama.rope.dimension_count": 4})
    assert G.llama_config({**meta, "llama.attention.key_length": 16}).head_dim == 16


@pytest.mark.parametrize("case", ["rope_llama3", "rope_yarn", "biases"])
def test_kv_cache_decoding_matches_transformers(case):
    """Prefill then one token at a time through the cache: the new RoPE types and biases
    use absolute positions there too."""
    cfg, variables = L.from_safetensors(os.path.join(DATA, case))
    ids, want = reference(case)
    model = L.Llama(cfg)
    apply = jax.jit(lambda v, t, c: model.apply(v, t, cache=c))
    cache = L.init_cache(cfg, ids.shape[0], ids.shape[1])
    out, cache = apply(variables, jnp.asarray(ids[:, :17]), cache)
    steps = [out]
    for t in range(17, ids.shape[1]):
        out, cache = apply(variables, jnp.asarray(ids[:, t:t + 1]), cache)
        steps.append(out)
    assert rel_diff(np.concatenate(steps, axis=1), want) <= TOL
