"""Train-step cost of full fine-tuning vs LoRA (merged-weight path vs fast path).

The reference GPT: 4 layers, d=512, mlp 2048, 8 heads, seq 128, batch 8, vocab 2048;
LoRA r=8 on q, k, v, o, up, down; AdamW. ``--model einsum`` is the same model written with
heads-first einsum kernels (``benchmarks/gpt_einsum.py``: q/k/v (N, D, H), o (N, H, D)),
whose adapters take their layouts from ``lora_jax.trace``; ``--model both`` (the default)
prints a table for each. Per table: median step time over the timed steps (the variants
take turns, one step each, so load changes hit all alike), the ratio to full fine-tuning of
the same model, compiled FLOPs (``cost_analysis``), peak memory (``memory_analysis``:
arguments + temporaries + outputs − aliased) and trainable parameters.

    python benchmarks/train_step.py [--model gpt|einsum|both] [--scan] [--steps 7] [--small]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(__file__))
import gpt_einsum  # noqa: E402
from common import compiled_stats, fmt_table, time_interleaved  # noqa: E402

import lora_jax  # noqa: E402
from lora_jax.models.gpt import GPT, GPTConfig, loss_fn  # noqa: E402

TARGETS = r".*/(q|k|v|o|up|down)/kernel"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("gpt", "einsum", "both"), default="both",
                    help="the Dense reference GPT, its heads-first einsum twin, or both")
    ap.add_argument("--scan", action="store_true", help="stack the layers with nn.scan")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--small", action="store_true", help="a tiny model (smoke test)")
    ap.add_argument("--dtype", default="float32", help="compute dtype (params stay float32)")
    args = ap.parse_args(argv)
    if args.small:
        cfg = GPTConfig(vocab=128, d=64, heads=4, layers=2, mlp=128, seq=32, scan=args.scan,
                        dtype=args.dtype)
        batch = 2
    else:
        cfg = GPTConfig(scan=args.scan, dtype=args.dtype)
        batch = 8
    for name in (("gpt", "einsum") if args.model == "both" else (args.model,)):
        run(name, cfg, batch, args.steps)


def run(model_name, cfg, batch, n_steps):
    tokens = jax.random.randint(jax.random.key(0), (batch, cfg.seq), 0, cfg.vocab)
    if model_name == "gpt":
        apply_fn = GPT(cfg).apply
        params = apply_fn.__self__.init(jax.random.key(1), tokens)
        stack = {".*layers.*": 1} if cfg.scan else None
        lora = lora_jax.init(params, r=8, alpha=16, targets=TARGETS, key=jax.random.key(2),
                             stack_axes=stack)
    else:  # layouts by use: A over the contracted D of (N, D, H), B over (N, H)
        apply_fn, params, tokens = gpt_einsum.make(cfg, batch=batch, key=jax.random.key(1))
        layouts = lora_jax.trace(apply_fn, params, tokens)
        lora = lora_jax.init(params, r=8, alpha=16, targets=gpt_einsum.TARGETS,
                             key=jax.random.key(2), layouts=layouts)
    tx = optax.adamw(1e-4)

    def full_step(p, o, tok):
        loss, g = jax.value_and_grad(lambda p: loss_fn(apply_fn(p, tok), tok))(p)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o

    def make_lora_step(mode):
        f = lora_jax.apply(apply_fn, mode=mode)

        def step(l, o, base, tok):
            loss, g = jax.value_and_grad(lambda l: loss_fn(f(base, l, tok), tok))(l)
            upd, o = tx.update(g, o, l)
            return optax.apply_updates(l, upd), o

        return step

    rows = []
    variants = [
        ("full fine-tuning", full_step, (params, tx.init(params)), (tokens,), params),
        ("LoRA merged weights", make_lora_step("merged"), (lora, tx.init(lora)), (params, tokens),
         lora),
        ("LoRA fast path", make_lora_step("fast"), (lora, tx.init(lora)), (params, tokens), lora),
    ]
    compiled = []
    for name, step, state, extra, trainable in variants:
        state = jax.tree.map(jnp.copy, state)  # donation must not delete shared arrays
        jitted = jax.jit(step, donate_argnums=(0, 1))
        c, flops, peak = compiled_stats(jitted, *state, *extra)
        compiled.append((c, state, extra))
        rows.append([name, None, None, flops, None, f"{peak / 2**20:.1f}",
                     f"{lora_jax.param_count(trainable):,}"])
    times = time_interleaved(compiled, n_steps=n_steps)
    for r, t in zip(rows, times):
        r[1], r[2] = f"{t * 1e3:.1f}", f"{t / times[0]:.3f}"
        r[4] = f"{r[3] / rows[0][3]:.3f}"
    for r in rows:
        r[3] = f"{r[3] / 1e9:.2f}"
    print(f"\nmodel={model_name} backend={jax.default_backend()} devices={jax.device_count()} "
          f"scan={cfg.scan} "
          f"dtype={cfg.dtype} batch={batch} seq={cfg.seq} d={cfg.d} layers={cfg.layers}")
    print(fmt_table(["variant", "step ms", "time/full", "GFLOPs", "flops/full", "peak MiB",
                     "trainable"], rows))


if __name__ == "__main__":
    main()
