"""llama.cpp GGUF LoRA adapters (lora_jax.interop.gguf_lora).

The reference is llama.cpp's own arithmetic, done here in numpy on the file as
``gguf.GGUFReader`` reads it (no lora_jax code): each base tensor ``W`` (GGUF row order,
numpy ``(out, in)``) becomes ``W + alpha/r · lora_b @ lora_a``. The merged tensors are loaded
with the project's GGUF loader; its logits must equal the adapted model's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax.models import gguf as G
from lora_jax.models import llama as L

gguf = pytest.importorskip("gguf")
from lora_jax.interop import gguf_lora  # noqa: E402

TINY = L.LlamaConfig(vocab=96, d=32, layers=2, heads=4, kv_heads=2, ffn=48, rope_theta=500.0,
                     rms_eps=2.0**-16, max_len=32, tied=False)
NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
         "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def random_variables(cfg, seed):
    shapes = jax.eval_shape(L.Llama(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(1.0 + 0.2 * rng.standard_normal(x.shape) if x.ndim == 1
                              else 0.5 * rng.standard_normal(x.shape) / np.sqrt(x.shape[0]),
                              jnp.float32), shapes)


def gguf_weights(variables, cfg):
    """Flax variables -> GGUF-named (out, in) float32 weights, q/k in llama.cpp row order."""
    hf = L.to_hf(variables, cfg)
    out = {"token_embd.weight": hf["model.embed_tokens.weight"],
           "output_norm.weight": hf["model.norm.weight"], "output.weight": hf["lm_head.weight"]}
    for i in range(cfg.layers):
        for hf_name, g_name in NAMES.items():
            w = hf[f"model.layers.{i}.{hf_name}.weight"]
            heads = {"attn_q": cfg.heads, "attn_k": cfg.kv_heads}.get(g_name)
            out[f"blk.{i}.{g_name}.weight"] = w if heads is None else G.permute_qk(w, heads)
    return out


def write_model(path, weights, cfg):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.layers)
    w.add_context_length(cfg.max_len)
    w.add_embedding_length(cfg.d)
    w.add_feed_forward_length(cfg.ffn)
    w.add_head_count(cfg.heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_vocab_size(cfg.vocab)
    for name, x in weights.items():
        w.add_tensor(name, np.ascontiguousarray(x, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_deltas(path):
    """llama.cpp's update per base tensor, from the raw file: alpha/r · lora_b @ lora_a."""
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    alpha = float(fields["adapter.lora.alpha"])
    tensors = {}
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        # ggml dims are fastest-first: ne = [in, r] for lora_a, [r, out] for lora_b
        shape = tuple(int(n) for n in t.shape[::-1])
        tensors[t.name] = np.asarray(t.data, np.float64).reshape(shape)
    deltas = {}
    for name, a in tensors.items():
        if name.endswith(".lora_a"):
            stem = name[: -len(".lora_a")]
            b = tensors[stem + ".lora_b"]
            assert a.shape[0] == b.shape[1]
            deltas[stem] = alpha / a.shape[0] * (b @ a)
    return deltas


def adapted_logits(model, base, lora, tokens):
    return jax.jit(lora_jax.apply(model.apply))(base, lora, tokens)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama written as GGUF and loaded back with the project's loader."""
    folder = tmp_path_factory.mktemp("tiny")
    weights = gguf_weights(random_variables(TINY, 3), TINY)
    write_model(folder / "base.gguf", weights, TINY)
    cfg, base = G.load_llama(str(folder / "base.gguf"))
    return folder, weights, cfg, base


def tiny_lora(base, seed=0):
    """Adapters on q, k, v (GQA permutations of both head counts), down and the output head,
    with mixed ranks and alphas and one rsLoRA leaf, all factors random."""
    rules = [lora_jax.Rule(pattern=r".*layers_0/self_attn/q_proj/kernel", r=4, alpha=8.0),
             lora_jax.Rule(pattern=r".*layers_1/self_attn/k_proj/kernel", r=3, alpha=5.0),
             lora_jax.Rule(pattern=r".*self_attn/v_proj/kernel", r=4, alpha=8.0),
             lora_jax.Rule(pattern=r".*layers_1/mlp/down_proj/kernel", r=2, alpha=8.0),
             lora_jax.Rule(pattern=r".*lm_head/kernel", r=4, alpha=8.0)]
    lora = lora_jax.init(base, key=jax.random.key(seed), rules=rules)
    down = lora["params"]["layers_1"]["mlp"]["down_proj"]
    down["kernel"] = down["kernel"].replace(rslora=True)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), lora)


def test_tiny_llama_adapter_equals_llama_cpp_merge(tiny):
    folder, weights, cfg, base = tiny
    lora = tiny_lora(base)
    path = folder / "adapter.gguf"
    written = gguf_lora.save(path, lora, cfg)
    assert set(written) == {f"{t}.lora_{h}" for h in "ab" for t in (
        "blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.attn_v.weight",
        "blk.1.attn_v.weight", "blk.1.ffn_down.weight", "output.weight")}
    assert written["blk.0.attn_q.weight.lora_a"].shape == (4, cfg.d)  # numpy (r, in)
    assert written["output.weight.lora_b"].shape == (cfg.vocab, 4)  # numpy (out, r)

    merged = dict(weights)
    for stem, delta in llama_cpp_deltas(path).items():
        merged[stem] = weights[stem] + delta
    write_model(folder / "merged.gguf", merged, cfg)
    _, merged_vars = G.load_llama(str(folder / "merged.gguf"))

    model = L.Llama(cfg)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab, (2, 7)))
    want = jax.jit(model.apply)(merged_vars, tokens)
    got = adapted_logits(model, base, lora, tokens)
    assert rel_err(got, want) < 1e-4
    # the adapter matters: the base alone is far off
    assert rel_err(jax.jit(model.apply)(base, tokens), want) > 1e-2

    # and reading the file back gives the same model
    back = gguf_lora.load(path, base, cfg)
    assert set(lora_jax.lora.leaves(back)) == set(lora_jax.lora.leaves(lora))
    assert rel_err(adapted_logits(model, base, back, tokens), want) < 1e-4


def test_alpha_argument_folds_the_scale_into_b(tiny):
    folder, _, cfg, base = tiny
    lora = tiny_lora(base, seed=2)
    path = folder / "alpha.gguf"
    gguf_lora.save(path, lora, cfg, alpha=1.0)
    deltas = llama_cpp_deltas(path)
    for p, leaf in lora_jax.lora.leaves(lora).items():
        stem = gguf_lora.tensor_names(cfg)[p.removeprefix("params/")]
        want = np.asarray(leaf.delta(), np.float64).T  # (out, in), Hugging Face row order
        heads = {"attn_q": cfg.heads, "attn_k": cfg.kv_heads}.get(stem.split(".")[-2])
        got = deltas[stem] if heads is None else G.unpermute_qk(deltas[stem], heads)
        assert rel_err(got, want) < 1e-5, p


def test_smollm2_adapter_equals_llama_cpp_merge(tmp_path):
    try:
        path = G.smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    f = G.read(path)
    cfg, base = G.load_llama(f)
    targets = r".*layers_0/self_attn/(q_proj|k_proj)/kernel"  # both q/k row orders
    lora = lora_jax.init(base, r=4, alpha=16.0, key=jax.random.key(0), targets=targets)
    rng = np.random.default_rng(4)
    lora = jax.tree.map(lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype), lora)
    adapter = tmp_path / "smollm2-lora.gguf"
    gguf_lora.save(adapter, lora, cfg)

    # llama.cpp's merge of the adapter into the file's own (dequantized) tensors
    params = jax.tree.map(lambda x: x, base)
    for stem, delta in llama_cpp_deltas(adapter).items():
        i, kind = stem.split(".")[1], stem.split(".")[2]
        heads = cfg.heads if kind == "attn_q" else cfg.kv_heads
        w = G.unpermute_qk(f.tensor(stem) + delta, heads)  # HF row order, (out, in)
        module = "q_proj" if kind == "attn_q" else "k_proj"
        params["params"][f"layers_{i}"]["self_attn"][module]["kernel"] = jnp.asarray(
            w.T, jnp.float32)
    model = L.Llama(cfg)
    tokens = jnp.asarray([[1, 504, 3458, 314, 2723, 30]])
    want = jax.jit(model.apply)(params, tokens)
    got = adapted_logits(model, base, lora, tokens)
    assert rel_err(got, want) < 1e-4
    assert rel_err(jax.jit(model.apply)(base, tokens), want) > 1e-3


def test_llama_cpp_runs_the_adapter(tmp_path):
    """llama.cpp itself (llama-cpp-python) applies the file: its logits equal lora_jax's.

    Skipped without llama-cpp-python (it builds llama.cpp from source; not in the project's
    environment). The model has a byte-level vocabulary so that llama.cpp accepts it; the KV
    cache is float32 so that llama.cpp's own rounding stays below the tolerance."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from lora_jax.models.tokenizer import bytes_to_unicode

    vocab = ["<|endoftext|>"] + [bytes_to_unicode()[b] for b in range(256)]
    cfg = L.LlamaConfig(**{**TINY.__dict__, "vocab": len(vocab), "d": 64, "head_dim": None,
                           "ffn": 128, "max_len": 64})
    weights = gguf_weights(random_variables(cfg, 5), cfg)
    w = gguf.GGUFWriter(str(tmp_path / "base.gguf"), "llama")
    w.add_block_count(cfg.layers)
    w.add_context_length(cfg.max_len)
    w.add_embedding_length(cfg.d)
    w.add_feed_forward_length(cfg.ffn)
    w.add_head_count(cfg.heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.d // cfg.heads)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_vocab_size(cfg.vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(vocab)
    w.add_token_types([3] + [1] * (len(vocab) - 1))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    for name, x in weights.items():
        w.add_tensor(name, np.ascontiguousarray(x, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg, base = G.load_llama(str(tmp_path / "base.gguf"))
    lora = tiny_lora(base, seed=6)
    gguf_lora.save(tmp_path / "adapter.gguf", lora, cfg)
    tokens = np.random.default_rng(7).integers(1, cfg.vocab, 9)

    def llama_cpp_logits(**kw):
        llm = llama_cpp.Llama(str(tmp_path / "base.gguf"), n_ctx=32, logits_all=True,
                              verbose=False, n_threads=1, type_k=0, type_v=0, **kw)
        llm.eval(tokens.tolist())
        return np.array(llm.scores[: len(tokens)], np.float64)

    model = L.Llama(cfg)
    want = adapted_logits(model, base, lora, jnp.asarray(tokens)[None])[0]
    got = llama_cpp_logits(lora_path=str(tmp_path / "adapter.gguf"))
    assert rel_err(got, want) < 1e-4
    assert rel_err(llama_cpp_logits(), want) > 1e-2  # without the adapter: far off


# --------------------------------------------------------------------------- bad input


def write_adapter(path, tensors, arch="llama", **meta):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(meta.pop("type", "adapter"))
    w.add_string("adapter.type", meta.pop("adapter_type", "lora"))
    w.add_float32("adapter.lora.alpha", 8.0)
    for name, x in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(x, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def pair(d_in, d_out, r_a, r_b=None, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((r_a, d_in)), rng.standard_normal((d_out, r_b or r_a))


def test_adapter_for_another_architecture(tiny):
    folder, _, cfg, base = tiny
    a, b = pair(cfg.d, cfg.d, 2)
    path = write_adapter(folder / "qwen.gguf", {"blk.0.attn_q.weight.lora_a": a,
                                                "blk.0.attn_q.weight.lora_b": b}, arch="qwen2")
    with pytest.raises(ValueError, match=r"qwen\.gguf.*general\.architecture is 'qwen2'"):
        gguf_lora.load(path, base, cfg)


def test_a_model_file_is_not_an_adapter(tiny):
    folder, _, cfg, base = tiny
    with pytest.raises(ValueError, match=r"base\.gguf.*general\.type is None.*'adapter'"):
        gguf_lora.load(folder / "base.gguf", base, cfg)


def test_rank_mismatch_names_file_and_tensor(tiny):
    folder, _, cfg, base = tiny
    a, b = pair(cfg.d, cfg.d, 4, 3)
    path = write_adapter(folder / "rank.gguf", {"blk.0.attn_q.weight.lora_a": a,
                                                "blk.0.attn_q.weight.lora_b": b})
    with pytest.raises(ValueError, match=r"rank\.gguf.*blk\.0\.attn_q\.weight\.lora_a.*same rank"):
        gguf_lora.load(path, base, cfg)


def test_tensor_the_base_lacks(tiny):
    folder, _, cfg, base = tiny
    a, b = pair(cfg.d, cfg.d, 2)
    path = write_adapter(folder / "deep.gguf", {"blk.7.attn_q.weight.lora_a": a,
                                                "blk.7.attn_q.weight.lora_b": b})
    with pytest.raises(ValueError, match=r"deep\.gguf.*blk\.7\.attn_q\.weight\.lora_a.*lacks"):
        gguf_lora.load(path, base, cfg)


def test_missing_half_and_wrong_shape(tiny):
    folder, _, cfg, base = tiny
    a, b = pair(cfg.d, cfg.d, 2)
    path = write_adapter(folder / "half.gguf", {"blk.0.attn_v.weight.lora_a": a})
    with pytest.raises(ValueError, match=r"half\.gguf.*attn_v\.weight\.lora_a.*lora_b"):
        gguf_lora.load(path, base, cfg)
    path = write_adapter(folder / "shape.gguf", {"blk.0.attn_v.weight.lora_a": a,
                                                 "blk.0.attn_v.weight.lora_b": b})
    with pytest.raises(ValueError, match=r"shape\.gguf.*do not fit.*v_proj"):  # v is (32, 16)
        gguf_lora.load(path, base, cfg)


def test_save_refuses_what_llama_cpp_cannot_read(tiny, tmp_path):
    _, _, cfg, base = tiny
    emb = lora_jax.init(base, r=2, key=jax.random.key(0), targets=r".*embed_tokens/embedding")
    with pytest.raises(ValueError, match=r"embed_tokens/embedding.*embedding"):
        gguf_lora.save(tmp_path / "e.gguf", emb, cfg)
    dora = lora_jax.init(base, r=2, key=jax.random.key(0), targets=r".*q_proj/kernel", dora=True)
    with pytest.raises(TypeError, match=r"q_proj/kernel.*DoRA"):
        gguf_lora.save(tmp_path / "d.gguf", dora, cfg)
