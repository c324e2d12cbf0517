"""QLoRA block orientation on SmolLM2-135M: blocks along the input axis vs row-major.

    python benchmarks/qlora_orientation.py [--steps 20]

``lora_jax.quantize(..., blocks="input")`` (the default) flattens each kernel as
``(*out, *in)`` so that its 64-value blocks run along the input axis, as bitsandbytes blocks a
PyTorch ``(out, in)`` weight; ``blocks="row-major"`` flattens the Flax ``(in, out)`` kernel as
stored (blocks along the output axis). Printed per orientation: the NF4 (+ double
quantization) reconstruction error of every kernel together (``||Q - W|| / ||W||``), the
held-out perplexity of the quantized model before fine-tuning, and after ``--steps`` QLoRA
steps of the demo (r=8 on q_proj/v_proj).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from lora_jax.demo import llm
from lora_jax.models import gguf


def quant_error(params, blocks: str) -> float:
    q = lora_jax.quantize(params, "nf4", double_quant=True, blocks=blocks)
    num = den = 0.0
    dense = dict(lora_jax.paths.flatten(params))
    for path, w in lora_jax.paths.flatten(q):
        if lora_jax.is_quantized(w):
            d = np.asarray(w.dequantize(jnp.float32)) - np.asarray(dense[path], np.float32)
            num += float(np.sum(d.astype(np.float64) ** 2))
            den += float(np.sum(np.asarray(dense[path], np.float64) ** 2))
    return (num / den) ** 0.5


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    _, params = gguf.load_llama(gguf.read(gguf.smollm2_path()))
    rows = []
    for blocks in ("input", "row-major"):
        err = quant_error(params, blocks)
        r = llm.main("qlora", args.steps, quiet=True, blocks=blocks, gen_tokens=1)
        rows.append((blocks, err, r["ppl_original"], r["ppl_before"], r["ppl_after"],
                     r["losses"][0], r["losses"][-1], r["step_s"]))
        jax.clear_caches()
    print(f"\nbackend={jax.default_backend()} jax={jax.__version__}; SmolLM2-135M, NF4 + double "
          f"quantization of every kernel, QLoRA r=8 on q_proj/v_proj, {args.steps} steps")
    head = ("blocks", "rel. error", "ppl f32", "ppl NF4", "ppl after", "loss first", "loss last",
            "step ms")
    print("  ".join(f"{h:>10}" for h in head))
    for b, e, p0, p1, p2, l0, l1, t in rows:
        print("  ".join(f"{v:>10}" for v in (b, f"{e:.4f}", f"{p0:.2f}", f"{p1:.2f}",
                                               f"{p2:.2f}", f"{l0:.3f}", f"{l1:.3f}",
                                               f"{t * 1e3:.0f}")))


if __name__ == "__main__":
    main()
