"""Train-step cost of LoRA with lora_jax vs with qwix's LoraProvider vs full fine-tuning.

The reference GPT of ``benchmarks/train_step.py`` (``lora_jax.models.gpt``: 4 layers, d=512,
mlp 2048, 8 heads, seq 128, batch 8, vocab 2048), LoRA r=8, alpha=16 on q, k, v, o, up,
down; AdamW. The qwix variant runs ``qwix.apply_lora_to_model(GPT, LoraProvider(...))`` with
the same adapter converted by ``lora_jax.interop.qwix.to_qwix`` (the script checks that
both give the same loss first) and differentiates only its ``*_lora_a``/``*_lora_b`` params.
Per variant: median step time over the timed steps (variants take turns, one step each), the
ratio to full fine-tuning, compiled FLOPs (``cost_analysis``), peak memory and trainable
parameters.

    python benchmarks/qwix_step.py [--steps 7] [--small]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix

sys.path.insert(0, os.path.dirname(__file__))
from common import compiled_stats, fmt_table, time_interleaved  # noqa: E402

import lora_jax  # noqa: E402
from lora_jax.interop import qwix as qwix_interop  # noqa: E402
from lora_jax.models.gpt import GPT, GPTConfig, loss_fn  # noqa: E402

TARGETS = r".*/(q|k|v|o|up|down)/kernel"
QWIX_MODULES = r".*/(q|k|v|o|up|down)"
RANK, ALPHA = 8, 16.0


def split_lora(tree):
    """qwix's variables -> (base, lora params), both nested dicts."""
    if not isinstance(tree, dict):
        raise TypeError(type(tree))
    base, lora = {}, {}
    for k, v in tree.items():
        if isinstance(v, dict):
            b, lo = split_lora(v)
            base[k] = b
            if lo:
                lora[k] = lo
        elif k.endswith(("_lora_a", "_lora_b")):
            lora[k] = v
        else:
            base[k] = v
    return base, lora


def join(base, lora):
    out = dict(base)
    for k, v in lora.items():
        out[k] = join(base[k], v) if isinstance(v, dict) else v
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--small", action="store_true", help="a tiny model (smoke test)")
    args = ap.parse_args(argv)
    if args.small:
        cfg, batch = GPTConfig(vocab=128, d=64, heads=4, layers=2, mlp=128, seq=32), 2
    else:
        cfg, batch = GPTConfig(), 8
    model = GPT(cfg)
    tokens = jax.random.randint(jax.random.key(0), (batch, cfg.seq), 0, cfg.vocab)
    params = jax.jit(model.init)(jax.random.key(1), tokens)
    lora = lora_jax.init(params, r=RANK, alpha=ALPHA, targets=TARGETS, key=jax.random.key(2))
    rng = np.random.default_rng(3)  # B is zero at init: give it values so both paths work
    lora = jax.tree.map(lambda x: jnp.asarray(0.02 * rng.standard_normal(x.shape), x.dtype),
                        lora)
    qmodel = qwix.apply_lora_to_model(model, qwix.LoraProvider(module_path=QWIX_MODULES,
                                                               rank=RANK, alpha=ALPHA))
    qbase, qlora = split_lora(qwix_interop.to_qwix(lora, params))
    tx = optax.adamw(1e-4)

    f = lora_jax.apply(model.apply)
    loss_lora = lambda l, base, tok: loss_fn(f(base, l, tok), tok)  # noqa: E731
    loss_qwix = lambda l, base, tok: loss_fn(qmodel.apply(join(base, l), tok), tok)  # noqa: E731
    loss_full = lambda p, tok: loss_fn(model.apply(p, tok), tok)  # noqa: E731
    a, b = jax.jit(loss_lora)(lora, params, tokens), jax.jit(loss_qwix)(qlora, qbase, tokens)
    print(f"loss lora_jax {float(a):.6f}  qwix {float(b):.6f}  (same adapter)")
    assert abs(float(a) - float(b)) <= 1e-4 * abs(float(a)), (a, b)

    def step_of(loss):
        def step(trainable, opt, *extra):
            _, g = jax.value_and_grad(loss)(trainable, *extra)
            upd, opt = tx.update(g, opt, trainable)
            return optax.apply_updates(trainable, upd), opt
        return step

    variants = [
        ("full fine-tuning", step_of(loss_full), params, (tokens,)),
        ("LoRA, lora_jax", step_of(loss_lora), lora, (params, tokens)),
        ("LoRA, qwix", step_of(loss_qwix), qlora, (qbase, tokens)),
    ]
    rows, compiled = [], []
    for name, step, trainable, extra in variants:
        state = jax.tree.map(jnp.copy, (trainable, tx.init(trainable)))
        c, flops, peak = compiled_stats(jax.jit(step, donate_argnums=(0, 1)), *state, *extra)
        compiled.append((c, state, extra))
        rows.append([name, None, None, flops, None, f"{peak / 2**20:.1f}",
                     f"{sum(x.size for x in jax.tree.leaves(trainable)):,}"])
    times = time_interleaved(compiled, n_steps=args.steps)
    for r, t in zip(rows, times):
        r[1], r[2] = f"{t * 1e3:.1f}", f"{t / times[0]:.3f}"
        r[4] = f"{r[3] / rows[0][3]:.3f}"
    for r in rows:
        r[3] = f"{r[3] / 1e9:.2f}"
    print(f"\nbackend={jax.default_backend()} devices={jax.device_count()} batch={batch} "
          f"seq={cfg.seq} d={cfg.d} layers={cfg.layers} r={RANK} qwix={qwix.__version__}")
    print(fmt_table(["variant", "step ms", "time/full", "GFLOPs", "flops/full", "peak MiB",
                     "trainable"], rows))


if __name__ == "__main__":
    main()
