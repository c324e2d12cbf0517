"""A compact GPT in Flax Linen: the demo's and benchmarks' built-in model.

Pre-norm blocks with causal multi-head attention (``q``, ``k``, ``v``, ``o`` Dense kernels)
and a GELU MLP (``up``, ``down``), learned positions, a tied or separate output head, and
optionally ``nn.scan`` over layers (stacked kernels) and ``nn.remat``.

>>> import jax, jax.numpy as jnp
>>> cfg = GPTConfig(vocab=64, d=32, heads=4, layers=2, mlp=64, seq=16)
>>> model = GPT(cfg)
>>> tokens = jnp.zeros((2, 16), jnp.int32)
>>> params = model.init(jax.random.key(0), tokens)
>>> model.apply(params, tokens).shape
(2, 16, 64)
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab: int = 2048
    d: int = 512
    heads: int = 8
    layers: int = 4
    mlp: int = 2048
    seq: int = 128
    dtype: str = "float32"  # compute dtype; params stay float32
    scan: bool = False  # stack layers with nn.scan
    remat: bool = False
    tied: bool = False  # output head = embedding transposed


class Block(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        b, t, d = x.shape
        hd = d // cfg.heads
        h = nn.LayerNorm(dtype=dt, name="ln1")(x)
        dense = lambda n, f: nn.Dense(f, dtype=dt, name=n)  # noqa: E731
        q = dense("q", d)(h).reshape(b, t, cfg.heads, hd)
        k = dense("k", d)(h).reshape(b, t, cfg.heads, hd)
        v = dense("v", d)(h).reshape(b, t, cfg.heads, hd)
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd).astype(dt)
        mask = jnp.tril(jnp.ones((t, t), bool))
        att = jnp.where(mask, att, jnp.finfo(att.dtype).min)
        att = jax.nn.softmax(att.astype(jnp.float32), axis=-1).astype(dt)
        y = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
        x = x + dense("o", d)(y)
        h = nn.LayerNorm(dtype=dt, name="ln2")(x)
        h = dense("down", d)(nn.gelu(dense("up", cfg.mlp)(h)))
        return x + h


class ScanBlock(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x, _):
        return Block(self.cfg, name="block")(x), None


class GPT(nn.Module):
    """Decoder-only transformer; ``__call__(tokens) -> logits``."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, tokens):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        emb = nn.Embed(cfg.vocab, cfg.d, name="embed")
        pos = self.param("pos", nn.initializers.normal(0.02), (cfg.seq, cfg.d))
        x = emb(tokens) + pos[: tokens.shape[1]]
        x = x.astype(dt)
        if cfg.scan:
            block = nn.remat(ScanBlock) if cfg.remat else ScanBlock
            x, _ = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                length=cfg.layers,
            )(cfg, name="layers")(x, None)
        else:
            block = nn.remat(Block) if cfg.remat else Block
            for i in range(cfg.layers):
                x = block(cfg, name=f"block_{i}")(x)
        x = nn.LayerNorm(dtype=dt, name="ln_f")(x)
        if cfg.tied:
            return emb.attend(x).astype(jnp.float32)
        return nn.Dense(cfg.vocab, dtype=dt, name="head")(x).astype(jnp.float32)


def loss_fn(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Next-token cross entropy (mean over positions 0..T-2)."""
    lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    tgt = tokens[:, 1:]
    return -jnp.mean(jnp.take_along_axis(lp, tgt[..., None], axis=-1))
