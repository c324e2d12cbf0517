"""A tiny decoder whose layers are stacked with ``nn.scan`` over ``nn.remat``, MaxText-style.

One ``DecoderLayer`` (fused-qkv Dense attention, Dense MLP) is wrapped in ``nn.remat`` and
scanned ``num_layers`` times with ``variable_axes={'params': 0}``, so every layer parameter
gains a leading layer axis L and the layer body is a ``scan`` over those slices. The causal
mask is broadcast to every step (``in_axes=nn.broadcast``). Layouts (stack = the layer axis
the scan slices, input = contracted, output = the rest; D model, F mlp, V vocab):

=========================================  ============  ==========  =====
path                                        shape         use         roles
=========================================  ============  ==========  =====
decoder/layers/self_attention/qkv/kernel    (L, D, 3D)    nn.Dense    s i o
decoder/layers/self_attention/out/kernel    (L, D, D)     nn.Dense    s i o
decoder/layers/mlp/wi/kernel                (L, D, F)     nn.Dense    s i o
decoder/layers/mlp/wo/kernel                (L, F, D)     nn.Dense    s i o
decoder/logits_dense/kernel                 (D, V)        nn.Dense    i o
=========================================  ============  ==========  =====

(all under ``params/``). ``decoder/token_embedder/embedding`` (V, D) is an ``nn.Embed`` lookup
(an embedding); RMSNorm scales (L, D) and biases (L, ...) are not matmul weights.

``make(key)`` gives ``(model.apply, params, (tokens,))``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Config:
  vocab_size: int = 64
  emb_dim: int = 32
  num_heads: int = 4
  mlp_dim: int = 64
  num_layers: int = 2
  remat_policy: str = 'nothing_saveable'


def sinusoidal(positions, dim):
  """Fixed sine/cosine position features (no parameters)."""
  inv = 1.0 / (10_000 ** (jnp.arange(0, dim, 2) / dim))
  ang = positions[..., None] * inv
  return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)


class SelfAttention(nn.Module):
  config: Config

  @nn.compact
  def __call__(self, x, mask):
    cfg = self.config
    b, t, d = x.shape
    head_dim = d // cfg.num_heads
    qkv = nn.Dense(3 * d, name='qkv')(x)
    q, k, v = jnp.split(qkv.reshape(b, t, 3 * cfg.num_heads, head_dim), 3, axis=2)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) * head_dim**-0.5
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    y = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, t, d)
    return nn.Dense(d, name='out')(y)


class Mlp(nn.Module):
  config: Config

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.config.mlp_dim, name='wi')(x)
    return nn.Dense(x.shape[-1], name='wo')(jax.nn.silu(h))


class DecoderLayer(nn.Module):
  """One pre-norm layer; ``(carry, mask) -> (carry, None)`` as ``nn.scan`` wants."""

  config: Config

  @nn.compact
  def __call__(self, x, mask):
    h = nn.RMSNorm(name='pre_self_attention_norm')(x)
    x = x + SelfAttention(self.config, name='self_attention')(h, mask)
    h = nn.RMSNorm(name='pre_mlp_norm')(x)
    x = x + Mlp(self.config, name='mlp')(h)
    return x, None


class Decoder(nn.Module):
  """``__call__(tokens) -> logits``."""

  config: Config

  @nn.compact
  def __call__(self, tokens):
    cfg = self.config
    t = tokens.shape[1]
    x = nn.Embed(cfg.vocab_size, cfg.emb_dim, name='token_embedder')(tokens)
    x = x + sinusoidal(jnp.arange(t), cfg.emb_dim)
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
    policy = getattr(jax.checkpoint_policies, cfg.remat_policy)
    layer = nn.remat(DecoderLayer, prevent_cse=False, policy=policy)
    x, _ = nn.scan(
        layer,
        variable_axes={'params': 0},
        split_rngs={'params': True},
        in_axes=(nn.broadcast,),
        length=cfg.num_layers,
    )(cfg, name='layers')(x, mask)
    x = nn.RMSNorm(name='decoder_norm')(x)
    return nn.Dense(cfg.vocab_size, name='logits_dense')(x)


class Model(nn.Module):
  config: Config

  @nn.compact
  def __call__(self, tokens):
    return Decoder(self.config, name='decoder')(tokens)


def make(key, config: Config | None = None, batch: int = 2, seq: int = 8):
  """``(model.apply, params, (tokens,))``."""
  config = config or Config()
  model = Model(config)
  tokens = jax.random.randint(jax.random.fold_in(key, 1), (batch, seq), 0, config.vocab_size)
  params = jax.jit(model.init)(key, tokens)
  return model.apply, params, (tokens,)
