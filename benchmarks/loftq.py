"""LoftQ vs plain quantization: reconstruction error, and a QLoRA fine-tune from each.

The demo's byte-level GPT (d=128, 4 layers) is pretrained briefly on the Python language
reference (``lora_jax.demo.gpt.pretrained_gpt``); then, for every adapted kernel (r=8,
alpha=16, NF4 blocks of 64 along the input axes, and int4):

* error: ``‖W − Q‖ / ‖W‖`` of plain quantization, and ``‖W − (Q + s·A·B)‖ / ‖W‖`` of
  LoftQ with 1 and 5 iterations, over all kernels together and per projection;
* fine-tune: the same QLoRA fine-tune (AdamW, the demo's adaptation text) from the plain
  NF4 base with PEFT's default init (B = 0) and from the LoftQ (5 iterations) base and
  factors; held-out loss at the start and after, beside the float32 model's.

    python benchmarks/loftq.py [--pretrain-steps 300] [--steps 150]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
from common import fmt_table  # noqa: E402

import lora_jax  # noqa: E402
from lora_jax import loftq, paths  # noqa: E402
from lora_jax.demo.data import batches  # noqa: E402
from lora_jax.demo.gpt import pretrained_gpt  # noqa: E402
from lora_jax.demo.loop import make_step, train  # noqa: E402
from lora_jax.models.gpt import loss_fn  # noqa: E402


def errors(params, fmt):
    """{path: (‖W‖, ‖W−Q‖, ‖W−(Q+sAB)‖ at 1 and 5 iterations)}."""
    w = {p: np.asarray(x) for p, x in paths.flatten(params)}
    plain = lora_jax.dequantize_tree(lora_jax.quantize(params, fmt, double_quant=False))
    out = {p: [np.linalg.norm(w[p]), np.linalg.norm(w[p] - np.asarray(plain_x))]
           for p, plain_x in paths.flatten(plain) if p.endswith("kernel")}
    for n in (1, 5):
        qbase, lora = loftq.init(params, r=8, alpha=16, key=jax.random.key(0), num_iter=n,
                                 format=fmt)
        merged = lora_jax.merge(qbase, lora)
        for p, x in paths.flatten(merged):
            if p in out:
                out[p].append(np.linalg.norm(w[p] - np.asarray(x)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)
    model, params, data = pretrained_gpt(steps=args.pretrain_steps)

    for fmt in ("nf4", "int4"):
        errs = errors(params, fmt)
        tot = np.sqrt(np.sum(np.square(np.array(list(errs.values()))), axis=0))
        rows = [["all kernels"] + [f"{v / tot[0]:.4f}" for v in tot[1:]]]
        kinds: dict[str, list] = {}  # per projection, over the layers
        for p, e in errs.items():
            kinds.setdefault(p.split("/")[-2], []).append(e)
        for k, es in kinds.items():
            t = np.sqrt(np.sum(np.square(np.array(es)), axis=0))
            rows.append([f"{k} ({len(es)})"] + [f"{v / t[0]:.4f}" for v in t[1:]])
        print(f"\n{fmt}: relative error ‖W − approx‖/‖W‖ (r=8, blocks of 64)")
        print(fmt_table(["kernel", "Q alone", "LoftQ 1 iter", "LoftQ 5 iter"], rows))

    f = lora_jax.apply(model.apply)
    test = data["adapt_test"]
    ev = jax.jit(lambda base, l, tok: loss_fn(f(base, l, tok), tok))
    fp = jax.jit(lambda tok: loss_fn(model.apply(params, tok), tok))
    start = {"plain NF4 + LoRA (B = 0)": (
        lora_jax.quantize(params, "nf4", double_quant=True),
        lora_jax.init(params, r=8, alpha=16, key=jax.random.key(2)))}
    start["LoftQ NF4, 5 iterations"] = loftq.init(params, r=8, alpha=16, key=jax.random.key(2),
                                                  num_iter=5, double_quant=True)
    tx = optax.adamw(args.lr)
    rows = [["float32 base, no adapter", f"{np.mean([fp(t) for t in test]):.4f}", "", ""]]
    for name, (base, lora) in start.items():
        before = float(np.mean([ev(base, lora, t) for t in test]))
        step = make_step(tx, lambda l, b, tok: loss_fn(f(b, l, tok), tok))
        state, losses, t_step = train(step, [lora, tx.init(lora)],
                                      batches(data["adapt_train"], 16, 64, 1), args.steps,
                                      name, True, const=(base,))
        after = float(np.mean([ev(base, state[0], t) for t in test]))
        rows.append([name, f"{before:.4f}", f"{after:.4f}", f"{np.mean(losses[-10:]):.4f}"])
    print(f"\nQLoRA fine-tune, {args.steps} steps (held-out loss, nats/byte)")
    print(fmt_table(["start", "held-out at start", "held-out after", "train (last 10)"], rows))


if __name__ == "__main__":
    main()
