"""AdaLoRA vs LoRA at an equal final budget, on the demo's text adaptation.

The demo's byte-level GPT is pretrained on the Python language reference, then adapted to
stdlib docstrings with (a) LoRA r=2 on every kernel and (b) AdaLoRA init_r=6 -> target_r=2,
whose final budget (2 x number of modules triplets) equals LoRA r=2's total rank, so the
final adapters have the same parameter count. Prints held-out loss (nats/byte) and the rank
AdaLoRA gives each module.

    python benchmarks/adalora_quality.py [--steps 400] [--pretrain-steps 300]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(__file__))
from common import fmt_table  # noqa: E402

import lora_jax  # noqa: E402
from lora_jax import adalora  # noqa: E402
from lora_jax.demo.data import batches  # noqa: E402
from lora_jax.demo.gpt import pretrained_gpt  # noqa: E402
from lora_jax.models.gpt import loss_fn  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)
    model, params, data = pretrained_gpt(steps=args.pretrain_steps, lr=args.lr)
    cfg = model.cfg
    ad_train, test = data["adapt_train"], data["adapt_test"]
    tx = optax.adamw(args.lr)
    f = lora_jax.apply(model.apply)
    ev = jax.jit(lambda l: jnp.mean(jnp.stack([loss_fn(f(params, l, t), t) for t in test])))
    T = args.steps
    alloc = adalora.Allocator(total_steps=T, tinit=T // 10, tfinal=T // 5, delta_t=5)

    def run(tree, is_ada):
        s = alloc.init(tree) if is_ada else None

        @jax.jit
        def step(l, o, s, tok, t):
            def loss(l):
                task = loss_fn(f(params, l, tok), tok)
                return task + (0.1 * adalora.orth_reg(l) if is_ada else 0.0)

            g = jax.grad(loss)(l)
            upd, o = tx.update(g, o, l)
            l = optax.apply_updates(l, upd)
            if is_ada:
                l, s = alloc.update(l, s, g, t)
            return l, o, s

        o, data = tx.init(tree), batches(ad_train, 16, cfg.seq, 1)
        for i in range(T):
            tree, o, s = step(tree, o, s, next(data), jnp.int32(i))
        return tree, s

    before = float(ev(lora_jax.init(params, r=2, key=jax.random.key(1))))
    lora, _ = run(lora_jax.init(params, r=2, alpha=4, key=jax.random.key(1)), False)
    ada, state = run(adalora.init(params, init_r=6, target_r=2, alpha=12, key=jax.random.key(1)),
                     True)
    final, ranks = adalora.finalize(ada, state)
    rows = [["LoRA r=2", lora_jax.param_count(lora), f"{before:.4f}", f"{float(ev(lora)):.4f}"],
            ["AdaLoRA 6 -> 2 (finalized)", lora_jax.param_count(final), f"{before:.4f}",
             f"{float(ev(final)):.4f}"]]
    print(f"byte-level GPT d={cfg.d} layers={cfg.layers}; {T} adaptation steps; schedule {alloc}")
    print(fmt_table(["method", "final params", "loss before", "loss after"], rows))
    mods = ["q", "k", "v", "o", "up", "down"]
    grid = [[f"block_{i}"] + [ranks.get(f"params/block_{i}/{m}/kernel", 0) for m in mods]
            for i in range(cfg.layers)]
    grid.append(["head"] + [ranks.get("params/head/kernel", 0)] + [""] * 5)
    print("\nAdaLoRA final rank per module (LoRA: 2 everywhere)")
    print(fmt_table(["layer"] + mods, grid))


if __name__ == "__main__":
    main()
