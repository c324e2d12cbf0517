"""Inference cost: the base model, the merged model, and LoRA applied on the fly.

    python benchmarks/inference.py [--steps 10] [--scan]

On the reference GPT (batch 8 x 128 tokens): forward time, ratio to the base model, compiled
FLOPs. ``merge`` gives plain parameters, so merged inference runs the base model's program.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(__file__))
from common import compiled_stats, fmt_table, time_steps  # noqa: E402

import lora_jax  # noqa: E402
from lora_jax.models.gpt import GPT, GPTConfig  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--scan", action="store_true")
    args = ap.parse_args(argv)
    cfg = GPTConfig(scan=args.scan)
    model = GPT(cfg)
    tok = jax.random.randint(jax.random.key(0), (8, cfg.seq), 0, cfg.vocab)
    params = model.init(jax.random.key(1), tok)
    lora = lora_jax.init(params, r=8, key=jax.random.key(2),
                         stack_axes={".*layers.*": 1} if cfg.scan else None)
    leaves, tree = jax.tree.flatten(lora)
    lora = jax.tree.unflatten(tree, [x + 0.01 for x in leaves])
    merged = lora_jax.merge(params, lora)
    f = lora_jax.apply(model.apply)
    variants = [
        ("base model", jax.jit(model.apply), (params, tok)),
        ("merged LoRA", jax.jit(model.apply), (merged, tok)),
        ("apply(), unmerged", jax.jit(f), (params, lora, tok)),
    ]
    rows = []
    for name, fn, inputs in variants:
        compiled, flops, peak = compiled_stats(fn, *inputs)
        t, _ = time_steps(lambda *a: (compiled(*inputs),), (), n_steps=args.steps)
        rows.append([name, t, flops, peak])
    t0, f0 = rows[0][1], rows[0][2]
    print(f"backend={jax.default_backend()} scan={cfg.scan} batch=8 seq={cfg.seq} d={cfg.d}")
    print(fmt_table(["variant", "forward ms", "time/base", "GFLOPs", "flops/base", "peak MiB"],
                    [[n, f"{t * 1e3:.1f}", f"{t / t0:.3f}", f"{fl / 1e9:.2f}", f"{fl / f0:.4f}",
                      f"{p / 2**20:.1f}"] for n, t, fl, p in rows]))


if __name__ == "__main__":
    main()
