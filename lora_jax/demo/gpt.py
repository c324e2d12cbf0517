"""The main job: pretrain the built-in GPT, then adapt it by full FT, LoRA, AdaLoRA and QLoRA.

No downloads: the model is the built-in :class:`lora_jax.models.GPT` at byte level; it is
pretrained on the Python language reference that ships with every Python
(``pydoc_data.topics``), then adapted to a second text, the docstrings of a set of stdlib
modules, by each method: full fine-tuning, LoRA, AdaLoRA and QLoRA (NF4 + double
quantization). :func:`run` prints a table of trainable parameters, adapter size on disk, step
time, peak memory of the compiled step and held-out loss before and after, and writes a
loss-curve PNG and the adapters (PEFT and orbax formats) to the output folder it names.
:func:`pretrained_gpt` is the pretrained model on its own, for benchmarks.
"""

from __future__ import annotations

import os
import tempfile
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from lora_jax import adalora
from lora_jax.demo import variants
from lora_jax.demo.data import adapt_text, batches, eval_batches, pretrain_text, split_tokens
from lora_jax.demo.loop import make_step, peak_bytes, require, save_tree, train
from lora_jax.models.gpt import GPT, GPTConfig, loss_fn

METHODS = ("full", "lora", "adalora", "qlora")  # "all"
#: every method ``--method`` accepts: the four above and :data:`lora_jax.demo.variants.NAMES`
ALL_METHODS = METHODS + variants.NAMES


def _logits(model: GPT, params, tok) -> jax.Array:
    # flax annotates Module.apply as `Any | (output, variables)`, the pair being for
    # mutable=...; without mutable the result is the model's output, the logits.
    return cast(jax.Array, model.apply(params, tok))


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
        loss, g = jax.value_and_grad(lambda p: loss_fn(_logits(model, p, tok), tok))(p)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    (params, _), _, _ = train(step, [params, tx.init(params)],
                              batches(pre_train, batch, seq, seed), steps, "pretrain", quiet)
    return model, params, {"adapt_train": ad_train, "adapt_test": test}


def save_adapters(out: str, method: str, tree, params) -> int:
    """Saves an adapter in PEFT format (and orbax); returns the PEFT folder's bytes."""
    from lora_jax import checkpoint, peft

    peft_dir = os.path.join(out, method, "peft")
    peft.save(peft_dir, tree, name_map="gpt")
    checkpoint.save_adapter(os.path.join(out, method, "orbax"), tree)
    return checkpoint.disk_size(peft_dir)


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


def print_table(rows) -> None:
    """The comparison table: one row ``(method, n, size, t_step, peak, before, after)`` each."""
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


def run(methods=METHODS, *, pretrain_steps: int = 300, steps: int = 150, rank: int = 8,
        alpha: float = 16.0, batch: int = 16, seq: int = 64, d: int = 128, layers: int = 4,
        lr: float = 3e-3, full_lr: float = 1e-3, seed: int = 0, out: str | None = None,
        quiet: bool = False) -> list[tuple]:
    """Pretrains the GPT, adapts it by each of ``methods``, prints the table and writes files.

    Args:
      methods: a subset of :data:`ALL_METHODS`, in the order to run.
      pretrain_steps, steps: pretraining steps, and fine-tuning steps per method.
      rank, alpha: LoRA rank and alpha (AdaLoRA starts at 1.5 x rank, pruned to rank).
      batch, seq, d, layers: batch (sequences x bytes) and model size.
      lr, full_lr: pretraining / adapter learning rate, and full fine-tuning's.
      seed: PRNG seed.
      out: output folder (default: a new temp dir).
      quiet: no progress bars.

    Returns:
      One ``(method, trainable params, bytes on disk, median step s, peak bytes, loss before,
      loss after)`` per method.

    Raises:
      ModuleNotFoundError: tqdm or matplotlib (the ``demo`` extra) is not installed.
    """
    require("tqdm", "matplotlib")
    print(f"lora_jax demo: byte-level GPT d={d} layers={layers} on "
          f"{jax.default_backend()}; pretraining on the Python language reference, then "
          f"adapting to stdlib docstrings")
    model, params, data_ = pretrained_gpt(d=d, layers=layers, steps=pretrain_steps,
                                          batch=batch, seq=seq, lr=lr, seed=seed, quiet=quiet)
    ad_train, test = data_["adapt_train"], data_["adapt_test"]

    full_loss = lambda p, _, tok: loss_fn(_logits(model, p, tok), tok)  # noqa: E731
    evaluate = jax.jit(lambda p, tok: loss_fn(_logits(model, p, tok), tok))
    before = float(np.mean([evaluate(params, t) for t in test]))

    out = out or tempfile.mkdtemp(prefix="lora_jax_demo_")
    os.makedirs(out, exist_ok=True)
    rows, curves, last = [], {}, None
    f = lora_jax.apply(model.apply)
    data = lambda: batches(ad_train, batch, seq, seed + 1)  # noqa: E731
    tok0 = next(data())
    for method in methods:
        key = jax.random.key(seed + 2)
        if method == "full":
            tx = optax.adamw(full_lr)
            trainable, base, loss_of, post, extra = jax.tree.map(jnp.copy, params), None, \
                full_loss, None, []
        elif method in variants.NAMES:  # dora, loraplus, loftq, olora
            tx, base, trainable = variants.setup(method, params, rank=rank, alpha=alpha, lr=lr,
                                                 key=key)
            loss_of = lambda l, b, tok: loss_fn(f(b, l, tok), tok)  # noqa: E731
            post, extra = None, []
        elif method in ("lora", "qlora"):
            tx = optax.adamw(lr)
            base = params if method == "lora" else lora_jax.quantize(params, "nf4",
                                                                     double_quant=True)
            trainable = lora_jax.init(params, r=rank, alpha=alpha, key=key)
            loss_of = lambda l, b, tok: loss_fn(f(b, l, tok), tok)  # noqa: E731
            post, extra = None, []
        else:  # adalora: init_r = 1.5 x rank, pruned to rank by the end
            tx = optax.adamw(lr)
            base = params
            trainable = adalora.init(params, init_r=(3 * rank) // 2, target_r=rank,
                                     alpha=alpha, key=key)
            T = steps
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
        peak = peak_bytes(step.lower(trainable, opt, *extra, base, tok0).compile())
        state, losses, t_step = train(step, [trainable, opt, *extra], data(), steps,
                                      method, quiet, const=(base,))
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
    print_table(rows)
    png = plot_losses(os.path.join(out, "loss_curves.png"), curves)
    print("\nloss is nats/byte on held-out adaptation text (adapters finalized/merged as "
          "deployed); peak MB is the compiled train step's memory (args + temps + outputs).")
    print(f"output folder: {out}" + (f"  (loss curves: {png})" if png else ""))
    return rows
