"""A tiny GPT in Flax NNX, used through its functional form ``fn(state, tokens)``.

Token and position ``nnx.Embed`` tables, pre-norm blocks of ``nnx.MultiHeadAttention`` (causal
mask) and a GELU MLP of ``nnx.Linear`` with ``nnx.Dropout``, ``nnx.LayerNorm``, a separate
``nnx.Linear`` head. The NNX object is split once (``nnx.split(model, nnx.Param, ...)``); the
function merges the parameter state back for every call, so the state is an ordinary pytree
argument. Layouts (paths of the ``nnx.State``; input = contracted axes, output = the rest; D
model, N heads, H head dim, F mlp, V vocab, T max positions):

=============================  ===========  ============================  =====
path                            shape        use                           roles
=============================  ===========  ============================  =====
blocks/{i}/attn/query/kernel    (D, N, H)    LinearGeneral, contracts D    i o o
blocks/{i}/attn/key/kernel      (D, N, H)    LinearGeneral                 i o o
blocks/{i}/attn/value/kernel    (D, N, H)    LinearGeneral                 i o o
blocks/{i}/attn/out/kernel      (N, H, D)    LinearGeneral, contracts N,H  i i o
blocks/{i}/up/kernel            (D, F)       nnx.Linear                    i o
blocks/{i}/down/kernel          (F, D)       nnx.Linear                    i o
head/kernel                     (D, V)       nnx.Linear                    i o
=============================  ===========  ============================  =====

``tok/embedding`` (V, D) and ``pos/embedding`` (T, D) are lookups (embeddings).

``make(key)`` gives ``(fn, state, (tokens,))`` with dropout off (deterministic), so values are
comparable; ``make(key, deterministic=False)`` gives ``fn(state, tokens, dropout_key)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

VOCAB, SEQ, D, HEADS, MLP, LAYERS, DROPOUT = 64, 16, 32, 4, 64, 2, 0.1


class Block(nnx.Module):

    def __init__(self, d: int, heads: int, mlp: int, dropout: float, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, decode=False,
                                           keep_rngs=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, mlp, rngs=rngs)
        self.down = nnx.Linear(mlp, d, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x, mask, *, deterministic: bool | None = None, rngs=None):
        x = x + self.attn(self.ln1(x), mask=mask, deterministic=True)
        h = self.down(nnx.gelu(self.up(self.ln2(x))))
        return x + self.drop(h, deterministic=deterministic, rngs=rngs)


class GPT(nnx.Module):

    def __init__(self, *, rngs: nnx.Rngs, vocab=VOCAB, seq=SEQ, d=D, heads=HEADS, mlp=MLP,
                 layers=LAYERS, dropout=DROPOUT):
        self.tok = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = nnx.Embed(seq, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, heads, mlp, dropout, rngs=rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, tokens, *, deterministic: bool | None = None, rngs=None):
        t = tokens.shape[-1]
        x = self.tok(tokens) + self.pos(jnp.arange(t))
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask, deterministic=deterministic, rngs=rngs)
        return self.head(self.ln_f(x))


def make(key, deterministic: bool = True, batch: int = 2, seq: int = 8):
    """``(fn, state, args)``: ``fn(state, tokens[, dropout_key]) -> logits``."""
    model = GPT(rngs=nnx.Rngs(params=key, dropout=jax.random.fold_in(key, 7)))
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    tokens = jax.random.randint(jax.random.fold_in(key, 1), (batch, seq), 0, VOCAB)

    if deterministic:
        def fn(state, tokens):
            return nnx.merge(graphdef, state, rest)(tokens, deterministic=True)

        return fn, state, (tokens,)

    def train_fn(state, tokens, dropout_key):
        model = nnx.merge(graphdef, state, rest)
        return model(tokens, deterministic=False, rngs=nnx.Rngs(dropout=dropout_key))

    return train_fn, state, (tokens, jax.random.fold_in(key, 2))
