"""Train-step cost of DoRA vs LoRA on the reference GPT (dense and NF4 bases).

The reference GPT of ``train_step.py`` (4 layers, d=512, mlp 2048, seq 128, batch 8), r=8 on
q, k, v, o, up, down, AdamW. Variants take turns one step each (``time_interleaved``):
LoRA and DoRA on the fast path, DoRA through the merged weight (``mode="merged"``: the
model's own matmul on ``m·V/‖V‖``, autodiff), and with ``--qlora`` the same on an NF4 base.
Prints median step time, the ratio to LoRA, compiled FLOPs and peak memory.

    python benchmarks/dora_step.py [--steps 7] [--qlora] [--small]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(__file__))
from common import compiled_stats, fmt_table, time_interleaved  # noqa: E402

import lora_jax  # noqa: E402
from lora_jax.models.gpt import GPT, GPTConfig, loss_fn  # noqa: E402

TARGETS = r".*/(q|k|v|o|up|down)/kernel"


def main(argv=None):
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--qlora", action="store_true", help="also on an NF4 (double quant) base")
    ap.add_argument("--small", action="store_true", help="a tiny model (smoke test)")
    args = ap.parse_args(argv)
    if args.small:
        cfg, batch = GPTConfig(vocab=128, d=64, heads=4, layers=2, mlp=128, seq=32), 2
    else:
        cfg, batch = GPTConfig(), 8
    model = GPT(cfg)
    tokens = jax.random.randint(jax.random.key(0), (batch, cfg.seq), 0, cfg.vocab)
    params = model.init(jax.random.key(1), tokens)
    lora = lora_jax.init(params, r=8, alpha=16, targets=TARGETS, key=jax.random.key(2))
    dora = lora_jax.init(params, r=8, alpha=16, targets=TARGETS, key=jax.random.key(2),
                         dora=True)
    tx = optax.adamw(1e-4)

    def make(mode):
        f = lora_jax.apply(model.apply, mode=mode)

        def step(l, o, base, tok):
            loss, g = jax.value_and_grad(lambda l: loss_fn(f(base, l, tok), tok))(l)
            upd, o = tx.update(g, o, l)
            return optax.apply_updates(l, upd), o

        return step

    variants = [("LoRA fast path", "fast", lora, params),
                ("DoRA fast path", "fast", dora, params),
                ("DoRA merged weights", "merged", dora, params)]
    if args.qlora:
        q = lora_jax.quantize(params, "nf4", double_quant=True)
        qdora = lora_jax.init(q, r=8, alpha=16, targets=TARGETS, key=jax.random.key(2),
                              dora=True)
        variants += [("QLoRA (NF4) fast path", "fast", lora, q),
                     ("QDoRA (NF4) fast path", "fast", qdora, q)]
    rows, compiled = [], []
    for name, mode, tree, base in variants:
        state = jax.tree.map(jnp.copy, (tree, tx.init(tree)))
        jitted = jax.jit(make(mode), donate_argnums=(0, 1))
        c, flops, peak = compiled_stats(jitted, *state, base, tokens)
        compiled.append((c, state, (base, tokens)))
        rows.append([name, None, None, flops, None, f"{peak / 2**20:.1f}"])
    times = time_interleaved(compiled, n_steps=args.steps)
    flops0 = rows[0][3]
    for r, t in zip(rows, times):
        r[1], r[2] = f"{t * 1e3:.1f}", f"{t / times[0]:.3f}"
        r[3], r[4] = f"{r[3] / 1e9:.2f}", f"{r[3] / flops0:.3f}"
    print(f"\nbackend={jax.default_backend()} batch={batch} seq={cfg.seq} d={cfg.d} "
          f"layers={cfg.layers} r=8 on q,k,v,o,up,down")
    print(fmt_table(["variant", "step ms", "time/LoRA", "GFLOPs", "flops/LoRA", "peak MiB"],
                    rows))


if __name__ == "__main__":
    main()
