"""A tiny Gemma written the way Google's gemma library writes it (Flax Linen, 2-space indent).

Weights are ``Einsum`` modules holding one param ``w``; the einsum string is given at the call,
as in ``gemma/modules.py``. Nothing is called ``kernel``, and most contracted axes sit in the
middle of the kernel. Layouts (input = axes the use contracts, stack = batch axes of the
weight in its dot_general, output = the rest; N heads, K kv heads, D model, H head, F hidden,
V vocab), per layer ``params/layer_{i}/...``:

==========================  ============  ===============  =======  =============================
path                         shape         einsum           roles    config
==========================  ============  ===============  =======  =============================
attn/q_einsum/w              (N, D, H)     BTD,NDH->BTNH    o i o    default
attn/kv_einsum/w             (2, K, D, H)  BTD,CKDH->CBTKH  o o i o  default (GQA if K < N)
attn/qkv_einsum/w            (3, N, D, H)  BTD,SNDH->SBTNH  o o i o  fused_qkv=True (K == N)
attn/attn_vec_einsum/w       (N, H, D)     BTNH,NHD->BTD    i i o
mlp/gating_einsum/w          (2, F, D)     BTD,CFD->CBTF    o o i    default
mlp/gating_einsum/w          (2, D, F)     BTD,CDF->CBTF    o i o    transpose_gating_einsum=False
mlp/linear/w                 (F, D)        BTF,FD->BTD      i o
==========================  ============  ===============  =======  =============================

``params/embedder/input_embedding`` (V, D) is read by a lookup (``table[(tokens,)]``, a
gather: an embedding) and tied as the output head, ``BTD,VD->BTV``. RMSNorm ``scale`` (D,)
vectors are not matmul weights. GQA (K < N) groups query heads as ``BTKGH``; with
``fused_qkv`` (K == N) q, k and v come from one kernel. ``transpose_gating_einsum`` keeps
gemma's meaning: True (the default here, as in Gemma 2 and 3) stores the gating kernel as
(2, F, D), which puts its contracted axis D last.

``make(key)`` gives ``(forward, params, (tokens,))`` with ``forward(params, tokens) -> logits``
(causal, no cache). ``decode(apply_fn, params, prompt, steps, config=...)`` prefills a prompt into
a KV cache and then feeds one token at a time, calling ``apply_fn(params, tokens, positions,
cache, attention_mask) -> (logits, cache)``: ``Transformer(config).apply`` itself, or any
wrapper of it with the same signature (the cache is passed explicitly, as gemma's sampler does).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

K_MASK = -2.3819763e38  # gemma's mask value (close to float32 min, not -inf)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  num_layers: int = 2
  num_embed: int = 64  # V
  embed_dim: int = 32  # D
  hidden_dim: int = 64  # F
  num_heads: int = 4  # N
  head_dim: int = 8  # H
  num_kv_heads: int = 2  # K (GQA when 1 < K < N)
  fused_qkv: bool = False  # one qkv_einsum (3, N, D, H); needs K == N
  transpose_gating_einsum: bool = True  # gating (2, F, D); False: (2, D, F)
  max_cache_length: int = 16

  def __post_init__(self):
    if self.fused_qkv and self.num_kv_heads != self.num_heads:
      raise ValueError('fused_qkv needs num_kv_heads == num_heads')


class Einsum(nn.Module):
  """A parameterised einsum: ``jnp.einsum(eqn, x, w)``, the string given at the call."""

  shape: tuple[int, ...]
  weight_name: str = 'w'
  initializer: nn.initializers.Initializer = nn.initializers.normal(stddev=0.2)

  @nn.compact
  def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
    w = self.param(self.weight_name, self.initializer, self.shape)
    return jnp.einsum(eqn, x, w)


class RMSNorm(nn.Module):

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.zeros_init(), (x.shape[-1]))
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    normed_inputs = jnp.asarray(x * jax.lax.rsqrt(var + 1e-06))
    scale = jnp.expand_dims(scale, axis=range(len(x.shape) - 1))
    return normed_inputs * (1 + scale)


class Embedder(nn.Module):
  vocab_size: int
  embed_dim: int

  def setup(self):
    self.input_embedding_table = self.param(
        'input_embedding',
        nn.initializers.normal(stddev=0.5),
        (self.vocab_size, self.embed_dim),
    )

  def encode(self, x: jax.Array) -> jax.Array:
    x = self.input_embedding_table[(x,)]
    x *= jnp.sqrt(self.embed_dim).astype(x.dtype)
    return x

  def decode(self, x: jax.Array) -> jax.Array:
    return jnp.einsum('BTD,VD->BTV', x, self.input_embedding_table)


def apply_rope(inputs, positions, max_wavelength=10_000):
  """RoPE over the last axis of (B, T, N, H) inputs (gemma's positional_embeddings)."""
  head_dim = inputs.shape[-1]
  fraction = 2 * jnp.arange(0, head_dim // 2) / head_dim
  timescale = max_wavelength**fraction
  sinusoid_inp = positions[..., jnp.newaxis] / timescale[jnp.newaxis, jnp.newaxis, :]
  sinusoid_inp = sinusoid_inp[..., jnp.newaxis, :]
  sin = jnp.sin(sinusoid_inp)
  cos = jnp.cos(sinusoid_inp)
  first_half, second_half = jnp.split(inputs, 2, axis=-1)
  first_part = first_half * cos - second_half * sin
  second_part = second_half * cos + first_half * sin
  return jnp.concatenate([first_part, second_part], axis=-1).astype(inputs.dtype)


class Attention(nn.Module):
  num_heads: int
  num_kv_heads: int
  features: int
  head_dim: int
  fused_qkv: bool

  @property
  def use_gqa(self):
    return self.num_kv_heads != self.num_heads and self.num_kv_heads > 1

  def setup(self):
    self.attn_vec_einsum = Einsum(shape=(self.num_heads, self.head_dim, self.features))
    if self.fused_qkv:
      self.qkv_einsum = Einsum(shape=(3, self.num_heads, self.features, self.head_dim))
    else:
      self.q_einsum = Einsum(shape=(self.num_heads, self.features, self.head_dim))
      self.kv_einsum = Einsum(shape=(2, self.num_kv_heads, self.features, self.head_dim))

  def __call__(self, x, segment_pos, cache, attn_mask):
    seq_len = x.shape[1]
    if self.fused_qkv:
      query_proj, key_proj, value_proj = self.qkv_einsum('BTD,SNDH->SBTNH', x)
    else:
      query_proj = self.q_einsum('BTD,NDH->BTNH', x)
      key_proj, value_proj = self.kv_einsum('BTD,CKDH->CBTKH', x)

    query_proj = apply_rope(query_proj, segment_pos)
    query_scaled = query_proj * self.head_dim**-0.5
    key_proj = apply_rope(key_proj, segment_pos)

    if cache is not None:
      end_index = cache['end_index'][0]
      slice_indices = (0, end_index % cache['v'].shape[1], 0, 0)
      value_proj = jax.lax.dynamic_update_slice(cache['v'], value_proj, slice_indices)
      key_proj = jax.lax.dynamic_update_slice(cache['k'], key_proj, slice_indices)

    if self.use_gqa:
      b, t, kg, h = query_scaled.shape
      query_scaled = query_scaled.reshape(
          (b, t, self.num_kv_heads, kg // self.num_kv_heads, h))
      logits = jnp.einsum('BTKGH,BSKH->BTKGS', query_scaled, key_proj)
      b, t, k, g, s = logits.shape
      logits = logits.reshape((b, t, k * g, s))
    else:
      logits = jnp.einsum('BTNH,BSNH->BTNS', query_scaled, key_proj)

    padded_logits = jnp.where((jnp.expand_dims(attn_mask, -2)), logits, K_MASK)
    probs = jax.nn.softmax(padded_logits, axis=-1).astype(key_proj.dtype)

    if self.use_gqa:
      b, t, kg, s = probs.shape
      probs = probs.reshape((b, t, self.num_kv_heads, kg // self.num_kv_heads, s))
      encoded = jnp.einsum('BTKGS,BSKH->BTKGH', probs, value_proj)
      b, t, k, g, h = encoded.shape
      encoded = encoded.reshape((b, t, k * g, h))
    else:
      encoded = jnp.einsum('BTNS,BSNH->BTNH', probs, value_proj)

    attn_output = self.attn_vec_einsum('BTNH,NHD->BTD', encoded)

    if cache is not None:
      new_cache = {
          'v': value_proj,
          'k': key_proj,
          'end_index': cache['end_index'] + seq_len,
      }
    else:
      new_cache = None
    return new_cache, attn_output


class FeedForward(nn.Module):
  features: int
  hidden_dim: int
  transpose_gating_einsum: bool

  def setup(self):
    if self.transpose_gating_einsum:
      self.gating_einsum = Einsum(shape=(2, self.hidden_dim, self.features))
    else:
      self.gating_einsum = Einsum(shape=(2, self.features, self.hidden_dim))
    self.linear = Einsum(shape=(self.hidden_dim, self.features))

  def __call__(self, x):
    if self.transpose_gating_einsum:
      gate = self.gating_einsum('BTD,CFD->CBTF', x)
    else:
      gate = self.gating_einsum('BTD,CDF->CBTF', x)
    activations = nn.gelu(gate[0]) * gate[1]
    return self.linear('BTF,FD->BTD', activations)


class Block(nn.Module):
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.pre_attention_norm = RMSNorm()
    self.attn = Attention(
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        features=cfg.embed_dim,
        head_dim=cfg.head_dim,
        fused_qkv=cfg.fused_qkv,
    )
    self.pre_ffw_norm = RMSNorm()
    self.mlp = FeedForward(
        features=cfg.embed_dim,
        hidden_dim=cfg.hidden_dim,
        transpose_gating_einsum=cfg.transpose_gating_einsum,
    )

  def __call__(self, x, segment_pos, cache, attn_mask):
    inputs_normalized = self.pre_attention_norm(x)
    cache, attn_output = self.attn(inputs_normalized, segment_pos, cache, attn_mask)
    attn_output += x
    outputs = self.pre_ffw_norm(attn_output)
    outputs = self.mlp(outputs)
    outputs += attn_output
    return cache, outputs


class Transformer(nn.Module):
  """``__call__(last_tokens, positions, cache, attention_mask) -> (logits, cache)``."""

  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.embedder = Embedder(vocab_size=cfg.num_embed, embed_dim=cfg.embed_dim)
    self.blocks = [Block(name=f'layer_{i}', config=cfg) for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm()

  def __call__(self, last_tokens, positions, cache, attention_mask):
    x = self.embedder.encode(last_tokens)
    new_cache = {}
    for i, block in enumerate(self.blocks):
      layer_name = f'layer_{i}'
      layer_cache = cache[layer_name] if cache else None
      layer_cache, x = block(x, positions, layer_cache, attention_mask)
      if cache is not None:
        new_cache[layer_name] = layer_cache
    x = self.final_norm(x)
    logits = self.embedder.decode(x)
    return logits, (new_cache if cache is not None else None)


def init_cache(config: TransformerConfig, batch_size: int, cache_size: int | None = None,
               dtype=jnp.float32):
  """An empty KV cache: per layer ``k``, ``v`` (B, S, K, H) and ``end_index`` (B,)."""
  size = cache_size or config.max_cache_length
  shape = (batch_size, size, config.num_kv_heads, config.head_dim)
  return {
      f'layer_{i}': {
          'k': jnp.zeros(shape, dtype),
          'v': jnp.zeros(shape, dtype),
          'end_index': jnp.zeros((batch_size,), jnp.int32),
      }
      for i in range(config.num_layers)
  }


def causal_inputs(tokens):
  """(positions (B, T), attention_mask (B, T, T)) for a full, uncached forward pass."""
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
  return positions, mask


def forward(model: Transformer, params, tokens):
  """Logits (B, T, V) of the whole sequence, without a cache."""
  positions, mask = causal_inputs(tokens)
  logits, _ = model.apply(params, tokens, positions, None, mask)
  return logits


def make(key, config: TransformerConfig | None = None, batch: int = 2, seq: int = 8):
  """``(forward, params, (tokens,))``: ``forward(params, tokens) -> logits``."""
  config = config or TransformerConfig()
  model = Transformer(config)
  tokens = jax.random.randint(jax.random.fold_in(key, 1), (batch, seq), 0, config.num_embed)
  positions, mask = causal_inputs(tokens)
  params = jax.jit(model.init)(key, tokens, positions, None, mask)
  return functools.partial(forward, model), params, (tokens,)


def decode(apply_fn, params, prompt, steps: int, *, config: TransformerConfig,
           forced=None, cache_size: int | None = None):
  """Greedy decoding with a KV cache: one prefill call, then one call per new token.

  Args:
    apply_fn: ``(params, tokens, positions, cache, attention_mask) -> (logits, cache)``, e.g.
      ``Transformer(config).apply`` or a LoRA wrapper of it; jitted here (two traces: the
      prefill shape and the one-token shape).
    params: its first argument (any pytree).
    prompt: (B, P) int tokens.
    steps: how many tokens to produce.
    config: the model's config (cache shapes).
    forced: optional (B, steps) tokens to feed instead of the greedy choices (teacher
      forcing), so that two models can be compared on the same inputs.
    cache_size: cache length; default P + steps.

  Returns:
    ``(tokens, logits)``: (B, steps) and (B, steps, V); ``logits[:, i]`` is the prediction
    ``tokens[:, i]`` was chosen from, i.e. the full forward pass's position P - 1 + i.
  """
  b, p = prompt.shape
  size = cache_size or p + steps
  cache = init_cache(config, b, size)
  step = jax.jit(apply_fn)
  slots = jnp.arange(size)[None, None, :]

  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  logits, cache = step(params, prompt, positions, cache, slots <= positions[:, :, None])
  last = logits[:, -1]
  tokens, outs = [], []
  for i in range(steps):
    tok = jnp.argmax(last, axis=-1).astype(jnp.int32) if forced is None else forced[:, i]
    tokens.append(tok)
    outs.append(last)
    if i == steps - 1:
      break
    pos = jnp.full((b, 1), p + i, jnp.int32)
    logits, cache = step(params, tok[:, None], pos, cache, slots <= pos[:, :, None])
    last = logits[:, -1]
  return jnp.stack(tokens, axis=1), jnp.stack(outs, axis=1)
