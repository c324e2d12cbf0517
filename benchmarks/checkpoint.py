"""Checkpoint save/restore time and size: adapter-only vs the full train state.

The reference GPT (4 layers, d=512, ~15M parameters) with LoRA r=8 on q, k, v, o, up, down
(AdamW), and the same with AdaLoRA (init_r 12, allocator state). Rows:

* adapter only: ``lora_jax.checkpoint.save_adapter`` / ``load_adapter``;
* full train state: ``Manager.save`` (adapters, optimizer state, AdaLoRA state, step, rng)
  and ``Manager.restore``, synchronous, and asynchronous (time until ``save`` returns, and
  until the write is on disk);
* for scale, the frozen base weights saved with plain Orbax, which lora_jax never writes.

Medians over ``--repeats`` runs in a fresh temporary directory on the local disk.

    python benchmarks/checkpoint.py [--repeats 3] [--small]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fmt_table  # noqa: E402

import lora_jax  # noqa: E402
from lora_jax import adalora  # noqa: E402
from lora_jax import checkpoint as C  # noqa: E402
from lora_jax.models.gpt import GPT, GPTConfig  # noqa: E402

TARGETS = r".*/(q|k|v|o|up|down)/kernel"


def _timed(fn, repeats):
    times, out = [], None
    for i in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(i))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="a tiny model (smoke test)")
    args = ap.parse_args(argv)
    cfg = (GPTConfig(vocab=128, d=64, heads=4, layers=2, mlp=128, seq=32) if args.small
           else GPTConfig())
    model = GPT(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jax.numpy.zeros((1, cfg.seq), "int32"))
    tx = optax.adamw(1e-4)
    lora = lora_jax.init(params, r=8, alpha=16, targets=TARGETS, key=jax.random.key(1))
    ada = adalora.init(params, init_r=12, target_r=8, targets=TARGETS, key=jax.random.key(1))
    alloc = adalora.Allocator(total_steps=1000, tinit=100, tfinal=100)
    # Trained-looking values: Orbax compresses, and freshly initialized B factors and Adam
    # moments are zeros, which would make the sizes look smaller than they are in use.
    rng = np.random.default_rng(0)
    noise = lambda t: jax.tree.map(  # noqa: E731
        lambda x: rng.standard_normal(x.shape, np.float32) if x.dtype == np.float32 else x, t)
    states = {"LoRA": noise(dict(lora=lora, opt_state=tx.init(lora))),
              "AdaLoRA": noise(dict(lora=ada, opt_state=tx.init(ada), adalora=alloc.init(ada)))}
    root = tempfile.mkdtemp(prefix="lora_jax_ckpt_bench_")
    rows = []
    try:
        for name, st in states.items():
            n = lora_jax.param_count(st["lora"])
            d = os.path.join(root, name)
            os.makedirs(d)
            # Adapter only.
            save_s, nbytes = _timed(lambda i: C.save_adapter(os.path.join(d, f"a{i}"),
                                                              st["lora"]), args.repeats)
            load_s, _ = _timed(lambda i: C.load_adapter(os.path.join(d, f"a{i}")), args.repeats)
            rows.append([name, "adapter only", f"{n / 1e6:.2f}M", f"{nbytes / 2**20:.2f}",
                         f"{save_s:.3f}", "-", f"{load_s:.3f}"])
            # Full train state, synchronous and asynchronous.
            for mode in ("sync", "async"):
                mdir = os.path.join(d, mode)
                ckpt = C.Manager(mdir, max_to_keep=args.repeats, async_save=mode == "async")
                ret, done = [], []
                for i in range(args.repeats):
                    t0 = time.perf_counter()
                    ckpt.save(i, rng=jax.random.key(i), meta={"step": i}, **st)
                    ret.append(time.perf_counter() - t0)
                    ckpt.wait()
                    done.append(time.perf_counter() - t0)
                size = ckpt.size()
                rest_s, _ = _timed(lambda i: ckpt.restore(i).lora, args.repeats)
                ckpt.close()
                arrays = sum(x.size for x in jax.tree.leaves(
                    [v for k, v in st.items() if k != "lora"])) + n
                rows.append([name, f"full state ({mode})", f"{arrays / 1e6:.2f}M",
                             f"{size / 2**20:.2f}", f"{statistics.median(done):.3f}",
                             f"{statistics.median(ret):.3f}" if mode == "async" else "-",
                             f"{rest_s:.3f}"])
        # The base model, which lora_jax checkpoints never contain.
        bdir = os.path.join(root, "base")
        with ocp.StandardCheckpointer() as ck:
            def save_base(i):
                ck.save(os.path.join(bdir, str(i)), params)
                ck.wait_until_finished()

            bsave, _ = _timed(save_base, args.repeats)
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
            bload, _ = _timed(lambda i: ck.restore(os.path.join(bdir, str(i)), abstract),
                              args.repeats)
        nb = lora_jax.base_param_count(params)
        rows.append(["(base)", "frozen base weights, plain Orbax", f"{nb / 1e6:.2f}M",
                     f"{C.disk_size(os.path.join(bdir, '0')) / 2**20:.2f}", f"{bsave:.3f}",
                     "-", f"{bload:.3f}"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    model_name = "tiny GPT" if args.small else "reference GPT (4 layers, d=512)"
    print(f"\nCheckpoints of {model_name}, r=8 (AdaLoRA init_r=12) on q,k,v,o,up,down, "
          f"AdamW; median of {args.repeats}, local disk\n")
    print(fmt_table(["adapter", "what", "values", "MB on disk", "save s", "save returns s",
                     "restore s"], rows))
    print("\nvalues: float32 numbers stored (random, as after training; Orbax compresses). "
          "'save s' is until the checkpoint is on disk; async 'save returns s' is how long "
          "training is blocked.")


if __name__ == "__main__":
    main()
