"""QLoRA at scale: a random-weight Llama written as sharded bf16 safetensors, loaded for QLoRA
(quantized while read), then trained for a few steps with ``nn.remat``.

    python benchmarks/big_model.py [--size 3b|1b|tiny] [--steps 3] [--seq 64] [--dir DIR]
                                   [--variants stream,dense] [--keep]

Each variant runs in its own process, so that each peak (``VmHWM`` of ``/proc/self/status``,
the process' peak resident memory) is its own: first after loading, then after the train
steps. "stream" is ``from_safetensors(..., dtype=bf16, quantize="nf4")``; "dense" loads the
bf16 model and then calls ``lora_jax.quantize`` (the only way before), for sizes whose bf16
model fits in memory. Sizes are compared with the model's bf16 (on disk) and float32 bytes.
The checkpoint is deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# OpenLLaMA-3B's shape (3.4B parameters, untied head, 32k vocabulary); a ~1B and a tiny one.
SIZES = {
    "3b": dict(vocab=32000, d=3200, layers=26, heads=32, kv_heads=32, ffn=8640),
    "1b": dict(vocab=32000, d=2048, layers=16, heads=16, kv_heads=16, ffn=5632),
    "tiny": dict(vocab=4096, d=512, layers=4, heads=8, kv_heads=8, ffn=1408),
}
SHARD_BYTES = 2 << 30


def write_checkpoint(folder: str, cfg, seed: int = 0) -> int:
    """Random bf16 weights as ``model-0000i-of-0000n.safetensors`` plus ``config.json``,
    a tensor at a time; returns the bytes written."""
    import jax
    import jax.numpy as jnp
    import ml_dtypes

    from lora_jax.models import llama as L
    from lora_jax.models.tensor_files import write

    shapes = jax.eval_shape(L.Llama(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    table = {}
    for name, where in L.hf_names(cfg).items():
        node = shapes["params"]
        for k in where:
            node = node[k]
        table[name] = (node.shape[::-1] if where[-1] == "kernel" else node.shape,
                       np.dtype(ml_dtypes.bfloat16))
    shards, cur, size = [], {}, 0
    for name, (shape, dt) in table.items():
        n = math.prod(shape) * 2
        if cur and size + n > SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = (shape, dt)
        size += n
    shards.append(cur)
    rng = np.random.default_rng(seed)

    def tensors(part):
        for name, (shape, dt) in part.items():
            if len(shape) == 1:
                x = 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
            else:  # uniform with the std of a 1/sqrt(fan_in) init, cheaper to draw
                x = (rng.random(shape, np.float32) - 0.5) * np.float32(
                    np.sqrt(12.0 / shape[-1]))
            yield name, x.astype(dt)

    index, total = {}, 0
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write(os.path.join(folder, fname), tensors(part), shapes=part)
        total += os.path.getsize(os.path.join(folder, fname))
        index |= {name: fname for name in part}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": index}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(L.config_to_hf(cfg), f)
    return total


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def child(variant: str, folder: str, steps: int, seq: int, batch: int) -> dict:
    """One variant, in this process: load, then ``steps`` QLoRA steps; peaks and times."""
    import jax
    import jax.numpy as jnp
    import optax

    import lora_jax
    from lora_jax.models import llama as L

    rss0 = _status("VmRSS")
    t0 = time.perf_counter()
    if variant == "stream":
        cfg, base = L.from_safetensors(folder, dtype=jnp.bfloat16, quantize="nf4")
    else:
        cfg, dense = L.from_safetensors(folder, dtype=jnp.bfloat16)
        base = lora_jax.quantize(dense, "nf4")
        del dense
    jax.block_until_ready(base)
    t_load = time.perf_counter() - t0
    load_peak = _status("VmHWM")
    cfg = L.LlamaConfig(**{**cfg.__dict__, "remat": True})
    model = L.Llama(cfg)
    lora = lora_jax.init(base, r=8, alpha=16.0, targets=r".*(q_proj|v_proj)/kernel",
                         key=jax.random.key(0))
    f = lora_jax.apply(model.apply)
    tx = optax.adamw(1e-4)

    @jax.jit
    def step(lora, opt, base, tokens):
        loss, g = jax.value_and_grad(
            lambda lo: L.loss_fn(f(base, lo, tokens), tokens))(lora)
        upd, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, upd), opt, loss

    opt = tx.init(lora)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab, (batch, seq)), jnp.int32)
    t1 = time.perf_counter()
    compiled = step.lower(lora, opt, base, tokens).compile()
    t_compile = time.perf_counter() - t1
    mem = compiled.memory_analysis()
    print(f"compiled step: {mem}", flush=True)
    print(f"loaded in {t_load:.0f} s, peak {load_peak / 2**30:.2f} GiB; compiled in "
          f"{t_compile:.0f} s, peak now {_status('VmHWM') / 2**30:.2f} GiB", flush=True)
    times, losses = [], []
    for _ in range(steps):
        t1 = time.perf_counter()
        lora, opt, loss = compiled(lora, opt, base, tokens)
        losses.append(float(loss))
        times.append(time.perf_counter() - t1)
    qb = lora_jax.quantized_bytes(base)
    n_params = lora_jax.base_param_count(base)
    return {"variant": variant, "rss_start": rss0, "load_peak": load_peak,
            "step_peak": _status("VmHWM"), "load_s": t_load, "compile_s": t_compile,
            "step_s": float(np.median(times[1:] if len(times) > 1 else times)),
            "losses": losses, "params": n_params, "nf4_bytes": qb["total"]}


def _run_child(cmd: list[str], max_rss_gb: float) -> tuple[str, int]:
    """Runs ``cmd``, killing it if its resident memory passes ``max_rss_gb``."""
    with tempfile.TemporaryFile("w+") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        while p.poll() is None:
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    rss = next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS"))
            except (OSError, StopIteration):
                rss = 0
            if rss > max_rss_gb * 2**30:
                p.kill()
                log.write(f"\nkilled: resident memory {rss / 2**30:.1f} GiB > {max_rss_gb}\n")
            time.sleep(0.5)
        log.seek(0)
        return log.read(), p.returncode


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="3b")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a "
                    "temporary folder, deleted afterwards)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated: stream,dense (default: stream, and dense for tiny)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--max-rss-gb", type=float, default=8.0,
                    help="kill a variant whose resident memory passes this (a shared machine)")
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "DIR"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(a.child[0], a.child[1], a.steps, a.seq, a.batch)))
        return
    from lora_jax.models import llama as L

    cfg = L.LlamaConfig(**SIZES[a.size], tied=False)
    variants = (a.variants or ("stream,dense" if a.size == "tiny" else "stream")).split(",")
    folder = a.dir or tempfile.mkdtemp(prefix=f"lora_jax_{a.size}_")
    os.makedirs(folder, exist_ok=True)
    try:
        t0 = time.perf_counter()
        if not os.path.exists(os.path.join(folder, "config.json")):
            disk = write_checkpoint(folder, cfg)
            print(f"wrote {disk / 2**30:.2f} GiB of bf16 safetensors to {folder} in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        results = []
        for v in variants:
            out, code = _run_child([sys.executable, os.path.abspath(__file__), "--child", v,
                                    folder, "--steps", str(a.steps), "--seq", str(a.seq),
                                    "--batch", str(a.batch)], a.max_rss_gb)
            line = [x for x in out.splitlines() if x.startswith("RESULT ")]
            if code or not line:
                print(f"{v}: failed (exit {code})\n{out[-3000:]}")
                continue
            results.append(json.loads(line[-1][7:]))
            print(f"{v}: done", flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)
    if not results:
        return
    n = results[0]["params"]
    bf16, f32 = 2 * n, 4 * n
    gb = 2.0**30
    print(f"\nLlama {a.size}: {n / 1e9:.2f} B params (d={cfg.d}, {cfg.layers} layers, "
          f"ffn={cfg.ffn}, vocab={cfg.vocab}); bf16 {bf16 / gb:.2f} GiB, float32 "
          f"{f32 / gb:.2f} GiB, NF4 kernels {results[0]['nf4_bytes'] / gb:.2f} GiB; "
          f"QLoRA r=8 on q/v, batch {a.batch} x {a.seq} tokens, nn.remat per block")
    head = ("variant", "load peak", "/bf16", "/f32", "step peak", "/bf16", "/f32", "load s",
            "compile s", "s/step")
    rows = [(r["variant"], f"{r['load_peak'] / gb:.2f} GiB", f"{r['load_peak'] / bf16:.2f}",
             f"{r['load_peak'] / f32:.2f}", f"{r['step_peak'] / gb:.2f} GiB",
             f"{r['step_peak'] / bf16:.2f}", f"{r['step_peak'] / f32:.2f}",
             f"{r['load_s']:.0f}", f"{r['compile_s']:.0f}", f"{r['step_s']:.1f}")
            for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for row in (head, *rows):
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
    for r in results:
        print(f"{r['variant']}: losses {[round(x, 3) for x in r['losses']]}, process start "
              f"{r['rss_start'] / gb:.2f} GiB")


if __name__ == "__main__":
    main()
