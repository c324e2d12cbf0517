"""Train-step cost of LoRA on an NNX model: the ``lora_jax.nnx.LoRA`` module vs the functional
form, beside full fine-tuning of the same NNX model.

The model: an NNX GPT (token and position embeddings, ``nnx.MultiHeadAttention``, an MLP with
``nnx.Dropout``, LayerNorm), 4 layers, d=256, 4 heads, mlp 1024, seq 128, batch 8, vocab 512;
LoRA r=8 on every kernel (the default targets, the head included); AdamW. Variants:

* full FT: the bare model, ``nnx.Optimizer(model, tx, wrt=nnx.Param)``, ``nnx.jit`` step;
* functional: ``lora_jax.apply(lora_jax.nnx.functional(graphdef))`` over (params, lora, rest),
  optax by hand, ``jax.jit``;
* module, nnx.jit: ``lora_jax.nnx.LoRA`` with ``nnx.Optimizer(wrt=LoraParam)``, ``nnx.jit``;
* module, cached: the same step through ``nnx.cached_partial`` (Flax's way to skip the graph
  traversal that ``nnx.jit`` does in Python on every call).

Median step time over the timed steps (the variants take turns), ratio to full fine-tuning,
and compiled FLOPs where the step is a plain ``jax.jit`` function (functional; the module's
step lowered through ``nnx.split``).

    python benchmarks/nnx_step.py [--steps 7] [--small]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from common import compiled_stats, fmt_table, time_interleaved  # noqa: E402

import lora_jax  # noqa: E402
from lora_jax.nnx import LoRA, LoraParam  # noqa: E402


class Block(nnx.Module):
    def __init__(self, d, heads, mlp, rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, decode=False,
                                           rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, mlp, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.down = nnx.Linear(mlp, d, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.down(self.drop(nnx.gelu(self.up(self.ln2(x)))))


class GPT(nnx.Module):
    def __init__(self, vocab, d, heads, layers, mlp, seq, rngs):
        self.tok = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = nnx.Embed(seq, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, heads, mlp, rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, ids):
        x = self.tok(ids) + self.pos(jnp.arange(ids.shape[-1]))
        mask = nnx.make_causal_mask(ids)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))


def xent(logits, ids):
    logits, ids = logits[:, :-1], ids[:, 1:]
    return jnp.mean(jax.nn.logsumexp(logits, -1)
                    - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])


def nnx_train_step(model, opt, ids, wrt):
    loss, grads = nnx.value_and_grad(lambda m: xent(m(ids), ids),
                                     argnums=nnx.DiffState(0, wrt))(model)
    opt.update(model, grads)
    return loss


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--small", action="store_true", help="a tiny model (smoke test)")
    args = ap.parse_args(argv)
    cfg = (dict(vocab=64, d=32, heads=2, layers=1, mlp=64, seq=16) if args.small else
           dict(vocab=512, d=256, heads=4, layers=4, mlp=1024, seq=128))
    batch = 2 if args.small else 8
    make = lambda: GPT(**cfg, rngs=nnx.Rngs(0, dropout=1))  # noqa: E731
    ids = jax.random.randint(jax.random.key(1), (batch, cfg["seq"]), 0, cfg["vocab"])
    tx = optax.adamw(1e-3)
    runs, names, flops = [], [], []

    # Full fine-tuning of the NNX model.
    full = make()
    full_opt = nnx.Optimizer(full, tx, wrt=nnx.Param)
    full_step = nnx.jit(nnx_train_step, static_argnums=3)
    runs.append((lambda loss: (full_step(full, full_opt, ids, nnx.Param),), (jnp.zeros(()),), ()))
    names.append("full FT (nnx.jit)")
    flops.append(float("nan"))

    # The functional form.
    graphdef, params, rest = nnx.split(make(), nnx.Param, ...)
    lora = lora_jax.init(params, r=8, alpha=16, key=jax.random.key(2))
    fwd = lora_jax.apply(lora_jax.nnx.functional(graphdef))

    @jax.jit
    def fstep(lora, opt_state, rest, loss, params, ids):
        def loss_fn(lora):
            logits, new_rest = fwd(params, lora, rest, ids)
            return xent(logits, ids), new_rest
        (loss, rest), g = jax.value_and_grad(loss_fn, has_aux=True)(lora)
        upd, opt_state = tx.update(g, opt_state, lora)
        return optax.apply_updates(lora, upd), opt_state, rest, loss

    fstate = (lora, tx.init(lora), rest, jnp.zeros(()))
    _, f_flops, _ = compiled_stats(fstep, *fstate, params, ids)
    runs.append((fstep, fstate, (params, ids)))
    names.append("LoRA functional (jax.jit)")
    flops.append(f_flops)

    # The module, through nnx.jit and through nnx.cached_partial.
    lm = LoRA(make(), r=8, alpha=16, rngs=nnx.Rngs(2))
    opt = nnx.Optimizer(lm, tx, wrt=LoraParam)
    mstep = nnx.jit(nnx_train_step, static_argnums=3)
    runs.append((lambda loss: (mstep(lm, opt, ids, LoraParam),), (jnp.zeros(()),), ()))
    names.append("LoRA module (nnx.jit)")
    gdef, state = nnx.split((lm, opt))

    @jax.jit
    def pure(state, ids):
        m, o = nnx.merge(gdef, state)
        loss = nnx_train_step(m, o, ids, LoraParam)
        return nnx.state((m, o)), loss

    _, m_flops, _ = compiled_stats(pure, state, ids)
    flops.append(m_flops)
    lm2 = LoRA(make(), r=8, alpha=16, rngs=nnx.Rngs(2))
    opt2 = nnx.Optimizer(lm2, tx, wrt=LoraParam)
    cached = nnx.cached_partial(nnx.jit(nnx_train_step, static_argnums=3), lm2, opt2)
    runs.append((lambda loss: (cached(ids, LoraParam),), (jnp.zeros(()),), ()))
    names.append("LoRA module (cached_partial)")
    flops.append(m_flops)

    times = time_interleaved(runs, n_steps=args.steps)
    print(f"backend={jax.default_backend()} devices={jax.device_count()} jax={jax.__version__}")
    print(f"NNX GPT {cfg}, batch {batch}; r=8 on every kernel (head included); AdamW")
    rows = [(n, f"{t * 1e3:.0f}", f"{t / times[0]:.3f}", f"{t / times[1]:.3f}",
             "-" if f != f else f"{f / flops[1]:.3f}")
            for n, t, f in zip(names, times, flops)]
    print(fmt_table(("variant", "step ms", "/ full FT", "/ functional", "FLOPs / functional"),
                    rows))


if __name__ == "__main__":
    main()
