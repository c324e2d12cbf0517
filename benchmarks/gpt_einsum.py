"""The reference GPT with heads-first einsum kernels, for ``train_step.py``'s einsum variant.

The same model as :class:`lora_jax.models.gpt.GPT` (its ``GPTConfig``: sizes, dtype, ``scan``,
``remat``, ``tied``; pre-norm blocks, LayerNorms, learned positions, causal softmax attention,
GELU MLP), written the way gemma writes it: every projection is a bias-free parameter named
``w`` that ``jnp.einsum`` consumes, with the contracted axis wherever that library puts it.

=================  ==========  ==============  =======  ==========================
path (per block)    shape       einsum          roles    LoRA factors (by use)
=================  ==========  ==============  =======  ==========================
attn/q/w            (N, D, H)   BTD,NDH->BTNH   o i o    A (D, r), B (r, N, H)
attn/k/w            (N, D, H)   BTD,NDH->BTNH   o i o    A (D, r), B (r, N, H)
attn/v/w            (N, D, H)   BTD,NDH->BTNH   o i o    A (D, r), B (r, N, H)
attn/o/w            (N, H, D)   BTNH,NHD->BTD   i i o    A (N, H, r), B (r, D)
mlp/up/w            (D, F)      BTD,DF->BTF     i o      A (D, r), B (r, F)
mlp/down/w          (F, D)      BTF,FD->BTD     i o      A (F, r), B (r, D)
=================  ==========  ==============  =======  ==========================

Blocks are ``params/block_{i}/...``, or with ``scan=True`` one stacked
``params/layers/block/...`` whose kernels gain a leading layer axis (roles ``s`` + the above).
``params/embed/embedding`` (V, D) is an ``nn.Embed`` (lookup; ``attend`` when tied),
``params/pos`` (T, D) is added, and the untied head is ``params/head/w`` (D, V), ``BTD,DV->BTV``.

Note: unlike the Dense GPT, the projections have no biases (gemma's have none), so the model
has the Dense GPT's parameter count less its 6 biases per block (and the head's); the matmul
FLOPs are the same. LoRA on the same six projections per block at rank r gives the same
adapter size as the Dense GPT's, r·(D + N·H) per attention projection and r·(D + F) per MLP
one, since N·H = D; the targets by name are ``TARGETS`` below, by use ``lora_jax.trace``.

    >>> from lora_jax.models.gpt import GPTConfig
    >>> fn, params, tokens = make(GPTConfig(vocab=64, d=32, heads=4, layers=2, mlp=64, seq=16),
    ...                           batch=2)
    >>> fn(params, tokens).shape
    (2, 16, 64)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.models.gpt import GPTConfig, loss_fn  # noqa: F401  (loss_fn: for the benchmark)

TARGETS = r".*/(q|k|v|o|up|down)/w"


def _init(in_axis, out_axis):
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=in_axis, out_axis=out_axis)


class Einsum(nn.Module):
    """``jnp.einsum(eqn, x, w)`` over one param ``w`` (cast to the compute dtype)."""

    shape: tuple[int, ...]
    eqn: str
    in_axis: int | tuple[int, ...]
    out_axis: int | tuple[int, ...]
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        w = self.param("w", _init(self.in_axis, self.out_axis), self.shape)
        dt = jnp.dtype(self.dtype)
        return jnp.einsum(self.eqn, x.astype(dt), w.astype(dt))


class Attention(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        n, d = cfg.heads, cfg.d
        h = d // n
        proj = lambda name: Einsum((n, d, h), "BTD,NDH->BTNH", 1, (0, 2), cfg.dtype,  # noqa
                                   name=name)
        q, k, v = proj("q")(x), proj("k")(x), proj("v")(x)
        t = x.shape[1]
        att = jnp.einsum("BTNH,BSNH->BNTS", q, k) / jnp.sqrt(h).astype(q.dtype)
        mask = jnp.tril(jnp.ones((t, t), bool))
        att = jnp.where(mask, att, jnp.finfo(att.dtype).min)
        att = jax.nn.softmax(att.astype(jnp.float32), axis=-1).astype(q.dtype)
        y = jnp.einsum("BNTS,BSNH->BTNH", att, v)
        return Einsum((n, h, d), "BTNH,NHD->BTD", (0, 1), 2, cfg.dtype, name="o")(y)


class Mlp(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        up = Einsum((cfg.d, cfg.mlp), "BTD,DF->BTF", 0, 1, cfg.dtype, name="up")
        down = Einsum((cfg.mlp, cfg.d), "BTF,FD->BTD", 0, 1, cfg.dtype, name="down")
        return down(nn.gelu(up(x)))


class Block(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x):
        dt = jnp.dtype(self.cfg.dtype)
        x = x + Attention(self.cfg, name="attn")(nn.LayerNorm(dtype=dt, name="ln1")(x))
        return x + Mlp(self.cfg, name="mlp")(nn.LayerNorm(dtype=dt, name="ln2")(x))


class ScanBlock(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x, _):
        return Block(self.cfg, name="block")(x), None


class GPTEinsum(nn.Module):
    """``__call__(tokens) -> logits`` (float32)."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, tokens):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        emb = nn.Embed(cfg.vocab, cfg.d, name="embed")
        pos = self.param("pos", nn.initializers.normal(0.02), (cfg.seq, cfg.d))
        x = (emb(tokens) + pos[: tokens.shape[1]]).astype(dt)
        if cfg.scan:
            block = nn.remat(ScanBlock) if cfg.remat else ScanBlock
            x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                           length=cfg.layers)(cfg, name="layers")(x, None)
        else:
            block = nn.remat(Block) if cfg.remat else Block
            for i in range(cfg.layers):
                x = block(cfg, name=f"block_{i}")(x)
        x = nn.LayerNorm(dtype=dt, name="ln_f")(x)
        if cfg.tied:
            return emb.attend(x).astype(jnp.float32)
        head = Einsum((cfg.d, cfg.vocab), "BTD,DV->BTV", 0, 1, cfg.dtype, name="head")
        return head(x).astype(jnp.float32)


def make(config: GPTConfig | None = None, batch: int = 8, key: jax.Array | None = None):
    """``(apply_fn, params, tokens)`` for the einsum GPT; ``apply_fn(params, tokens) -> logits``.

    Args:
      config: a ``GPTConfig``; default the reference one of ``train_step.py``.
      batch: rows of the token batch (``train_step.py`` uses 8).
      key: PRNG key for the tokens and the parameters.
    """
    config = config or GPTConfig()
    key = jax.random.key(0) if key is None else key
    model = GPTEinsum(config)
    tokens = jax.random.randint(jax.random.fold_in(key, 0), (batch, config.seq), 0, config.vocab)
    params = jax.jit(model.init)(jax.random.fold_in(key, 1), tokens)
    return model.apply, params, tokens
