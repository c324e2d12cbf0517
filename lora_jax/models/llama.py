"""A compact Llama in Flax Linen: the reference model for real checkpoints (SmolLM2, Llama 2/3).

Follows Hugging Face's ``LlamaForCausalLM`` (transformers ``modeling_llama.py``): pre-norm
blocks of RMSNorm, grouped-query attention with rotary embeddings in the ``rotate_half``
convention and a causal mask, and a SwiGLU MLP; a final RMSNorm and an output head tied to the
embedding or separate. Parameter names mirror Hugging Face's (``layers_3/self_attn/q_proj``,
``mlp/gate_proj``, ``input_layernorm``...), so LoRA targets read like PEFT's
(``r".*(q_proj|v_proj)/kernel"``). Dense layers have biases only with ``attention_bias`` /
``mlp_bias``; the MLP's activation and the RoPE variant (default, linear, llama3) follow the
config. Parameters are float32 by default; ``LlamaConfig.dtype`` sets the compute dtype.

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
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models import streaming
from lora_jax.models.tensor_files import TensorFiles

# hidden_act name (transformers ``ACT2FN``) -> the same function in JAX
ACTIVATIONS: dict[str, Any] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # erf
    "gelu_python": functools.partial(jax.nn.gelu, approximate=False),
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); gelu_fast writes sqrt(2/pi) as 0.7978845608
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_python_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}

# rope_type -> the LlamaConfig.rope_* fields it needs (transformers ``modeling_rope_utils``)
ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("rope_factor",),
    "llama3": ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
               "rope_original_max_len"),
    "yarn": ("rope_factor", "rope_original_max_len", "rope_beta_fast", "rope_beta_slow",
             "rope_attention_factor", "rope_truncate"),
}
_ROPE_FIELDS = ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                "rope_original_max_len", "rope_beta_fast", "rope_beta_slow",
                "rope_attention_factor", "rope_truncate")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention scale ``0.1 * mscale * ln(factor) + 1`` (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and \
        not isinstance(value, (bool, np.bool_))


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
      head_dim: per-head width; default ``d // heads`` [head_dim].
      rope_theta: rotary base [rope_theta].
      rms_eps: RMSNorm epsilon [rms_norm_eps].
      max_len: longest sequence the cache holds by default [max_position_embeddings].
      tied: output head = embedding transposed [tie_word_embeddings].
      dtype: compute dtype ("float32", "bfloat16"); parameters stay as loaded.
      remat: recompute each block's activations in the backward pass (``nn.remat``) instead
        of storing them, as QLoRA trains big models; same parameters.
      activation: the MLP's gate activation, a key of :data:`ACTIVATIONS` [hidden_act].
      attention_bias: q/k/v/o projections have biases [attention_bias].
      mlp_bias: gate/up/down projections have biases [mlp_bias].
      rope_type: "default", "linear", "llama3" or "yarn" [rope_parameters.rope_type].
      rope_factor: frequency divisor of "linear", "llama3" and "yarn" [factor].
      rope_low_freq_factor, rope_high_freq_factor: "llama3" band edges [low_freq_factor,
        high_freq_factor].
      rope_original_max_len: "llama3"/"yarn" pretraining length
        [original_max_position_embeddings]; default ``max_len``.
      rope_beta_fast, rope_beta_slow: "yarn" ramp bounds in rotations (default 32, 1).
      rope_attention_factor: "yarn" scale of cos and sin; default
        :func:`yarn_mscale` ``(rope_factor)``.
      rope_truncate: "yarn" rounds the ramp bounds to integers (default True).
      rope_freq_factors: (head_dim/2,) divisors of the inverse frequencies, after
        ``rope_type``'s scaling (GGUF ``rope_freqs.weight``: how llama.cpp encodes llama3
        scaling); no Hugging Face equivalent.

    The ``rope_*`` parameters are None unless ``rope_type`` uses them (setting one it does not
    use is an error: it would be silently ignored).
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
    activation: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_type: str = "default"
    rope_factor: float | None = None
    rope_low_freq_factor: float | None = None
    rope_high_freq_factor: float | None = None
    rope_original_max_len: int | None = None
    rope_beta_fast: float | None = None
    rope_beta_slow: float | None = None
    rope_attention_factor: float | None = None
    rope_truncate: bool | None = None
    rope_freq_factors: tuple[float, ...] | None = None

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"LlamaConfig: {msg}")

        for name in ("vocab", "d", "layers", "heads", "kv_heads", "ffn", "max_len"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                fail(f"{name}={value!r} must be a positive int")
        if self.head_dim is None:
            if self.d % self.heads:
                fail(f"d={self.d} is not a multiple of heads={self.heads}: give head_dim")
            object.__setattr__(self, "head_dim", self.d // self.heads)
        elif not _is_int(self.head_dim) or self.head_dim <= 0:
            fail(f"head_dim={self.head_dim!r} must be a positive int")
        if self.heads % self.kv_heads:
            fail(f"heads={self.heads} is not a multiple of kv_heads={self.kv_heads}")
        if cast(int, self.head_dim) % 2:
            fail(f"head_dim={self.head_dim} must be even for RoPE")
        for name in ("rms_eps", "rope_theta"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                fail(f"{name}={value!r} must be a finite number > 0")
        for name in ("tied", "remat", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                fail(f"{name}={getattr(self, name)!r} must be a bool")
        try:
            floating = jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating)
        except TypeError:
            floating = False
        if not floating:
            fail(f"dtype={self.dtype!r} must be a floating dtype (float32, bfloat16, float16)")
        if self.activation not in ACTIVATIONS:
            fail(f"activation={self.activation!r} is not supported; supported: "
                 f"{sorted(ACTIVATIONS)}")
        self._check_rope()

    def _check_rope(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"LlamaConfig: rope_type={self.rope_type!r} is not supported; "
                             f"supported: {sorted(ROPE_TYPES)}")
        needed = ROPE_TYPES[self.rope_type]
        if self.rope_type in ("llama3", "yarn") and self.rope_original_max_len is None:
            object.__setattr__(self, "rope_original_max_len", self.max_len)
        if self.rope_type == "yarn":
            defaults = {"rope_beta_fast": 32.0, "rope_beta_slow": 1.0, "rope_truncate": True}
            if _is_number(self.rope_factor):
                defaults["rope_attention_factor"] = yarn_mscale(cast(float, self.rope_factor))
            for name, value in defaults.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)
        for name in _ROPE_FIELDS:
            value = getattr(self, name)
            if name not in needed:
                if value is not None:
                    raise ValueError(f"LlamaConfig: {name}={value!r} has no effect with "
                                     f"rope_type={self.rope_type!r} (needs {list(needed)})")
                continue
            if name == "rope_truncate":
                if not isinstance(value, (bool, np.bool_)):
                    raise ValueError(f"LlamaConfig: rope_truncate={value!r} must be a bool")
                continue
            is_len = name == "rope_original_max_len"
            if value is None or not (_is_int(value) if is_len else _is_number(value)) \
                    or not math.isfinite(value) or value <= 0:
                raise ValueError(f"LlamaConfig: rope_type={self.rope_type!r} needs {name} > 0 "
                                 f"({'an int' if is_len else 'finite'}), got {value!r}")
        if self.rope_freq_factors is not None:
            factors = tuple(float(f) for f in np.asarray(self.rope_freq_factors).reshape(-1))
            if len(factors) != cast(int, self.head_dim) // 2 or \
                    not all(math.isfinite(f) and f > 0 for f in factors):
                raise ValueError(f"LlamaConfig: rope_freq_factors must be head_dim/2="
                                 f"{cast(int, self.head_dim) // 2} finite numbers > 0, got "
                                 f"{len(factors)}: {factors[:8]}")
            object.__setattr__(self, "rope_freq_factors", factors)
        if self.rope_type == "llama3" and not (
                cast(float, self.rope_high_freq_factor) > cast(float, self.rope_low_freq_factor)):
            raise ValueError(
                f"LlamaConfig: rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                f"rope_low_freq_factor={self.rope_low_freq_factor}")

    def to_hf(self) -> dict:
        """This config as Hugging Face's ``config.json`` (see :func:`config_to_hf`)."""
        return config_to_hf(self)


def rope_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """The (head_dim/2,) float32 rotary inverse frequencies, as transformers'
    ``modeling_rope_utils`` computes them for ``cfg.rope_type``."""
    hd = cast(int, cfg.head_dim)
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    if cfg.rope_type == "linear":
        inv_freq = inv_freq / cast(float, cfg.rope_factor)
    elif cfg.rope_type == "llama3":
        factor = cast(float, cfg.rope_factor)
        low, high = cast(float, cfg.rope_low_freq_factor), cast(float, cfg.rope_high_freq_factor)
        old_len = cast(int, cfg.rope_original_max_len)
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths (> old_len / low) are divided by factor, short ones (< old_len / high)
        # kept, and the band between interpolated smoothly
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, smoothed, scaled)
    elif cfg.rope_type == "yarn":
        inv_freq = _yarn_frequencies(cfg, inv_freq)
    if cfg.rope_freq_factors is not None:
        inv_freq = inv_freq / np.asarray(cfg.rope_freq_factors, np.float64)
    return inv_freq.astype(np.float32)


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


def _yarn_frequencies(cfg: LlamaConfig, inv_freq: np.ndarray) -> np.ndarray:
    """YaRN: frequencies below ``beta_slow`` rotations over the pretraining length are
    divided by ``factor``, those above ``beta_fast`` kept, a linear ramp between."""
    hd, base = cast(int, cfg.head_dim), cfg.rope_theta
    factor, old_len = cast(float, cfg.rope_factor), cast(int, cfg.rope_original_max_len)

    def dim_of(rotations):  # the frequency index that turns ``rotations`` times in old_len
        return hd * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(cast(float, cfg.rope_beta_fast)), dim_of(cast(float, cfg.rope_beta_slow))
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, hd - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(hd // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep), 0: interpolate (divide by factor)
    return inv_freq / factor * (1 - keep) + inv_freq * keep


def rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0,
         inv_freq: jax.typing.ArrayLike | None = None, scale: float = 1.0) -> jax.Array:
    """Rotary embedding, Hugging Face ``apply_rotary_pos_emb``: x[i] pairs with x[i + d/2].

    Args:
      x: (batch, time, heads, head_dim).
      positions: (time,) int positions.
      theta: the rotary base (plain RoPE), unless ``inv_freq`` is given.
      inv_freq: (head_dim/2,) inverse frequencies (:func:`rope_frequencies`).
      scale: multiplies cos and sin (YaRN's attention factor).
    """
    hd = x.shape[-1]
    if inv_freq is None:
        inv_freq = 1.0 / theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)[None, :, None, :]
    cos, sin = jnp.cos(emb) * scale, jnp.sin(emb) * scale
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
        dense = lambda n, f: nn.Dense(  # noqa: E731
            f, use_bias=cfg.attention_bias, dtype=dt, name=n)
        q = dense("q_proj", cfg.heads * hd)(x).reshape(b, t, cfg.heads, hd)
        k = dense("k_proj", kvh * hd)(x).reshape(b, t, kvh, hd)
        v = dense("v_proj", kvh * hd)(x).reshape(b, t, kvh, hd)
        inv_freq, scale = rope_frequencies(cfg), cfg.rope_attention_factor or 1.0
        q, k = rope(q, positions, inv_freq=inv_freq, scale=scale), \
            rope(k, positions, inv_freq=inv_freq, scale=scale)
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
        dense = lambda n, f: nn.Dense(  # noqa: E731
            f, use_bias=cfg.mlp_bias, dtype=cfg.dtype, name=n)
        act = ACTIVATIONS[cfg.activation]
        return dense("down_proj", cfg.d)(
            act(dense("gate_proj", cfg.ffn)(x)) * dense("up_proj", cfg.ffn)(x))


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


# config.json keys that do not change the model's outputs: read by nothing here
HF_KEYS_WITHOUT_MATH = frozenset({
    "architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
    "name_or_path", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "use_cache", "initializer_range", "output_attentions",
    "output_hidden_states", "return_dict", "use_return_dict", "torchscript",
    "_attn_implementation", "attn_implementation", "_attn_implementation_autoset",
    "tokenizer_class", "prefix", "task_specific_params", "finetuning_task", "id2label",
    "label2id", "num_labels", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder",
    # generation settings (transformers 4 kept them in config.json); logits do not depend on them
    "max_length", "min_length", "do_sample", "temperature", "top_k", "top_p", "num_beams",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "num_return_sequences",
    "early_stopping", "typical_p", "forced_bos_token_id", "forced_eos_token_id",
    "is_llama_config",  # SmolLM2 (nanotron export)
})
# keys that change the math unless they hold one of these values (refused otherwise)
HF_KEYS_AT_DEFAULT: dict[str, tuple[Any, ...]] = {
    "pretraining_tp": (1, None),
    "attention_dropout": (0, 0.0, None),
    "sliding_window": (None,),
    "use_sliding_window": (False, None),
    "partial_rotary_factor": (1, 1.0, None),
    "pruned_heads": ({}, None),
    "add_cross_attention": (False, None),
    "is_decoder": (False, None),
    "tie_encoder_decoder": (False, None),
    "rope_interleaved": (False, None),  # SmolLM2 (nanotron): true would pair x[2i], x[2i+1]
}
# keys :func:`config_from_hf` reads and honours
HF_KEYS_READ = frozenset({
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "intermediate_size", "head_dim", "rope_theta", "rope_scaling",
    "rope_parameters", "original_max_position_embeddings", "rms_norm_eps",
    "max_position_embeddings", "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias",
})
# rope_type -> keys its rope_parameters / rope_scaling dict may hold, and the LlamaConfig field
_HF_ROPE_KEYS: dict[str, dict[str, str]] = {
    "default": {},
    "linear": {"factor": "rope_factor"},
    "llama3": {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
               "high_freq_factor": "rope_high_freq_factor",
               "original_max_position_embeddings": "rope_original_max_len"},
    "yarn": {"factor": "rope_factor", "original_max_position_embeddings": "rope_original_max_len",
             "beta_fast": "rope_beta_fast", "beta_slow": "rope_beta_slow",
             "attention_factor": "rope_attention_factor", "truncate": "rope_truncate"},
}
# rope_parameters keys read but not stored: yarn's mscale pair sets its attention factor
_HF_ROPE_EXTRA = {"yarn": ("mscale", "mscale_all_dim")}
_HF_ROPE_COMMON = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


def _hf_rope(config: dict, where: str) -> dict[str, Any]:
    """The LlamaConfig ``rope_*`` fields of an HF config (transformers 4 or 5 spelling)."""
    scaling, params = config.get("rope_scaling"), config.get("rope_parameters")
    if scaling and params and scaling != params:
        raise ValueError(f"{where}: rope_scaling={scaling!r} and rope_parameters={params!r} "
                         "disagree; keep one")
    key = "rope_scaling" if scaling else "rope_parameters"
    rope = scaling or params or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{where}: {key}={rope!r} must be a dict")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if "type" in rope and "rope_type" in rope and rope["type"] != rope["rope_type"]:
        raise ValueError(f"{where}: {key} has type={rope['type']!r} and "
                         f"rope_type={rope['rope_type']!r}")
    if rope_type not in _HF_ROPE_KEYS:
        raise ValueError(f"{where}: {key}['rope_type']={rope_type!r} is not supported; "
                         f"supported: {sorted(_HF_ROPE_KEYS)}")
    allowed = _HF_ROPE_KEYS[rope_type]
    for name in rope:
        if name not in allowed and name not in _HF_ROPE_COMMON and \
                name not in _HF_ROPE_EXTRA.get(rope_type, ()):
            raise ValueError(f"{where}: {key}[{name!r}] is not a parameter of rope_type "
                             f"{rope_type!r} (it takes {sorted(allowed)}); lora_jax refuses "
                             "keys it does not understand")
    for source, value in (("partial_rotary_factor", config.get("partial_rotary_factor")),
                          (f"{key}['partial_rotary_factor']", rope.get("partial_rotary_factor"))):
        if value not in (None, 1, 1.0):
            raise ValueError(f"{where}: {source}={value!r} (partial RoPE) is not implemented")
    theta = rope.get("rope_theta")
    top_theta = config.get("rope_theta")
    if theta is not None and top_theta is not None and theta != top_theta:
        raise ValueError(f"{where}: rope_theta={top_theta!r} and {key}['rope_theta']={theta!r} "
                         "disagree")
    theta = theta if theta is not None else top_theta
    fields: dict[str, Any] = {"rope_type": rope_type,
                              "rope_theta": 10000.0 if theta is None else theta}
    for name, field in allowed.items():
        if rope.get(name) is not None:
            fields[field] = rope[name]
    if "original_max_position_embeddings" in allowed:
        # transformers gives a top-level original_max_position_embeddings priority (Phi-3
        # style), and defaults it to max_position_embeddings (not to an overridden max_len)
        for value in (config.get("original_max_position_embeddings"),
                      rope.get("original_max_position_embeddings"),
                      config.get("max_position_embeddings", 2048)):
            if value is not None:
                fields["rope_original_max_len"] = value
                break
    if rope_type == "yarn":
        fields.update(_hf_yarn(rope, fields, config, key, where))
    for name, value in fields.items():
        if name == "rope_truncate":
            if not isinstance(value, bool):
                raise ValueError(f"{where}: {key}['truncate']={value!r} must be true or false")
        elif name != "rope_type" and not _is_number(value):
            raise ValueError(f"{where}: {key} {name}={value!r} must be a number")
    if isinstance(fields["rope_theta"], int):
        fields["rope_theta"] = float(fields["rope_theta"])
    return fields


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    """Whether ``value`` equals one of ``neutral`` (numbers by value, others by type too)."""
    for n in neutral:
        if n is None or value is None:
            if value is n:
                return True
        elif (type(value) is type(n) or (_is_number(value) and _is_number(n))) and value == n:
            return True
    return False


def _hf_yarn(rope: dict, fields: dict, config: dict, key: str, where: str) -> dict[str, Any]:
    """YaRN's factor and attention factor as transformers' ``_compute_yarn_parameters`` infers
    them when absent."""
    out: dict[str, Any] = {}
    factor = fields.get("rope_factor")
    if factor is None:  # transformers: max_position_embeddings / original
        factor = config.get("max_position_embeddings", 2048) / fields["rope_original_max_len"]
        out["rope_factor"] = factor
    if rope.get("attention_factor") is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        for name, value in (("mscale", mscale), ("mscale_all_dim", mscale_all_dim)):
            if value is not None and not _is_number(value):
                raise ValueError(f"{where}: {key}[{name!r}]={value!r} must be a number")
        if _is_number(factor):
            out["rope_attention_factor"] = (
                yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                if mscale and mscale_all_dim else yarn_mscale(factor))
    return out


def config_from_hf(config: dict | str | os.PathLike, *, ignore_keys: Sequence[str] = (),
                   **overrides) -> LlamaConfig:
    """A :class:`LlamaConfig` from a Hugging Face ``config.json`` (a dict, file or folder).

    Every key is honoured or refused: RoPE from ``rope_parameters`` (transformers 5) or
    ``rope_theta``/``rope_scaling`` (transformers 4; ``type`` or ``rope_type``), types
    ``default``, ``linear``, ``llama3`` and ``yarn``; ``hidden_act`` (see :data:`ACTIVATIONS`);
    ``attention_bias``/``mlp_bias``; ``head_dim``; ``tie_word_embeddings``. Keys known not to
    change the outputs (:data:`HF_KEYS_WITHOUT_MATH`: token ids, ``dtype``, ``use_cache``...)
    are skipped; keys of :data:`HF_KEYS_AT_DEFAULT` must hold their neutral value
    (``pretraining_tp`` 1, ``attention_dropout`` 0, no ``sliding_window``...). Any other key is an
    error, because a loader that skips a key it does not know can return plausible but wrong
    logits.

    Args:
      config: the config dict, a ``config.json`` or its folder.
      ignore_keys: keys to skip although they are unknown or not at their neutral value (e.g.
        ``("attention_dropout",)`` for inference only); you vouch that they do not change the
        outputs. Keys this function reads cannot be ignored: set the field in ``overrides``.
      **overrides: :class:`LlamaConfig` fields to set (``dtype``, ``remat``...).

    Raises:
      ValueError: a missing, malformed, unsupported or unknown key, by name.
    """
    where = "config"
    if not isinstance(config, dict):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            config = json.load(f)
        where = path
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(config).__name__}")
    if isinstance(ignore_keys, str):
        ignore_keys = (ignore_keys,)
    read = sorted(HF_KEYS_READ.intersection(ignore_keys))
    if read:
        raise ValueError(f"config_from_hf: ignore_keys={read} are keys it reads and honours; "
                         "pass LlamaConfig fields as overrides instead")
    unknown = [k for k in config if k not in HF_KEYS_READ and k not in HF_KEYS_WITHOUT_MATH
               and k not in HF_KEYS_AT_DEFAULT and k not in ignore_keys]
    if unknown:
        shown = ", ".join(f"{k}={config[k]!r}" for k in unknown)
        raise ValueError(f"{where}: unknown config key(s) {shown}: lora_jax's Llama does not "
                         "implement them and they may change the outputs; if you are sure they "
                         f"do not, pass ignore_keys={tuple(unknown)!r}")
    for key, neutral in HF_KEYS_AT_DEFAULT.items():
        value = config.get(key)
        if key in config and key not in ignore_keys and not _is_neutral(value, neutral):
            raise ValueError(f"{where}: {key}={value!r} is not implemented (expected one of "
                             f"{list(neutral)}); pass ignore_keys=({key!r},) if it does not "
                             "apply to your use")
    model_type = config.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"{where}: model_type={model_type!r}; this loader is for 'llama'")

    def integer(key, default=None):
        value = config.get(key)
        if value is None:
            if default is None:
                raise ValueError(f"{where}: the required key {key!r} is missing")
            return default
        if not _is_int(value) or value <= 0:
            raise ValueError(f"{where}: {key}={value!r} must be a positive int")
        return int(value)

    def number(key, default):
        value = config.get(key, default)
        if not _is_number(value) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{where}: {key}={value!r} must be a finite number > 0")
        return float(value)

    def boolean(key, default):
        value = config.get(key, default)
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {key}={value!r} must be true or false")
        return value

    d, heads = integer("hidden_size"), integer("num_attention_heads")
    if config.get("head_dim") is None and d % heads:
        raise ValueError(f"{where}: hidden_size={d} is not a multiple of "
                         f"num_attention_heads={heads} and head_dim is not given")
    kv_heads = integer("num_key_value_heads", heads)
    if heads % kv_heads:
        raise ValueError(f"{where}: num_attention_heads={heads} is not a multiple of "
                         f"num_key_value_heads={kv_heads}")
    act = config.get("hidden_act", "silu")
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise ValueError(f"{where}: hidden_act={act!r} is not supported; supported: "
                         f"{sorted(ACTIVATIONS)}")
    fields: dict[str, Any] = dict(
        vocab=integer("vocab_size"), d=d, layers=integer("num_hidden_layers"),
        heads=heads, kv_heads=kv_heads, ffn=integer("intermediate_size"),
        head_dim=integer("head_dim", d // heads),
        rms_eps=number("rms_norm_eps", 1e-6),
        max_len=integer("max_position_embeddings", 2048),
        tied=boolean("tie_word_embeddings", False),
        activation=act, attention_bias=boolean("attention_bias", False),
        mlp_bias=boolean("mlp_bias", False),
    )
    fields.update(_hf_rope(config, where))
    fields.update(overrides)
    try:
        return LlamaConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def config_to_hf(cfg: LlamaConfig) -> dict:
    """The Hugging Face ``config.json`` of a :class:`LlamaConfig` (inverse of
    :func:`config_from_hf`), for ``LlamaForCausalLM``.

    RoPE is written as top-level ``rope_theta`` plus, for a scaled type, ``rope_scaling`` with
    ``rope_type``: the spelling both transformers 4 (>= 4.43) and 5 read.

    Raises:
      ValueError: ``cfg.rope_freq_factors`` is set (a GGUF's ``rope_freqs.weight``), which no
        Hugging Face config key expresses.
    """
    if cfg.rope_freq_factors is not None:
        raise ValueError("config_to_hf: rope_freq_factors (from a GGUF's rope_freqs.weight) has "
                         "no Hugging Face config equivalent; writing the config without it "
                         "would change the model")
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab, "hidden_size": cfg.d, "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads,
        "intermediate_size": cfg.ffn, "head_dim": cfg.head_dim or cfg.d // cfg.heads,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_eps,
        "max_position_embeddings": cfg.max_len, "tie_word_embeddings": cfg.tied,
        "hidden_act": cfg.activation, "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias, "torch_dtype": "float32",
    }
    if cfg.rope_type != "default":
        scaling: dict[str, Any] = {"rope_type": cfg.rope_type}
        for name, field in _HF_ROPE_KEYS[cfg.rope_type].items():
            scaling[name] = getattr(cfg, field)
        out["rope_scaling"] = scaling
    return out


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
            if cfg.attention_bias:
                names[h + f"self_attn.{n}.bias"] = (f, "self_attn", n, "bias")
        for n in ("gate_proj", "up_proj", "down_proj"):
            names[h + f"mlp.{n}.weight"] = (f, "mlp", n, "kernel")
            if cfg.mlp_bias:
                names[h + f"mlp.{n}.bias"] = (f, "mlp", n, "bias")
    if not cfg.tied:
        names["lm_head.weight"] = ("lm_head", "kernel")
    return names


def check_param_dtype(dtype: Any, caller: str) -> None:
    """Raises ValueError naming ``caller``'s ``dtype=`` unless it is a floating dtype (an int
    dtype would turn every weight into a few integers, most of them 0)."""
    try:
        floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise ValueError(f"{caller}: dtype={dtype!r} is not a floating dtype (float32, bfloat16 "
                         "or float16): the weights would be cast to it")


def from_safetensors(path: str | os.PathLike | TensorFiles, config: LlamaConfig | None = None,
                     dtype: Any = jnp.float32, *, quantize: str | Mapping | None = None,
                     mesh: jax.sharding.Mesh | None = None, specs: Any = None,
                     ignore_keys: Sequence[str] = ()) -> tuple[LlamaConfig, dict]:
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
      ignore_keys: ``config.json`` keys to skip (see :func:`config_from_hf`).

    Returns:
      ``(config, {"params": ...})``.

    Raises:
      ValueError: a tensor missing, unexpected, or of the wrong shape, by name; a config key
        this model does not implement (:func:`config_from_hf`); a non-floating ``dtype``; a
        tied config whose checkpoint stores a different ``lm_head.weight``.
    """
    check_param_dtype(dtype, "from_safetensors")
    files = path if isinstance(path, TensorFiles) else streaming.open_files(path)
    folder = os.fspath(path) if not isinstance(path, TensorFiles) else \
        os.path.dirname(files.files[0])
    if config is None:
        if not os.path.isdir(folder) or not os.path.exists(os.path.join(folder, "config.json")):
            raise ValueError(f"from_safetensors({folder!r}): pass config= (no config.json "
                             "beside it)")
        config = config_from_hf(folder, ignore_keys=ignore_keys)
    names = hf_names(config)
    sources: dict[str, streaming.Source] = {}
    for name in files.keys():
        if name not in names:
            if config.tied and name == "lm_head.weight":
                # some tied checkpoints still store the head: it must be the embedding
                head, emb = files.read(name), files.read("model.embed_tokens.weight") \
                    if "model.embed_tokens.weight" in files else None
                if emb is None or head.shape != emb.shape or not np.array_equal(head, emb):
                    raise ValueError(f"{files.file(name)}: the config ties the output head to "
                                     "the embedding (tie_word_embeddings) but lm_head.weight "
                                     "differs from model.embed_tokens.weight")
                continue
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
