"""AdaLoRA on the reference GPT: where the rank budget goes, and what the allocator costs.

Trains the built-in GPT on a synthetic next-token task (a fixed random permutation walk, so the
loss can fall) with AdaLoRA (init_r=12, target_r=8 on q, k, v, o, up, down, orth-reg weight
0.5, PEFT's schedule) and prints three tables:

1. step time of LoRA at the same rank (r=12), AdaLoRA without the allocator and AdaLoRA with
   ``Allocator.update`` inside the same jitted step (the allocator's overhead);
2. loss and global budget at the phase boundaries (warm-up, budgeting, final);
3. the rank each module ends with (``finalize``'s rank pattern).

    python benchmarks/adalora_ranks.py [--small] [--steps 300] [--scan]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
from common import fmt_table, time_steps  # noqa: E402

import lora_jax  # noqa: E402
from lora_jax import adalora  # noqa: E402
from lora_jax.models.gpt import GPT, GPTConfig, loss_fn  # noqa: E402

TARGETS = r".*/(q|k|v|o|up|down)/kernel"


def batches(vocab, seq, batch, seed=0):
    """Endless batches of walks through a fixed random permutation of the vocabulary."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(vocab)
    while True:
        start = rng.integers(0, vocab, (batch, 1))
        walk = [start]
        for _ in range(seq - 1):
            walk.append(perm[walk[-1]])
        yield jnp.asarray(np.concatenate(walk, axis=1), jnp.int32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="a tiny model (smoke test)")
    ap.add_argument("--scan", action="store_true", help="stack the layers with nn.scan")
    ap.add_argument("--steps", type=int, default=300, help="total_steps of the schedule")
    ap.add_argument("--timed", type=int, default=5, help="timed steps per variant")
    args = ap.parse_args(argv)
    if args.small:
        cfg, batch = GPTConfig(vocab=128, d=64, heads=4, layers=2, mlp=128, seq=32,
                               scan=args.scan), 4
    else:
        cfg, batch = GPTConfig(scan=args.scan), 8
    model = GPT(cfg)
    data = batches(cfg.vocab, cfg.seq, batch)
    tokens = next(data)
    params = model.init(jax.random.key(1), tokens)
    stack = {".*layers.*": 1} if cfg.scan else None
    T = args.steps
    alloc = adalora.Allocator(total_steps=T, tinit=T // 10, tfinal=T // 5, delta_t=max(T // 100, 1))
    ada = adalora.init(params, init_r=12, target_r=8, alpha=16, targets=TARGETS,
                       key=jax.random.key(2), stack_axes=stack)
    lora = lora_jax.init(params, r=12, alpha=16, targets=TARGETS, key=jax.random.key(2),
                         stack_axes=stack)
    tx = optax.adamw(2e-3)
    f = lora_jax.apply(model.apply)

    def step_fn(with_alloc, is_ada):
        def step(l, o, s, base, tok, t):
            def loss(l):
                task = loss_fn(f(base, l, tok), tok)
                return task + (0.5 * adalora.orth_reg(l) if is_ada else 0.0), task

            (_, task), g = jax.value_and_grad(loss, has_aux=True)(l)
            upd, o = tx.update(g, o, l)
            l = optax.apply_updates(l, upd)
            if with_alloc:
                l, s = alloc.update(l, s, g, t)
            return l, o, s, base, tok, t + 1, task

        return jax.jit(step, donate_argnums=(0, 1, 2))

    # 1. step time
    rows, base_t = [], None
    for name, tree, is_ada, with_alloc in [("LoRA r=12", lora, False, False),
                                           ("AdaLoRA r=12, no allocator", ada, True, False),
                                           ("AdaLoRA r=12 + Allocator.update", ada, True, True)]:
        tree = jax.tree.map(jnp.copy, tree)
        s = alloc.init(tree) if is_ada else None
        step = step_fn(with_alloc, is_ada)
        state = (tree, tx.init(tree), s, params, tokens, jnp.int32(T // 2))
        t, _ = time_steps(lambda *a: step(*a)[:6], state, n_steps=args.timed)
        base_t = base_t or t
        rows.append([name, f"{t * 1e3:.1f}", f"{t / base_t:.3f}",
                     f"{lora_jax.param_count(tree):,}"])
    print(f"backend={jax.default_backend()} scan={cfg.scan} batch={batch} seq={cfg.seq} "
          f"d={cfg.d} layers={cfg.layers}; schedule {alloc}\n")
    print(fmt_table(["variant", "step ms", "time/LoRA", "trainable"], rows), "\n")

    # 2. a full AdaLoRA run through every phase
    step = step_fn(True, True)
    l, o, s = jax.tree.map(jnp.copy, ada), tx.init(ada), alloc.init(ada)
    t = jnp.int32(0)
    marks = {0, alloc.tinit, (alloc.tinit + T - alloc.tfinal) // 2, T - alloc.tfinal, T - 1}
    rows = []
    for i in range(T):
        l, o, s, _, _, t, task = step(l, o, s, params, next(data), t)
        if i in marks:
            kept = sum(int(np.asarray(m).sum()) for m in jax.tree.leaves(s.mask))
            rows.append([i, f"{float(task):.4f}", int(s.budget), kept])
    print(fmt_table(["step", "task loss", "budget", "triplets kept"], rows), "\n")

    # 3. the final per-module ranks
    final, ranks = adalora.finalize(l, s)
    print(fmt_table(["module", "rank"], [[p, r] for p, r in ranks.items()]))
    print(f"\n{lora_jax.summary(final, params)}")


if __name__ == "__main__":
    main()
