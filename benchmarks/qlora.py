"""QLoRA vs LoRA: base storage, train-step peak memory and time, and quality.

    python benchmarks/qlora.py [--model ref|wide|wide-remat|all] [--quality] [--steps 7]

* storage: bytes of the targeted base kernels as float32, bf16, NF4, NF4 + double quant;
* memory: ``memory_analysis()`` of the compiled train step (arguments + temporaries +
  outputs - aliased), QLoRA (NF4+DQ base) vs LoRA on the float32 base, same adapters;
* time: median step time of both, ratio QLoRA / LoRA (QLoRA with blocks along the input axes,
  the default, and along the output axis, ``blocks="row-major"``);
* quality (``--quality``): the demo's byte-level GPT pretrained briefly, then the same LoRA
  fine-tune on its float32 base and on its NF4 base; held-out loss after.
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
from common import compiled_stats, fmt_table, time_interleaved  # noqa: E402

import lora_jax  # noqa: E402
from lora_jax.models.gpt import GPT, GPTConfig, loss_fn  # noqa: E402

MODELS = {
    "ref": (GPTConfig(), 8),
    "wide": (GPTConfig(d=1024, mlp=4096, layers=8, heads=8, seq=128), 2),
    # The same wide model with gradient checkpointing per block (nn.remat), as QLoRA trains.
    "wide-remat": (GPTConfig(d=1024, mlp=4096, layers=8, heads=8, seq=128, remat=True), 2),
}
TARGETS = r".*/(q|k|v|o|up|down)/kernel"


def storage_row(name, params):
    kern = {p: x for p, x in lora_jax.paths.flatten(params) if p.endswith("kernel")}
    n = sum(x.size for x in kern.values())
    out = [name, f"{n / 1e6:.1f}M", f"{4 * n / 2**20:.1f}", f"{2 * n / 2**20:.1f}"]
    for dq in (False, True):
        q = lora_jax.quantize({k: v for k, v in kern.items()}, "nf4", double_quant=dq,
                              targets=".*")
        qb = lora_jax.quantized_bytes(q)
        out.append(f"{qb['total'] / 2**20:.1f} ({qb['bits_per_param']:.3f} b)")
    return out


def step_rows(name, cfg, batch, steps, compute_dtype=None):
    model = GPT(cfg)
    tok = jax.random.randint(jax.random.key(0), (batch, cfg.seq), 0, cfg.vocab)
    params = model.init(jax.random.key(1), tok)
    qbase = lora_jax.quantize(params, "nf4", double_quant=True)
    # The previous block orientation (blocks along the output axis), for comparison.
    qbase_rm = lora_jax.quantize(params, "nf4", double_quant=True, blocks="row-major")
    lora = lora_jax.init(params, r=8, alpha=16, targets=TARGETS, key=jax.random.key(2))
    tx = optax.adamw(1e-4)
    f = lora_jax.apply(model.apply, compute_dtype=compute_dtype)

    def step(l, o, base, tok):
        loss, g = jax.value_and_grad(lambda l: loss_fn(f(base, l, tok), tok))(l)
        upd, o = tx.update(g, o, l)
        return optax.apply_updates(l, upd), o

    rows, runs = [], []
    for label, base in (("LoRA, float32 base", params), ("QLoRA, NF4+DQ base", qbase),
                        ("QLoRA, row-major blocks", qbase_rm)):
        state = jax.tree.map(jnp.copy, (lora, tx.init(lora)))
        jitted = jax.jit(step, donate_argnums=(0, 1))
        compiled, flops, peak = compiled_stats(jitted, *state, base, tok)
        mem = compiled.memory_analysis()
        runs.append((compiled, state, (base, tok)))
        rows.append([name, label, None, f"{mem.argument_size_in_bytes / 2**20:.1f}",
                     f"{mem.temp_size_in_bytes / 2**20:.1f}", f"{peak / 2**20:.1f}", None, peak])
    for r, t in zip(rows, time_interleaved(runs, n_steps=steps)):  # the two take turns
        r[2], r[6] = f"{t * 1e3:.0f}", t
    t0, p0 = rows[0][-2], rows[0][-1]
    for r in rows:
        r.insert(3, f"{r[-2] / t0:.3f}")
        r.insert(7, f"{r[-1] / p0:.3f}")
        del r[-2:]
    return rows, params


def quality(steps=150, pretrain_steps=300):
    from lora_jax.demo.data import batches
    from lora_jax.demo.gpt import pretrained_gpt
    from lora_jax.demo.loop import train

    model, params, data = pretrained_gpt(steps=pretrain_steps)
    ad_train, test, seq = data["adapt_train"], data["adapt_test"], model.cfg.seq
    tx = optax.adamw(3e-3)

    def make_step(loss_of):
        @jax.jit
        def step(p, o, tok):
            loss, g = jax.value_and_grad(loss_of)(p, tok)
            upd, o = tx.update(g, o, p)
            return optax.apply_updates(p, upd), o, loss
        return step

    f = lora_jax.apply(model.apply)
    rows = []
    for label, base in (("float32 base", params),
                        ("NF4+DQ base", lora_jax.quantize(params, "nf4", double_quant=True))):
        ev = jax.jit(lambda l, tok: loss_fn(f(base, l, tok), tok))
        lora = lora_jax.init(params, r=8, alpha=16, key=jax.random.key(2))
        before = float(np.mean([ev(lora, t) for t in test]))
        lo = lambda l, tok: loss_fn(f(base, l, tok), tok)  # noqa: E731
        (lora, _), _, _ = train(make_step(lo), [lora, tx.init(lora)],
                                batches(ad_train, 16, seq, 1), steps, label, quiet=True)
        after = float(np.mean([ev(lora, t) for t in test]))
        rows.append([label, f"{before:.4f}", f"{after:.4f}"])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="all", choices=[*MODELS, "all"])
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--compute-dtype", default=None)
    args = ap.parse_args(argv)
    names = list(MODELS) if args.model == "all" else [args.model]
    print(f"backend={jax.default_backend()} devices={jax.device_count()}")
    srows, trows = [], []
    for name in names:
        cfg, batch = MODELS[name]
        label = f"{name} (d={cfg.d}, L={cfg.layers}, b={batch})"
        rows, params = step_rows(label, cfg, batch, args.steps, args.compute_dtype)
        trows += rows
        if not cfg.remat:  # same weights as without remat
            srows.append(storage_row(name, params))
    print("\nBase kernel storage (MiB)")
    print(fmt_table(["model", "params", "float32", "bf16", "NF4", "NF4+DQ"], srows))
    print("\nTrain step (r=8 on q,k,v,o,up,down; AdamW)")
    print(fmt_table(["model", "variant", "step ms", "time/LoRA", "args MiB", "temp MiB",
                     "peak MiB", "peak/LoRA"], trows))
    if args.quality:
        print("\nQuality: same LoRA fine-tune (held-out loss, nats/byte)")
        print(fmt_table(["base", "loss before", "loss after"], quality()))


if __name__ == "__main__":
    main()
