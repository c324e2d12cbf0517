"""Reconstruction error, storage and speed of lora_jax's quantization formats.

Quantizes N(0, 1) weights of shape (size, size) in every format, with and without double
quantization, and prints a Markdown table: relative reconstruction error ||W - Q(W)|| / ||W||,
bits per parameter (from the stored arrays), and the jitted quantize and dequantize times
(median of --repeats runs after one compile run).

    python benchmarks/quant_error.py [--size 4096] [--block-size 64] [--repeats 3]
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import quant


def timed(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    w = jnp.asarray(np.random.default_rng(0).standard_normal((args.size, args.size)), jnp.float32)
    norm = float(jnp.linalg.norm(w))
    print(f"N(0,1) weights {args.size}x{args.size} float32, block size {args.block_size}; "
          f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs\n")
    print("| format | double quant | rel. error | bits/param | quantize (s) | dequantize (s) |")
    print("|---|---|---|---|---|---|")
    for fmt in quant.FORMATS:
        for dq in (False, True):
            qfn = jax.jit(lambda x, fmt=fmt, dq=dq: quant.quantize_array(
                x, fmt, block_size=args.block_size, double_quant=dq))
            q, t_q = timed(qfn, w, repeats=args.repeats)
            dense, t_d = timed(jax.jit(lambda q: q.dequantize()), q, repeats=args.repeats)
            err = float(jnp.linalg.norm(dense - w)) / norm
            bits = 8 * q.nbytes / q.size
            print(f"| {fmt} | {'yes' if dq else 'no'} | {err:.4f} | {bits:.3f} | "
                  f"{t_q:.3f} | {t_d:.3f} |")


if __name__ == "__main__":
    main()
