"""Sharded LoRA train step on 1, 2, 4 and 8 forced CPU devices (the reference GPT).

Each row runs in its own process, because the number of CPU devices is fixed when JAX starts
(``jax_num_cpu_devices``). Layouts: FSDP over every device (base weights, LoRA factors and
Adam state split along the base's largest axis, the batch split too), and for 8 devices also
FSDP x tensor parallel on a (2, 4) mesh. Prints the median step time, the compile time, what
one step communicates (read from the compiled HLO with ``lora_jax.sharding.collectives``),
the per-device argument memory and the loss difference to the 1-device run.

Forced CPU devices are not hardware: N virtual devices share this machine's cores and memory
bandwidth, and their collectives are memory copies. The table shows that the partitioned
program is correct and how its communication and per-device memory scale; it cannot show the
speed-up of real devices.

    python benchmarks/sharding.py [--steps 5] [--small] [--variant lora|qlora]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CONFIGS = [  # (devices, mesh shape, axis names)
    (1, (1,), ("data",)),
    (2, (2,), ("data",)),
    (4, (4,), ("data",)),
    (8, (8,), ("data",)),
    (8, (2, 4), ("data", "model")),
]
TARGETS = r".*/(q|k|v|o|up|down)/kernel"


def child(args) -> dict:
    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import compiled_stats, time_steps

    import lora_jax
    from lora_jax import sharding as S
    from lora_jax.models.gpt import GPT, GPTConfig, loss_fn

    if args.small:
        cfg, batch = GPTConfig(vocab=128, d=64, heads=4, layers=2, mlp=128, seq=32), 8
    else:
        cfg, batch = GPTConfig(), 8
    model = GPT(cfg)
    tokens = jax.random.randint(jax.random.key(0), (batch, cfg.seq), 0, cfg.vocab)
    params = jax.jit(model.init)(jax.random.key(1), tokens)
    base = lora_jax.quantize(params, "nf4") if args.variant == "qlora" else params
    lora = lora_jax.init(params, r=8, alpha=16, targets=TARGETS, key=jax.random.key(2))
    f = lora_jax.apply(model.apply)
    tx = optax.adamw(1e-4)
    opt = tx.init(lora)

    def step(lora, opt, base, tok):
        loss, g = jax.value_and_grad(lambda l: loss_fn(f(base, l, tok), tok))(lora)
        upd, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, upd), opt, loss

    mesh = S.mesh(tuple(args.shape), tuple(args.names))
    bspec = S.fsdp(base, mesh, axis="data", specs=(
        S.tensor_parallel(base, mesh, axis="model") if "model" in args.names else None))
    lspec = S.specs(lora, bspec, mesh=mesh)
    sh = (S.named(mesh, lspec), S.named(mesh, S.state_specs(opt, lspec)),
          S.named(mesh, S.storage_specs(base, bspec, mesh)), NamedSharding(mesh, P("data")))
    rep = NamedSharding(mesh, P())
    jstep = jax.jit(step, in_shardings=sh, out_shardings=(sh[0], sh[1], rep),
                    donate_argnums=(0, 1))
    lora, opt, base, tokens = jax.device_put((lora, opt, base, tokens), sh)
    import time

    t0 = time.perf_counter()
    compiled, flops, peak = compiled_stats(jstep, lora, opt, base, tokens)
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    coll = S.collectives(compiled)
    first = compiled(lora, opt, base, tokens)
    loss0 = float(first[2])
    sec, _ = time_steps(lambda l, o, _loss, b, t: compiled(l, o, b, t), first,
                        n_warmup=1, n_steps=args.steps, extra=(base, tokens))
    mb = lambda ops: sum(c.nbytes for c in coll if c.op in ops) / 2**20  # noqa: E731
    return {"devices": args.devices, "mesh": "x".join(map(str, args.shape)),
            "layout": "FSDP+TP" if "model" in args.names else "FSDP",
            "step_ms": 1e3 * sec, "compile_s": compile_s, "loss0": loss0,
            "gather_mb": mb(("all-gather",)), "reduce_mb": mb(("all-reduce", "reduce-scatter")),
            "other_mb": mb(("all-to-all", "collective-permute")),
            "args_mb": (mem.argument_size_in_bytes / 2**20) if mem else float("nan"),
            "peak_mb": peak / 2**20, "cores": os.cpu_count()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="a tiny model (smoke test)")
    ap.add_argument("--variant", default="lora", choices=("lora", "qlora"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--devices", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--shape", type=int, nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--names", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import fmt_table

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    rows = []
    for n, shape, names in CONFIGS:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--devices", str(n),
               "--shape", *map(str, shape), "--names", *names, "--steps", str(args.steps),
               "--variant", args.variant] + (["--small"] if args.small else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            raise RuntimeError(f"{n} devices failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(line[0][len("RESULT "):]))
        print(f"  {n} devices {rows[-1]['mesh']}: {rows[-1]['step_ms']:.0f} ms", flush=True)
    one = rows[0]
    table = [[r["devices"], r["mesh"], r["layout"], f"{r['step_ms']:.0f}",
              f"{r['step_ms'] / one['step_ms']:.2f}", f"{r['compile_s']:.1f}",
              f"{r['gather_mb']:.1f}", f"{r['reduce_mb']:.1f}", f"{r['other_mb']:.1f}",
              f"{r['args_mb']:.1f}", f"{abs(r['loss0'] - one['loss0']):.1e}"] for r in rows]
    model = "tiny GPT" if args.small else "reference GPT (4 layers, d=512, batch 8 x 128)"
    print(f"\n{args.variant} train step, {model}, r=8 on q,k,v,o,up,down, AdamW; "
          f"{one['cores']} CPU cores shared by all forced devices\n")
    print(fmt_table(["devices", "mesh", "layout", "step ms", "vs 1", "compile s",
                     "all-gather MB", "all-reduce MB", "permute/a2a MB", "args MB/dev",
                     "|dloss|"], table))
    print(f"\nMB are per device and step, read from the compiled HLO. All forced devices share "
          f"the same {one['cores']} cores: beyond {one['cores']} devices there is no extra "
          "compute, so step times show XLA:CPU's scheduling and the cost of collectives done "
          "as memory copies, not the speed-up of real hardware. What the table does show is "
          "the per-device memory falling with the device count (args MB/dev: base, adapters "
          "and Adam state, all sharded), the traffic a real mesh would carry, and the same "
          "loss as on one device.")


if __name__ == "__main__":
    main()
