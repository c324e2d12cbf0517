"""Packed (uint8) vs native (jnp.uint4) storage of an NF4+DQ base: memory and QLoRA step time.

    python benchmarks/int4_storage.py [--small] [--steps 7]

For the reference GPT (batch 8) and a wide one (d=1024, 16 heads, 8 layers, mlp 4096, batch
2), each with an NF4 + double-quant base stored both ways:

* stored MiB: ``quantized_bytes`` of the base (4 bits per code either way);
* buffer MiB: the size the runtime reports for the base's device buffers
  (``on_device_size_in_bytes``); XLA:CPU reports a byte per 4-bit code;
* args / temp MiB: ``memory_analysis()`` of the compiled QLoRA train step (r=8 on
  q,k,v,o,up,down; AdamW; ``lora_jax.apply(model.apply)``);
* step ms: median step time, and native / packed. The two variants' steps alternate, so
  that a change in machine load hits both alike.

Runs unchanged on any backend (``jax.default_backend()`` is printed). ``--small``: tiny
models, a smoke test.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(__file__))
from common import compiled_stats, fmt_table, time_interleaved

import lora_jax
from lora_jax.models.gpt import GPT, GPTConfig, loss_fn

MODELS = {
    "ref": (GPTConfig(), 8),
    "wide": (GPTConfig(d=1024, heads=16, layers=8, mlp=4096), 2),
}
SMALL = {
    "ref": (GPTConfig(vocab=256, d=128, heads=4, layers=2, mlp=512, seq=32), 4),
    "wide": (GPTConfig(vocab=256, d=256, heads=4, layers=2, mlp=1024, seq=32), 2),
}
TARGETS = r".*/(q|k|v|o|up|down)/kernel"
MIB = 2**20


def buffer_bytes(tree) -> int:
    """Bytes the runtime reports for the device buffers of a tree's quantized leaves."""
    arrays = jax.tree.leaves([x for x in jax.tree.leaves(tree, is_leaf=lora_jax.is_quantized)
                              if lora_jax.is_quantized(x)])
    return sum(s.data.on_device_size_in_bytes() for a in arrays for s in a.addressable_shards)


def rows_for(name, cfg, batch, steps):
    model = GPT(cfg)
    tok = jax.random.randint(jax.random.key(0), (batch, cfg.seq), 0, cfg.vocab)
    params = model.init(jax.random.key(1), tok)
    lora = lora_jax.init(params, r=8, alpha=16, targets=TARGETS, key=jax.random.key(2))
    tx = optax.adamw(1e-4)
    f = lora_jax.apply(model.apply)

    def step(l, o, base, tok):
        g = jax.grad(lambda l: loss_fn(f(base, l, tok), tok))(l)
        upd, o = tx.update(g, o, l)
        return optax.apply_updates(l, upd), o

    bases, runs = {}, []
    for storage in ("packed", "native"):
        base = lora_jax.quantize(params, "nf4", double_quant=True, storage=storage)
        state = jax.tree.map(jnp.copy, (lora, tx.init(lora)))
        compiled, _, _ = compiled_stats(jax.jit(step, donate_argnums=(0, 1)), *state, base, tok)
        bases[storage] = base
        runs.append((compiled, state, (base, tok)))
    times = time_interleaved(runs, n_warmup=1, n_steps=steps)  # the variants take turns
    rows = []
    for (storage, base), (compiled, _, _), t in zip(bases.items(), runs, times):
        stats = lora_jax.quantized_bytes(base)
        mem = compiled.memory_analysis()
        rows.append([name, storage, f"{stats['total'] / MIB:.2f}",
                     f"{buffer_bytes(base) / MIB:.2f}", f"{stats['bits_per_param']:.3f}",
                     f"{mem.argument_size_in_bytes / MIB:.2f}",
                     f"{mem.temp_size_in_bytes / MIB:.1f}", f"{t * 1e3:.0f}",
                     f"{t / times[0]:.3f}"])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny models: a smoke test")
    ap.add_argument("--steps", type=int, default=7, help="timed steps per variant")
    args = ap.parse_args(argv)
    models = SMALL if args.small else MODELS
    print(f"backend={jax.default_backend()} devices={jax.device_count()} jax={jax.__version__}")
    rows = []
    for name, (cfg, batch) in models.items():
        label = f"{name} (d={cfg.d}, L={cfg.layers}, b={batch})"
        rows += rows_for(label, cfg, batch, 2 if args.small else args.steps)
    print("\nNF4+DQ base, packed vs native 4-bit storage; QLoRA train step (r=8 on "
          "q,k,v,o,up,down; AdamW)")
    print(fmt_table(["model", "storage", "stored MiB", "buffer MiB", "bits/param",
                     "args MiB", "temp MiB", "step ms", "time/packed"], rows))


if __name__ == "__main__":
    main()
