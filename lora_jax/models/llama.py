"""A compact Llama in Flax Linen: the reference model for real checkpoints (SmolLM2, Llama 2/3).

Follows Hugging Face's ``LlamaForCausalLM`` (transformers ``modeling_llama.py``): pre-norm
blocks of RMSNorm, grouped-query attention with rotary embeddings in the ``rotate_half``
convention and a causal mask, and a SwiGLU MLP; a final RMSNorm and an output head tied to the
embedding or separate. Parameter names mirror Hugging Face's (``layers_3/self_attn/q_proj``,
``mlp/gate_proj``, ``input_layernorm``...), so LoRA targets read like PEFT's
(``r".*(q_proj|v_proj)/kernel"``). Dense layers have no biases. Parameters are float32 by
default; ``LlamaConfig.dtype`` sets the compute dtype.

``model.apply(variables, tokens)`` returns logits; with ``cache=`` (a :class:`KVCache` from
:func:`init_cache`) it returns ``(logits, cache)`` and attends to the cached keys too, which
:func:`generate` uses to decode one token at a time. Checkpoints: ``gguf.load_llama`` (GGUF),
:func:`from_safetensors` (Hugging Face).

>>> import jax, jax.numpy as jnp
>>> cfg = LlamaConfig(vocab=64, d=32, layers=2, heads=4, kv_heads=2, ffn=64)
>>> model = Llama(cfg)
>>> tokens = jnp.ones((2, 8), jnp.int32)
>>> variables = model.init(jax.random.key(0), tokens)
>>> model.apply(variables, tokens).shape
(2, 8, 64)
>>> generate(model, variables, tokens[:1, :3], 4).shape
(1, 7)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Hashable, Mapping
from typing import Any, NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models import streaming
from lora_jax.models.tensor_files import TensorFiles


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama hyperparameters (Hugging Face ``LlamaConfig`` names in brackets).

    Attributes:
      vocab: vocabulary size [vocab_size].
      d: model width [hidden_size].
      layers: decoder blocks [num_hidden_layers].
      heads: query heads [num_attention_heads].
      kv_heads: key/value heads, dividing ``heads`` [num_key_value_heads].
      ffn: MLP width [intermediate_size].
      head_dim: per-head width; default ``d // heads``.
      rope_theta: rotary base [rope_theta].
      rms_eps: RMSNorm epsilon [rms_norm_eps].
      max_len: longest sequence the cache holds by default [max_position_embeddings].
      tied: output head = embedding transposed [tie_word_embeddings].
      dtype: compute dtype ("float32", "bfloat16"); parameters stay as loaded.
      remat: recompute each block's activations in the backward pass (``nn.remat``) instead
        of storing them, as QLoRA trains big models; same parameters.
    """

    vocab: int = 49152
    d: int = 576
    layers: int = 30
    heads: int = 9
    kv_heads: int = 3
    ffn: int = 1536
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    max_len: int = 2048
    tied: bool = True
    dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        head_dim = self.d // self.heads if self.head_dim is None else self.head_dim
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", head_dim)
        if self.heads % self.kv_heads:
            raise ValueError(f"LlamaConfig: heads={self.heads} is not a multiple of "
                             f"kv_heads={self.kv_heads}")
        if head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim={self.head_dim} must be even for RoPE")

    def to_hf(self) -> dict:
        """This config as Hugging Face's ``config.json`` (see :func:`config_to_hf`)."""
        return config_to_hf(self)


class KVCache(NamedTuple):
    """Keys and values of every layer for ``length`` positions, padded to a fixed size.

    Attributes:
      k: (layers, batch, max_len, kv_heads, head_dim).
      v: same shape as ``k``.
      length: int32 scalar, the number of positions filled.
    """

    k: jax.Array
    v: jax.Array
    length: jax.Array


def init_cache(cfg: LlamaConfig, batch: int, max_len: int | None = None) -> KVCache:
    """An empty :class:`KVCache` for ``batch`` sequences of up to ``max_len`` tokens."""
    shape = (cfg.layers, batch, max_len or cfg.max_len, cfg.kv_heads, cfg.head_dim)
    zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
    return KVCache(zeros, zeros, jnp.zeros((), jnp.int32))


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, Hugging Face ``apply_rotary_pos_emb``: x[i] pairs with x[i + d/2].

    Args:
      x: (batch, time, heads, head_dim).
      positions: (time,) int positions.
      theta: the rotary base.
    """
    hd = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq  # (t, hd/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[None, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos + rotated * sin).astype(x.dtype)


class Attention(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, cache_kv=None, cache_len=None):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        b, t, _ = x.shape
        hd = cast(int, cfg.head_dim)  # never None: LlamaConfig.__post_init__ fills it in
        kvh, g = cfg.kv_heads, cfg.heads // cfg.kv_heads
        dense = lambda n, f: nn.Dense(f, use_bias=False, dtype=dt, name=n)  # noqa: E731
        q = dense("q_proj", cfg.heads * hd)(x).reshape(b, t, cfg.heads, hd)
        k = dense("k_proj", kvh * hd)(x).reshape(b, t, kvh, hd)
        v = dense("v_proj", kvh * hd)(x).reshape(b, t, kvh, hd)
        q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        if cache_kv is None:
            key_pos = positions
        else:
            if cache_len is None:
                raise TypeError("Attention: cache_kv needs cache_len")
            ck, cv = cache_kv
            k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_len, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_len, axis=1)
            cache_kv = (k, v)
            key_pos = jnp.arange(k.shape[1])
        # grouped-query attention: query head h reads key/value head h // g
        q = q.reshape(b, t, kvh, g, hd)
        att = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(dt)) / jnp.sqrt(hd).astype(dt)
        mask = key_pos[None, :] <= positions[:, None]
        att = jnp.where(mask, att.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        att = jax.nn.softmax(att, axis=-1).astype(dt)
        y = jnp.einsum("bkgts,bskd->btkgd", att, v.astype(dt)).reshape(b, t, cfg.heads * hd)
        return dense("o_proj", cfg.d)(y), cache_kv


class MLP(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dense = lambda n, f: nn.Dense(f, use_bias=False, dtype=cfg.dtype, name=n)  # noqa: E731
        return dense("down_proj", cfg.d)(
            nn.silu(dense("gate_proj", cfg.ffn)(x)) * dense("up_proj", cfg.ffn)(x))


class Block(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, cache_kv=None, cache_len=None):
        cfg = self.cfg
        norm = lambda n: nn.RMSNorm(epsilon=cfg.rms_eps, dtype=cfg.dtype, name=n)  # noqa: E731
        h, cache_kv = Attention(cfg, name="self_attn")(
            norm("input_layernorm")(x), positions, cache_kv, cache_len)
        x = x + h
        x = x + MLP(cfg, name="mlp")(norm("post_attention_layernorm")(x))
        return x, cache_kv


class Llama(nn.Module):
    """Decoder-only Llama; ``__call__(tokens, cache=None)`` -> logits (float32).

    With a ``cache``, positions continue from ``cache.length`` and the call returns
    ``(logits, cache)`` with the new keys and values written in.
    """

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, tokens, cache: KVCache | None = None):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        t = tokens.shape[1]
        emb = nn.Embed(cfg.vocab, cfg.d, name="embed_tokens")
        x = emb(tokens).astype(dt)
        start = 0 if cache is None else cache.length
        positions = start + jnp.arange(t)
        ks, vs = [], []
        for i in range(cfg.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            if cfg.remat and cache is None:
                x, kv = nn.remat(Block)(cfg, name=f"layers_{i}")(x, positions)
            else:
                x, kv = Block(cfg, name=f"layers_{i}")(x, positions, kv, start)
            if kv is not None:  # as cache is: the block returns the cache it was given
                ks.append(kv[0])
                vs.append(kv[1])
        x = nn.RMSNorm(epsilon=cfg.rms_eps, dtype=dt, name="norm")(x)
        if cfg.tied:
            logits = emb.attend(x)
        else:
            logits = nn.Dense(cfg.vocab, use_bias=False, dtype=dt, name="lm_head")(x)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return logits
        return logits, KVCache(jnp.stack(ks), jnp.stack(vs), cache.length + t)


def loss_fn(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Next-token cross entropy (mean over positions 0..T-2), in nats per token."""
    lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1))


@functools.lru_cache(maxsize=8)
def _generator(model: Llama, prompt_len: int, n: int, greedy: bool, top_k: int | None):
    cfg = model.cfg

    def pick(logits, key, temperature):
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = logits / temperature
        if top_k is not None:
            kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

    @jax.jit
    def run(variables, tokens, key, temperature, eos):
        # The prompt goes through the same one-token step as the decoding (teacher forcing):
        # one compiled copy of the model instead of a prefill and a step.
        b = tokens.shape[0]

        def step(carry, xs):
            prev, cache, done = carry
            t, key = xs
            fed = jnp.where(t < prompt_len, tokens[:, jnp.minimum(t, prompt_len - 1)], prev)
            done = done | ((t >= prompt_len) & (fed == eos))
            logits, cache = model.apply(variables, fed[:, None], cache=cache)
            nxt = jnp.where(done, eos, pick(logits[:, -1], key, temperature))
            return (nxt, cache, done), fed

        steps = prompt_len + n - 1
        carry = (jnp.zeros(b, jnp.int32), init_cache(cfg, b, steps), jnp.zeros(b, bool))
        (last, _, _), fed = jax.lax.scan(
            step, carry, (jnp.arange(steps), jax.random.split(key, steps)))
        return jnp.concatenate([fed.T, last[:, None]], axis=1)

    return run


def generate(model: Llama, variables: Any, tokens: jax.typing.ArrayLike, n: int, *,
             temperature: float = 0.0, top_k: int | None = None, key: jax.Array | None = None,
             eos_id: int | None = None) -> jax.Array:
    """Continues ``tokens`` by ``n`` tokens with a KV cache, in one compiled ``lax.scan``.

    The prompt is fed one token per step through the same single-token step that decodes, so
    only one copy of the model is compiled: on two CPU cores SmolLM2-135M compiles in ~15 s
    and then runs ~20 tokens/s, which suits prompts of tens of tokens (a long prompt
    would be faster through one batched prefill). The compiled program is cached per model,
    prompt length and ``n``.

    Args:
      model: a :class:`Llama`.
      variables: its variables (``{"params": ...}``), dense (merge LoRA/dequantize first).
      tokens: (batch, time) int prompt, every row the same length.
      n: tokens to add, >= 1.
      temperature: 0 for greedy decoding, else sampling from ``softmax(logits / temperature)``.
      top_k: sample among the ``top_k`` most likely tokens only.
      key: PRNG key for sampling (default ``jax.random.key(0)``).
      eos_id: once a row emits it, the rest of that row is ``eos_id``.

    Returns:
      (batch, time + n) int32: the prompt followed by the new tokens.
    """
    if n < 1:
        raise ValueError(f"generate: n={n} must be >= 1")
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim == 1:
        tokens = tokens[None]
    # Linen modules hash (flax builds them with unsafe_hash); their dataclass stubs say not.
    run = _generator(cast(Hashable, model), tokens.shape[1], n, temperature == 0, top_k)
    key = jax.random.key(0) if key is None else key
    return run(variables, tokens, key, jnp.float32(max(temperature, 1e-6)),
               jnp.int32(-1 if eos_id is None else eos_id))


# --------------------------------------------------------------------------- Hugging Face


def config_from_hf(config: dict | str | os.PathLike, **overrides) -> LlamaConfig:
    """A :class:`LlamaConfig` from a Hugging Face ``config.json`` (a dict, file or folder).

    Raises:
      ValueError: RoPE scaling, which this model does not implement.
    """
    if not isinstance(config, dict):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            config = json.load(f)
    if config.get("rope_scaling"):
        raise ValueError(f"rope_scaling={config['rope_scaling']!r} is not implemented")
    heads = config["num_attention_heads"]
    fields = dict(
        vocab=config["vocab_size"], d=config["hidden_size"], layers=config["num_hidden_layers"],
        heads=heads, kv_heads=config.get("num_key_value_heads") or heads,
        ffn=config["intermediate_size"],
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        rope_theta=float(config.get("rope_theta", 10000.0)),
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_len=config.get("max_position_embeddings", 2048),
        tied=bool(config.get("tie_word_embeddings", False)),
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def config_to_hf(cfg: LlamaConfig) -> dict:
    """The Hugging Face ``config.json`` of a :class:`LlamaConfig` (inverse of
    :func:`config_from_hf`), for ``LlamaForCausalLM``."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab, "hidden_size": cfg.d, "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads,
        "intermediate_size": cfg.ffn, "head_dim": cfg.head_dim or cfg.d // cfg.heads,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_eps,
        "max_position_embeddings": cfg.max_len, "tie_word_embeddings": cfg.tied,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "float32",
    }


def hf_names(cfg: LlamaConfig) -> dict[str, tuple[str, ...]]:
    """Hugging Face tensor name -> path in the Flax params (kernels are transposed weights)."""
    names: dict[str, tuple[str, ...]] = {
        "model.embed_tokens.weight": ("embed_tokens", "embedding"),
        "model.norm.weight": ("norm", "scale")}
    for i in range(cfg.layers):
        h, f = f"model.layers.{i}.", f"layers_{i}"
        names[h + "input_layernorm.weight"] = (f, "input_layernorm", "scale")
        names[h + "post_attention_layernorm.weight"] = (f, "post_attention_layernorm", "scale")
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[h + f"self_attn.{n}.weight"] = (f, "self_attn", n, "kernel")
        for n in ("gate_proj", "up_proj", "down_proj"):
            names[h + f"mlp.{n}.weight"] = (f, "mlp", n, "kernel")
    if not cfg.tied:
        names["lm_head.weight"] = ("lm_head", "kernel")
    return names


def from_safetensors(path: str | os.PathLike | TensorFiles, config: LlamaConfig | None = None,
                     dtype: Any = jnp.float32, *, quantize: str | Mapping | None = None,
                     mesh: jax.sharding.Mesh | None = None,
                     specs: Any = None) -> tuple[LlamaConfig, dict]:
    """Loads a Hugging Face Llama checkpoint (``model*.safetensors``, bf16/f16/f32).

    Tensors are read one at a time (see :mod:`lora_jax.models.streaming`): with ``quantize``
    each weight is quantized as it is read, so the model is never held at full precision (peak
    memory: the quantized model plus about one tensor); with ``mesh`` each process reads only
    the slices its devices hold.

    Args:
      path: a ``.safetensors`` file, or a folder with one or more (sharded) files and, when
        ``config`` is None, a ``config.json``; or a :class:`TensorFiles` (which counts the
        bytes read).
      config: the model's config; default read from the folder's ``config.json``.
      dtype: parameter dtype (of the dense leaves, and the dtype quantized leaves
        dequantize to; a bf16 checkpoint loads into bf16 without a float32 copy).
      quantize: None, a format (``"nf4"``...) or a dict of :func:`lora_jax.quantize`
        arguments with ``"format"``: the result equals ``lora_jax.quantize`` of the dense
        load, codes and scales bit for bit.
      mesh: place the parameters on this mesh while loading.
      specs: base specs for ``mesh`` (paths ``"params/layers_0/..."``), or a function of the
        abstract (quantized) tree returning them, e.g. ``lambda b: sharding.fsdp(b, mesh)``.

    Returns:
      ``(config, {"params": ...})``.

    Raises:
      ValueError: a tensor missing, unexpected, or of the wrong shape, by name.
    """
    files = path if isinstance(path, TensorFiles) else TensorFiles(path)
    folder = os.fspath(path) if not isinstance(path, TensorFiles) else \
        os.path.dirname(files.files[0])
    if config is None:
        if not os.path.isdir(folder) or not os.path.exists(os.path.join(folder, "config.json")):
            raise ValueError(f"from_safetensors({folder!r}): pass config= (no config.json "
                             "beside it)")
        config = config_from_hf(folder)
    names = hf_names(config)
    sources: dict[str, streaming.Source] = {}
    for name in files.keys():
        if name not in names:
            if config.tied and name == "lm_head.weight":
                continue  # some tied checkpoints still store the head
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise ValueError(f"{files.file(name)}: unexpected tensor {name!r} for {config}")
        where = names[name]
        src: streaming.Source = streaming.FileTensor(files, name)
        if where[-1] == "kernel":  # a PyTorch (out, in) weight is a Flax (in, out) kernel
            src = streaming.Transposed(src, (1, 0))
        sources["/".join(("params",) + where)] = src
    missing = sorted(n for n in names if n not in files)
    if missing:
        more = "..." if len(missing) > 5 else ""
        raise ValueError(f"{folder}: missing tensors {missing[:5]}{more}")
    expected = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    expected = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), expected)
    try:
        variables = streaming.load(expected, sources, quantize=quantize, mesh=mesh, specs=specs)
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from None
    return config, variables


def to_hf(variables: Any, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """The inverse of :func:`from_safetensors`: Hugging Face name -> float32 numpy weight."""
    p = variables["params"]
    out = {}
    for name, where in hf_names(cfg).items():
        w = p
        for key in where:
            w = w[key]
        w = np.asarray(w, np.float32)
        out[name] = np.ascontiguousarray(w.T) if where[-1] == "kernel" else w
    return out
