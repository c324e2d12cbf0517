"""Train-step cost of LoRA on every expert of a mixture-of-experts GPT.

The model (written here): embedding, ``layers`` blocks of causal attention (q, k, v, o
kernels) and a top-2 MoE MLP (router, ``up (E, d, f)``, ``down (E, f, d)``; tokens sorted by
expert, ``jax.lax.ragged_dot``, unsorted, combined with normalized gates), stacked with
``lax.scan``, an output head. LoRA r=8 on every matmul weight, by default targets from
``lora_jax.trace`` (the experts included). Variants, for E = 8 and 64:

* full fine-tuning (AdamW on every weight);
* LoRA through ``apply(mode="merged")`` (every expert's ``W0 + s·A·B`` formed each step);
* LoRA through ``apply`` (grouped matmuls over the experts, the fast path);
* the floor: the same model written by hand with its LoRA terms, ``x·W0 + s·(x·A)·B`` and
  ``ragged_dot(x, W0) + s·ragged_dot(ragged_dot(x, A), B)``, differentiated by JAX;
* QLoRA: the fast path on an NF4 base (peak memory against LoRA's).

Step time is the median over interleaved steps; FLOPs and peak memory come from the
compiled program. XLA:CPU's cost analysis counts a ``ragged_dot`` as if every group saw
every row (E times its real work), for every variant alike: compare FLOPs between the LoRA
variants, not with full fine-tuning's.

    python benchmarks/moe_step.py [--experts 8 64] [--steps 7] [--small]

``--decode`` times instead one decoded token of a Llama through ``apply`` (LoRA on every
projection), the few-rows case: run it with this checkout and with an older one on
``PYTHONPATH`` to compare the unmerged route with the merged one it replaced.

    python benchmarks/moe_step.py --decode [--batch 1] [--tokens 32] [--steps 7]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import optax
from jax import lax

sys.path.insert(0, os.path.dirname(__file__))
from common import compiled_stats, fmt_table, time_interleaved  # noqa: E402

import lora_jax  # noqa: E402
from lora_jax.leaves import is_lowrank  # noqa: E402

TOP_K = 2


def make_params(key, vocab, d, f, experts, layers):
    keys = iter(jax.random.split(key, 16))

    def normal(shape, fan_in):
        return jax.random.normal(next(keys), shape) / jnp.sqrt(fan_in)

    stack = {n: normal((layers, d, d), d) for n in ("q", "k", "v", "o")}
    stack["router"] = normal((layers, d, experts), d)
    stack["up"] = normal((layers, experts, d, f), d)
    stack["down"] = normal((layers, experts, f, d), f)
    return {"embed": normal((vocab, d), 1.0), "layers": stack, "head": normal((d, vocab), d)}


def _norm(x):
    return x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def _attention(q, k, v, heads):
    b, t, d = q.shape
    q, k, v = (z.reshape(b, t, heads, d // heads) for z in (q, k, v))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // heads)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v).reshape(b, t, d)


def _moe(x, router, up, down):
    """Top-2 MoE MLP. ``router(h)`` gives logits, ``up(rows, sizes)``/``down`` the grouped
    matmuls over rows sorted by expert."""
    b, t, d = x.shape
    h = x.reshape(b * t, d)
    logits = router(h)
    top, ids = lax.top_k(logits, TOP_K)
    gates = jax.nn.softmax(top, axis=-1)
    flat = ids.reshape(-1)
    order = jnp.argsort(flat)
    rows = jnp.repeat(h, TOP_K, axis=0)[order]
    sizes = jnp.bincount(flat, length=logits.shape[-1]).astype(jnp.int32)
    out = down(jax.nn.silu(up(rows, sizes)), sizes)[jnp.argsort(order)]
    return (out.reshape(b * t, TOP_K, d) * gates[..., None]).sum(1).reshape(b, t, d)


def make_model(heads):
    def model(params, tokens):
        x = params["embed"][tokens]

        def block(x, p):
            h = _norm(x)
            x = x + _attention(h @ p["q"], h @ p["k"], h @ p["v"], heads) @ p["o"]
            y = _moe(_norm(x), lambda h: h @ p["router"],
                     lambda r, s: lax.ragged_dot(r, p["up"], s),
                     lambda r, s: lax.ragged_dot(r, p["down"], s))
            return x + y, None

        x, _ = lax.scan(block, x, params["layers"])
        return _norm(x) @ params["head"]

    return model


def make_floor(heads, scale):
    """The model with hand-written LoRA terms: factors ``{name: (A, B)}``, trained alone."""

    def lin(x, w, ab):
        a, b = ab
        return x @ w + scale * ((x @ a) @ b)

    def grouped(rows, w, ab, sizes):
        a, b = ab
        low = lax.ragged_dot(lax.ragged_dot(rows, a, sizes), b, sizes)
        return lax.ragged_dot(rows, w, sizes) + scale * low

    def model(params, factors, tokens):
        params = lax.stop_gradient(params)
        x = params["embed"][tokens]

        def block(x, pf):
            p, fa = pf
            h = _norm(x)
            att = _attention(lin(h, p["q"], fa["q"]), lin(h, p["k"], fa["k"]),
                             lin(h, p["v"], fa["v"]), heads)
            x = x + lin(att, p["o"], fa["o"])
            y = _moe(_norm(x), lambda h: lin(h, p["router"], fa["router"]),
                     lambda r, s: grouped(r, p["up"], fa["up"], s),
                     lambda r, s: grouped(r, p["down"], fa["down"], s))
            return x + y, None

        x, _ = lax.scan(block, x, (params["layers"], factors["layers"]))
        return lin(_norm(x), params["head"], factors["head"])

    return model


def loss_fn(logits, tokens):
    lp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1))


def run(experts, args):
    vocab, d, f, layers, heads, batch, seq = (
        (128, 32, 64, 2, 2, 2, 16) if args.small else (1024, 256, 512, 2, 4, 4, 64))
    r, alpha = 8, 16
    params = make_params(jax.random.key(0), vocab, d, f, experts, layers)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, vocab)
    model = make_model(heads)
    layouts = lora_jax.trace(model, params, tokens)
    lora = lora_jax.init(params, r=r, alpha=alpha, key=jax.random.key(2), layouts=layouts)
    rep = lora_jax.report(model, params, lora, tokens)
    assert not rep.fallbacks, rep
    factors = jax.tree.map(lambda leaf: leaf.factors(), lora,
                           is_leaf=is_lowrank)
    qbase = lora_jax.quantize(params, "nf4", layouts=layouts)
    floor = make_floor(heads, alpha / r)
    tx = optax.adamw(1e-4)

    def full_step(p, o, tok):
        g = jax.grad(lambda p: loss_fn(model(p, tok), tok))(p)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o

    def lora_step(mode):
        fn = lora_jax.apply(model, mode=mode)

        def step(l, o, base, tok):
            g = jax.grad(lambda l: loss_fn(fn(base, l, tok), tok))(l)
            upd, o = tx.update(g, o, l)
            return optax.apply_updates(l, upd), o

        return step

    def floor_step(fa, o, base, tok):
        g = jax.grad(lambda fa: loss_fn(floor(base, fa, tok), tok))(fa)
        upd, o = tx.update(g, o, fa)
        return optax.apply_updates(fa, upd), o

    variants = [
        ("full fine-tuning", full_step, (params, tx.init(params)), (tokens,), params),
        ("LoRA merged (fallback)", lora_step("merged"), (lora, tx.init(lora)),
         (params, tokens), lora),
        ("LoRA fast (grouped)", lora_step("fast"), (lora, tx.init(lora)), (params, tokens),
         lora),
        ("hand-written LoRA (floor)", floor_step, (factors, tx.init(factors)),
         (params, tokens), factors),
        ("QLoRA nf4 fast", lora_step("fast"), (lora, tx.init(lora)), (qbase, tokens), lora),
    ]
    rows, compiled = [], []
    for name, step, state, extra, trainable in variants:
        state = jax.tree.map(jnp.copy, state)  # donation must not delete shared arrays
        jitted = jax.jit(step, donate_argnums=(0, 1))
        c, flops, peak = compiled_stats(jitted, *state, *extra)
        compiled.append((c, state, extra))
        n_train = sum(x.size for x in jax.tree.leaves(trainable))
        rows.append([name, None, None, flops, None, peak, None, f"{n_train:,}"])
    times = time_interleaved(compiled, n_steps=args.steps)
    floor_row, lora_row = rows[3], rows[2]
    for row, t in zip(rows, times):
        row[1] = f"{t * 1e3:.1f}"
        row[2] = f"{t / times[3]:.3f}"
        row[4] = f"{row[3] / floor_row[3]:.3f}"
        row[6] = f"{row[5] / lora_row[5]:.3f}"
    for row in rows:
        row[3] = f"{row[3] / 1e9:.3f}"
        row[5] = f"{row[5] / 2**20:.1f}"
    print(f"\nE={experts} top-{TOP_K} backend={jax.default_backend()} batch={batch} seq={seq} "
          f"d={d} f={f} layers={layers} r={r}")
    print(fmt_table(["variant", "step ms", "time/floor", "GFLOPs*", "flops/floor", "peak MiB",
                     "peak/LoRA", "trainable"], rows))


def decode(args):
    """Time per decoded token of a Llama (SmolLM2-135M widths, 6 layers, random weights)
    through ``apply`` with LoRA r=8 on every projection, against the merged weights."""
    from lora_jax.models.llama import Llama, LlamaConfig, init_cache

    cfg = LlamaConfig(vocab=8192, layers=2 if args.small else 6, max_len=512)
    model = Llama(cfg)
    tok = jnp.zeros((args.batch, 1), jnp.int32)
    params = model.init(jax.random.key(0), tok)
    layouts = lora_jax.trace(model.apply, params, tok)
    lora = lora_jax.init(params, r=8, alpha=16, key=jax.random.key(1), layouts=layouts)
    lora = jax.tree.map(lambda a: a + 0.01, lora)  # B non-zero
    fn = lora_jax.apply(model.apply)
    rep = lora_jax.report(model.apply, params, lora, tok, cache=init_cache(cfg, args.batch, 64))
    routes = sorted({u for w in rep.weights.values() for u in w.routes})
    n = args.tokens

    def generate(step_fn, variables, lora):
        @jax.jit
        def run(tok):  # a fresh cache each run: n tokens from position 0
            def step(carry, _):
                tok, cache = carry
                logits, cache = step_fn(variables, lora, tok, cache)
                return (jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32), cache), None

            (tok, _), _ = lax.scan(step, (tok, init_cache(cfg, args.batch, n)), None, length=n)
            return (tok,)

        return run

    merged = lora_jax.merge(params, lora)
    variants = [
        ("apply(fn), LoRA r=8",
         generate(lambda v, lr, t, c: fn(v, lr, t, cache=c), params, lora)),
        ("merged weights (no adapter)",
         generate(lambda v, lr, t, c: model.apply(v, t, cache=c), merged, None)),
    ]
    runs = [(run, (tok,), ()) for _, run in variants]
    times = time_interleaved(runs, n_warmup=1, n_steps=args.steps)
    print(f"\ndecode: Llama d={cfg.d} ffn={cfg.ffn} layers={cfg.layers} batch={args.batch} "
          f"tokens/run={n} backend={jax.default_backend()} lora_jax={lora_jax.__file__}")
    print(f"routes of the adapted weights: {routes}")
    print(fmt_table(["variant", "ms/token", "vs merged"],
                    [[name, f"{t / n * 1e3:.2f}", f"{t / times[1]:.3f}"]
                     for (name, _), t in zip(variants, times)]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--small", action="store_true", help="a tiny model (smoke test)")
    ap.add_argument("--decode", action="store_true",
                    help="time per decoded token of a Llama through apply() instead")
    ap.add_argument("--batch", type=int, default=1, help="decode batch")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per decode run")
    args = ap.parse_args(argv)
    if args.decode:
        decode(args)
        return
    for e in args.experts:
        run(e, args)
    print("\n* XLA:CPU counts each ragged_dot as if every expert saw every row: FLOPs compare "
          "between LoRA variants, not with full fine-tuning.")


if __name__ == "__main__":
    main()
