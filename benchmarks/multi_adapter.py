"""Many adapters on one base: K adapters routed per example vs one adapter.

The reference GPT (4 layers, d=512, mlp 2048, seq 128, vocab 2048), batch 8 × 128, LoRA r=8
on q, k, v, o, up, down; Adam. One table per run, the variants taking turns
(``time_interleaved``), ratios to the one-adapter baseline of each block:

* train: one adapter on the batch (the fast path) vs a stack of K=8, one example each, for
  each routing (``gather``: per-example factors; ``onehot``: all K side by side, masked);
* forward: the same, forward only; the one-adapter baselines are the fast (merged-weight)
  forward and a one-slot stack (the unmerged per-example path);
* decode: the bundled Llama at the same size (8 heads, 8 KV heads), one token per row with a
  KV cache of 128, one adapter vs K=8;
* memory: compiled peak of the train step and argument bytes for K = 1, 8, 64.

``--routes``: only the routings side by side (gather, onehot, grouped) on a smaller GPT (2
layers, d=128, mlp 512), 64 rows, K = 8 and 64 adapters (ids ``row % K``): prefill (128
tokens per row) and decode (one token per row, no cache), forward and train step; ratios to
gather in each block.

    python benchmarks/multi_adapter.py [--steps 5] [--small] [--routes]
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
from lora_jax import multi  # noqa: E402
from lora_jax.models import llama as L  # noqa: E402
from lora_jax.models.gpt import GPT, GPTConfig, loss_fn  # noqa: E402

TARGETS = r".*/(q|k|v|o|up|down)/kernel"
LLAMA_TARGETS = r".*/(q_proj|k_proj|v_proj|o_proj|up_proj|down_proj|gate_proj)/kernel"


def adapters(params, k, targets, seed=2):
    return [lora_jax.init(params, r=8, alpha=16, targets=targets, key=jax.random.key(seed + i))
            for i in range(k)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="a tiny model (smoke test)")
    ap.add_argument("--routes", action="store_true", help="only the routing comparison")
    args = ap.parse_args(argv)
    if args.routes:
        return routes(args.steps, args.small)
    if args.small:
        cfg, batch = GPTConfig(vocab=128, d=64, heads=4, layers=2, mlp=128, seq=32), 8
    else:
        cfg, batch = GPTConfig(), 8
    k = 8
    tok = jax.random.randint(jax.random.key(0), (batch, cfg.seq), 0, cfg.vocab)
    model = GPT(cfg)
    params = model.init(jax.random.key(1), tok)
    one = adapters(params, 1, TARGETS)[0]
    stacks = {n: lora_jax.stack(adapters(params, n, TARGETS)) for n in (1, k)}
    ids = {n: jnp.arange(batch, dtype=jnp.int32) % n for n in (1, k)}
    f = lora_jax.apply(model.apply)
    tx = optax.adam(1e-4)

    def train_one(lo, o, base, t):
        g = jax.grad(lambda lo: loss_fn(f(base, lo, t), t))(lo)
        u, o = tx.update(g, o, lo)
        return optax.apply_updates(lo, u), o

    def train_stack(n, routing):
        def step(s, o, base, t):
            def loss(s):  # each example's own mean, averaged: one adapter per example
                lg = f(base, s, t, adapter_ids=ids[n], routing=routing)
                return jnp.mean(jax.vmap(lambda a, b: loss_fn(a[None], b[None]))(lg, t))
            g = jax.grad(loss)(s)
            u, o = tx.update(g, o, s)
            return optax.apply_updates(s, u), o
        return step

    rows, runs = [], []

    def add(block, name, fn, state, extra):
        state = jax.tree.map(jnp.copy, state)  # donated: each variant its own copy
        jitted = jax.jit(fn, donate_argnums=tuple(range(len(state))))
        _, flops, peak = compiled_stats(jitted, *state, *extra)
        rows.append([block, name, flops, peak])
        runs.append((jitted, state, extra))

    add("train", "1 adapter (fast path)", train_one, (one, tx.init(one)), (params, tok))
    for routing in multi.ROUTINGS:
        s = stacks[k]
        add("train", f"K={k} {routing}", train_stack(k, routing), (s, tx.init(s)), (params, tok))

    # forward/decode steps carry (adapters, last output) so that the output is not dead code
    y0 = jnp.zeros((batch, cfg.seq, cfg.vocab))

    def fwd_one(lo, _, base, t):
        return (lo, f(base, lo, t))

    def fwd_stack(n, routing):
        return lambda s, _, base, t: (s, f(base, s, t, adapter_ids=ids[n], routing=routing))

    add("forward", "1 adapter (fast, merged)", fwd_one, (one, y0), (params, tok))
    add("forward", "1-slot stack (unmerged)", fwd_stack(1, "gather"), (stacks[1], y0),
        (params, tok))
    for routing in multi.ROUTINGS:
        add("forward", f"K={k} {routing}", fwd_stack(k, routing), (stacks[k], y0), (params, tok))

    # decode: the bundled Llama, one token per row against a KV cache of cfg.seq positions
    lc = L.LlamaConfig(vocab=cfg.vocab, d=cfg.d, layers=cfg.layers, heads=cfg.heads,
                       kv_heads=cfg.heads, ffn=cfg.mlp, max_len=cfg.seq)
    lm = L.Llama(lc)
    lv = lm.init(jax.random.key(3), tok[:, :4])
    cache = L.init_cache(lc, batch, cfg.seq)._replace(length=jnp.int32(cfg.seq // 2))
    cache = cache._replace(k=jax.random.normal(jax.random.key(4), cache.k.shape),
                           v=jax.random.normal(jax.random.key(5), cache.v.shape))
    g = lora_jax.apply(lm.apply)
    lone = adapters(lv, 1, LLAMA_TARGETS)[0]
    lstack = lora_jax.stack(adapters(lv, k, LLAMA_TARGETS))
    axes = ((0,), {"cache": L.KVCache(1, 1, None)})
    step_tok = tok[:, :1]

    d0 = jnp.zeros((batch, 1, cfg.vocab))

    def dec_one(lo, _, base, t, c):
        return (lo, g(base, lo, t, cache=c)[0])

    def dec_stack(routing):
        return lambda s, _, base, t, c: (s, g(base, s, t, cache=c, adapter_ids=ids[k],
                                              batch_axes=axes, routing=routing)[0])

    add("decode", "1 adapter (fast, merged)", dec_one, (lone, d0), (lv, step_tok, cache))
    one_slot = lora_jax.stack([lone])
    add("decode", "1-slot stack (unmerged)",
        lambda s, _, base, t, c: (s, g(base, s, t, cache=c, adapter_ids=jnp.zeros(
            batch, jnp.int32), batch_axes=axes)[0]), (one_slot, d0), (lv, step_tok, cache))
    for routing in multi.ROUTINGS:
        add("decode", f"K={k} {routing}", dec_stack(routing), (lstack, d0),
            (lv, step_tok, cache))

    times = time_interleaved(runs, n_warmup=2, n_steps=args.steps)
    base_t, base_f = {}, {}
    table = []
    for (block, name, flops, peak), t in zip(rows, times):
        base_t.setdefault(block, t)
        base_f.setdefault(block, flops)
        table.append([block, name, f"{t * 1e3:.1f}", f"{t / base_t[block]:.3f}",
                      f"{flops / 1e9:.2f}", f"{flops / base_f[block]:.3f}", f"{peak / 2**20:.0f}"])
    print(f"{jax.devices()[0].platform}, batch {batch} x {cfg.seq}, d={cfg.d}, "
          f"{cfg.layers} layers, r=8 on q,k,v,o,up,down (Llama: +gate); median of "
          f"{args.steps} interleaved steps")
    print(fmt_table(["block", "variant", "ms", "ratio", "GFLOP", "FLOP ratio", "peak MiB"],
                    table))

    # memory: the base once whatever K; adapters and their optimizer state grow with K
    mem = []
    for n in (1, 8, 64):
        s = lora_jax.stack(adapters(params, n, TARGETS))
        i = jnp.arange(batch, dtype=jnp.int32) % n
        ids[n] = i
        jitted = jax.jit(train_stack(n, "gather"), donate_argnums=(0, 1))
        compiled, _, peak = compiled_stats(jitted, s, tx.init(s), params, tok)
        ma = compiled.memory_analysis()
        mem.append([n, f"{lora_jax.param_count(s) / 1e6:.2f}",
                    f"{ma.argument_size_in_bytes / 2**20:.0f}",
                    f"{ma.temp_size_in_bytes / 2**20:.0f}", f"{peak / 2**20:.0f}"])
    base_mib = sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20
    print(f"\ntrain step memory (gather), base {base_mib:.0f} MiB held once")
    print(fmt_table(["K", "adapter M params", "arguments MiB", "temporaries MiB",
                     "peak MiB"], mem))


def routes(steps: int, small: bool):
    """gather vs onehot vs grouped: K = 8, 64; prefill and decode; forward and train."""
    cfg = GPTConfig(vocab=256, d=128, heads=4, layers=2, mlp=512, seq=128)
    rows_n, ks = 64, (8, 64)
    if small:
        cfg, rows_n, ks = GPTConfig(vocab=64, d=32, heads=2, layers=1, mlp=64, seq=16), 16, (4,)
    model = GPT(cfg)
    tok = jax.random.randint(jax.random.key(0), (rows_n, cfg.seq), 0, cfg.vocab)
    params = model.init(jax.random.key(1), tok)
    f = lora_jax.apply(model.apply)
    tx = optax.adam(1e-4)

    def fwd(routing, ids):
        return lambda s, _, base, t: (s, f(base, s, t, adapter_ids=ids, routing=routing))

    def train(routing, ids):
        def step(s, o, base, t):
            def loss(s):
                lg = f(base, s, t, adapter_ids=ids, routing=routing)
                return jnp.mean(jax.vmap(lambda a, b: loss_fn(a[None], b[None]))(lg, t))
            u, o = tx.update(jax.grad(loss)(s), o, s)
            return optax.apply_updates(s, u), o
        return step

    labels, runs = [], []
    for k in ks:
        stack = lora_jax.stack(adapters(params, k, TARGETS))
        ids = jnp.arange(rows_n, dtype=jnp.int32) % k
        for case, t in (("prefill", tok), ("decode", tok[:, :1])):
            y0 = jnp.zeros(t.shape + (cfg.vocab,))
            for kind in ("forward", "train"):
                for routing in multi.ROUTINGS:
                    fn = fwd(routing, ids) if kind == "forward" else train(routing, ids)
                    state = (stack, y0) if kind == "forward" else (stack, tx.init(stack))
                    state = jax.tree.map(jnp.copy, state)
                    runs.append((jax.jit(fn, donate_argnums=(0, 1)), state, (params, t)))
                    labels.append((f"K={k} {case} {kind}", routing))
    times = time_interleaved(runs, n_warmup=2, n_steps=steps)
    table, by = [], {}
    for (block, routing), t in zip(labels, times):
        by.setdefault(block, {})[routing] = t
    for block, t in by.items():
        table.append([block] + [f"{t[r] * 1e3:.1f}" for r in multi.ROUTINGS]
                     + [f"{t[r] / t['gather']:.2f}" for r in multi.ROUTINGS[1:]])
    print(f"{jax.devices()[0].platform}, GPT d={cfg.d}, {cfg.layers} layers, {rows_n} rows "
          f"(prefill {cfg.seq} tokens, decode 1), r=8 on q,k,v,o,up,down, ids row % K; median "
          f"of {steps} interleaved steps")
    print(fmt_table(["case"] + [f"{r} ms" for r in multi.ROUTINGS]
                    + [f"{r}/gather" for r in multi.ROUTINGS[1:]], table))


if __name__ == "__main__":
    main()
