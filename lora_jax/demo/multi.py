"""``python -m lora_jax.demo --method multi``: four adapters trained in one run, served together.

The built-in byte-level GPT is pretrained on the Python language reference, then four LoRA
adapters, one per text (the docstrings of four groups of stdlib modules), train in one step
per batch as a stack (:func:`lora_jax.stack`): each batch holds rows of all four texts and
``adapter_ids`` sends each row to its adapter; each adapter has its own learning rate in one
optax transform (:func:`lora_jax.multi.adam`). Each adapter is then trained alone on the same
rows in the same order, and the table compares held-out losses (they agree to float
rounding). Last, one mixed batch generates a continuation per text, each row with its own
adapter, plus one row with the base alone.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from lora_jax import multi
from lora_jax.demo.data import adapt_text, batches, eval_batches, split_tokens
from lora_jax.demo.gpt import _logits, pretrained_gpt
from lora_jax.models.gpt import loss_fn

TEXTS = {"json-csv-argparse": ("json", "csv", "argparse"),
         "iter-func-collections": ("itertools", "functools", "collections"),
         "paths-files": ("pathlib", "shutil", "os"),
         "numbers-strings": ("statistics", "heapq", "bisect", "difflib", "string", "textwrap")}


def _rows_loss(logits, tok):
    return jax.vmap(lambda lg, t: loss_fn(lg[None], t[None]))(logits, tok)


def run(*, pretrain_steps: int = 300, steps: int = 150, rank: int = 8, alpha: float = 16.0,
        rows: int = 4, seq: int = 64, d: int = 128, layers: int = 4, lr: float = 3e-3,
        seed: int = 0, quiet: bool = False, gen: int = 48) -> dict:
    """Runs the demo (see the module docstring); returns ``{name: (base, together, alone)}``
    held-out losses and the generated texts under ``"generated"``."""
    print(f"lora_jax multi-adapter demo: byte-level GPT d={d} layers={layers} on "
          f"{jax.default_backend()}; {len(TEXTS)} adapters (r={rank}) trained in one run")
    model, params, _ = pretrained_gpt(d=d, layers=layers, steps=pretrain_steps, batch=16,
                                      seq=seq, lr=lr, seed=seed, quiet=quiet)
    names = list(TEXTS)
    k = len(names)
    splits = [split_tokens(adapt_text(TEXTS[n])) for n in names]
    streams = [batches(tr, rows, seq, seed + 10 + i) for i, (tr, _) in enumerate(splits)]
    data = [[next(s) for s in streams] for _ in range(steps)]  # per step, per adapter
    tests = [eval_batches(te, rows, seq, n=2) for _, te in splits]
    lrs = jnp.asarray([lr] * k)  # one learning rate per adapter (a sweep would vary these)
    f = lora_jax.apply(model.apply)
    fresh = [lora_jax.init(params, r=rank, alpha=alpha, key=jax.random.key(seed + 100 + i))
             for i in range(k)]

    stack = lora_jax.stack(dict(zip(names, fresh)))
    ids = jnp.repeat(jnp.arange(k, dtype=jnp.int32), rows)
    tx = multi.adam(lrs)

    @jax.jit
    def step_all(s, o, tok):
        def loss(s):  # each adapter's mean over its own rows, summed over adapters
            return jnp.sum(_rows_loss(f(params, s, tok, adapter_ids=ids), tok)) / rows
        g = jax.grad(loss)(s)
        u, o = tx.update(g, o, s)
        return optax.apply_updates(s, u), o

    t0 = time.perf_counter()
    s, o = stack, tx.init(stack)
    for b in data:
        s, o = step_all(s, o, jnp.concatenate(b))
    jax.block_until_ready(s)
    t_together = time.perf_counter() - t0
    together = multi.unstack(s)

    t0 = time.perf_counter()
    alone = {}

    @jax.jit
    def step1(lo, o1, tok, lr):  # one compiled step for every adapter (lr is an argument)
        g = jax.grad(lambda lo: loss_fn(f(params, lo, tok), tok))(lo)
        u, o1 = optax.adam(lr).update(g, o1, lo)
        return optax.apply_updates(lo, u), o1

    for i, n in enumerate(names):
        lo, o1 = fresh[i], optax.adam(lrs[i]).init(fresh[i])
        for b in data:
            lo, o1 = step1(lo, o1, b[i], lrs[i])
        alone[n] = lo
    jax.block_until_ready(alone)
    t_alone = time.perf_counter() - t0

    evaluate = jax.jit(lambda base, lo, tok: loss_fn(f(base, lo, tok), tok))
    plain = jax.jit(lambda p, tok: loss_fn(_logits(model, p, tok), tok))
    out: dict = {}
    print(f"\n{'adapter':>22}  {'base':>6}  {'together':>8}  {'alone':>6}  (held-out loss, "
          "nats/byte)")
    for i, n in enumerate(names):
        base_l = float(np.mean([plain(params, t) for t in tests[i]]))
        tog = float(np.mean([evaluate(params, together[n], t) for t in tests[i]]))
        alo = float(np.mean([evaluate(params, alone[n], t) for t in tests[i]]))
        out[n] = (base_l, tog, alo)
        print(f"{n:>22}  {base_l:6.3f}  {tog:8.3f}  {alo:6.3f}")
    print(f"training: {k} adapters in one run {t_together:.1f} s, one after another "
          f"{t_alone:.1f} s (including compilation)")

    # One mixed batch: a prompt from each text's held-out part, each row with its adapter,
    # and the first prompt again with the base alone.
    gen = min(gen, seq // 2)
    prompts = np.stack([np.asarray(tests[i][0][0, :seq - gen]) for i in range(k)]
                       + [np.asarray(tests[0][0][0, :seq - gen])])
    row_ids = names + [multi.BASE]
    gen_ids = multi.adapter_ids(s, row_ids)

    @jax.jit
    def next_tokens(s, buf, t):
        logits = f(params, s, buf, adapter_ids=gen_ids)
        return jnp.argmax(logits[:, t - 1], axis=-1).astype(jnp.int32)

    buf = jnp.zeros((len(row_ids), seq), jnp.int32).at[:, :seq - gen].set(prompts)
    for t in range(seq - gen, seq):  # causal: positions after t never affect logits at t - 1
        buf = buf.at[:, t].set(next_tokens(s, buf, t))
    texts = [bytes(np.asarray(r, np.uint8)).decode("utf-8", "replace") for r in buf]
    print("\ngenerated from one mixed batch (prompt | continuation):")
    for n, txt in zip(row_ids, texts):
        cut = seq - gen
        print(f"[{n}] {txt[:cut]!r} | {txt[cut:]!r}")
    out["generated"] = dict(zip(row_ids, texts))
    return out
