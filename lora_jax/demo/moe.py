"""``--model moe``: a tiny Qwen3-MoE, pretrained briefly, adapted with its experts included.

The model is :class:`lora_jax.models.moe.MoeModel` at byte level (every layer sparse,
``experts`` experts, top-2 routing), pretrained on the Python language reference and adapted
to the stdlib docstrings as :mod:`lora_jax.demo.gpt` does, by full fine-tuning, LoRA and
QLoRA. The adapters come from the model's traced layouts, so every expert gets its own
factors (A ``(E, d, r)``, B ``(E, r, f)``) run as grouped matmuls (the router stays
frozen): :func:`run` prints how many of the trained parameters are the experts', and checks
with :func:`lora_jax.report` that no expert use falls back to the merged weight. Same
table, plot and adapter files (PEFT ``target_parameters`` format, ``name_map="qwen3_moe"``)
as the GPT job.
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
from lora_jax.demo.data import adapt_text, batches, eval_batches, pretrain_text, split_tokens
from lora_jax.demo.gpt import plot_losses, print_table
from lora_jax.demo.loop import make_step, peak_bytes, require, save_tree, train
from lora_jax.lora import leaves as lora_leaves
from lora_jax.models.gpt import loss_fn
from lora_jax.models.moe import MoeConfig, MoeModel

METHODS = ("full", "lora", "qlora")
ROUTER = r".*/mlp/gate/kernel"  # not adapted
QUANT_BLOCK = 64  # NF4 block size
DOUBLE_QUANT_GROUP = 256  # blocks per second-level scale


def _logits(model: MoeModel, params, tok) -> jax.Array:
    return cast(jax.Array, model.apply(params, tok))


def pretrained_moe(*, d: int = 128, layers: int = 4, experts: int = 4, steps: int = 300,
                   batch: int = 16, seq: int = 64, lr: float = 3e-3, seed: int = 0,
                   quiet: bool = True):
    """The byte-level MoE, pretrained on the language reference, and its data.

    Returns ``(model, params, data)`` as :func:`lora_jax.demo.gpt.pretrained_gpt` does.
    """
    cfg = MoeConfig(vocab=256, d=d, layers=layers, heads=4, kv_heads=2, experts=experts,
                    top_k=2, expert_ffn=d, ffn=4 * d, max_len=seq)
    model = MoeModel(cfg)
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


def expert_parameter_count(lora) -> int:
    """Adapter parameters (A and B elements) on the expert kernels."""
    return sum(int(np.prod(a.shape) + np.prod(b.shape))
               for path, leaf in lora_leaves(lora).items() if "/experts/" in path
               for a, b in [leaf.factors()])


def check_experts_grouped(model: MoeModel, base, lora, tok) -> int:
    """The number of expert kernels adapted; raises if any of their uses is not grouped."""
    report = lora_jax.report(model.apply, base, lora, tok)
    experts = [p for p in report.weights if "/experts/" in p]
    slow = {p: report[p].routes for p in experts if set(report[p].routes) != {"grouped"}}
    if not experts or slow:
        raise RuntimeError(f"expert kernels not on the grouped LoRA route: {slow or 'none'}"
                           f"\n{report}")
    return len(experts)


def run(methods=METHODS, *, pretrain_steps: int = 300, steps: int = 150, rank: int = 8,
        alpha: float = 16.0, batch: int = 16, seq: int = 64, d: int = 128, layers: int = 4,
        experts: int = 4, lr: float = 3e-3, full_lr: float = 1e-3, seed: int = 0,
        out: str | None = None, quiet: bool = False) -> list[tuple]:
    """Pretrains the MoE, adapts it by each of ``methods``, prints the table, writes files.

    Arguments and return value as :func:`lora_jax.demo.gpt.run`; ``methods`` a subset of
    :data:`METHODS`, ``experts`` the experts per layer (top-2 routing).
    """
    require("tqdm", "matplotlib")
    print(f"lora_jax demo: byte-level Qwen3-MoE d={d} layers={layers} experts={experts} "
          f"(top-2) on {jax.default_backend()}; pretraining on the Python language "
          f"reference, then adapting to stdlib docstrings")
    model, params, data_ = pretrained_moe(d=d, layers=layers, experts=experts,
                                          steps=pretrain_steps, batch=batch, seq=seq, lr=lr,
                                          seed=seed, quiet=quiet)
    ad_train, test = data_["adapt_train"], data_["adapt_test"]
    evaluate = jax.jit(lambda p, tok: loss_fn(_logits(model, p, tok), tok))
    before = float(np.mean([evaluate(params, t) for t in test]))

    out = out or tempfile.mkdtemp(prefix="lora_jax_demo_moe_")
    os.makedirs(out, exist_ok=True)
    data = lambda: batches(ad_train, batch, seq, seed + 1)  # noqa: E731
    tok0 = next(data())
    layouts = lora_jax.trace(model.apply, params, tok0)  # experts: stack axis = expert axis
    f = lora_jax.apply(model.apply)
    rows, curves, last = [], {}, None
    for method in methods:
        if method == "full":
            tx, base = optax.adamw(full_lr), None
            trainable = jax.tree.map(jnp.copy, params)

            def loss_of(p, _, tok):
                return loss_fn(_logits(model, p, tok), tok)
        else:
            tx = optax.adamw(lr)
            # Every matmul weight but the router (its E outputs: rank <= E, and a moving
            # router reshuffles which expert sees which token).
            trainable = lora_jax.init(params, r=rank, alpha=alpha, key=jax.random.key(seed + 2),
                                      layouts=layouts, exclude=ROUTER)
            base = params
            if method == "qlora":
                # Blocks within each expert (the layouts' stack axis); the second-level
                # scales too where each expert's blocks fill whole groups.
                per_expert = d * model.cfg.expert_ffn
                double = per_expert % (QUANT_BLOCK * DOUBLE_QUANT_GROUP) == 0
                base = lora_jax.quantize(params, "nf4", block_size=QUANT_BLOCK,
                                         double_quant=double, layouts=layouts)
                print(f"qlora: NF4 base, blocks of {QUANT_BLOCK} within each expert, double "
                      f"quantization {'on' if double else 'off (an expert fills no whole group)'}")
            n_kernels = check_experts_grouped(model, base, trainable, tok0)
            n_expert = expert_parameter_count(trainable)
            print(f"{method}: {lora_jax.param_count(trainable):,} trainable parameters, "
                  f"{n_expert:,} of them on the {n_kernels} expert kernels "
                  f"({experts} experts x {layers} layers, each its own rank-{rank} factors; "
                  f"grouped route, no E x d x f update); router frozen")

            def loss_of(lo, b, tok):
                return loss_fn(f(b, lo, tok), tok)
        step = make_step(tx, loss_of)
        opt = tx.init(trainable)
        peak = peak_bytes(step.lower(trainable, opt, base, tok0).compile())
        state, losses, t_step = train(step, [trainable, opt], data(), steps, method, quiet,
                                      const=(base,))
        trainable = state[0]
        curves[method] = losses
        if method == "full":
            after = float(np.mean([evaluate(trainable, t) for t in test]))
            size = save_tree(os.path.join(out, "full"), trainable)
            n = lora_jax.base_param_count(params)
        else:
            adapted = jax.jit(lambda lo, tok, b=base: loss_fn(f(b, lo, tok), tok))
            after = float(np.mean([adapted(trainable, t) for t in test]))
            size, n = save_adapters(out, method, trainable), lora_jax.param_count(trainable)
            last = trainable
        rows.append((method, n, size, t_step, peak, before, after))

    print()
    if last is not None:
        print(lora_jax.summary(last, params))
    print_table(rows)
    png = plot_losses(os.path.join(out, "loss_curves.png"), curves)
    print("\nloss is nats/byte on held-out adaptation text; peak MB is the compiled train "
          "step's memory (args + temps + outputs).")
    print(f"output folder: {out}" + (f"  (loss curves: {png})" if png else ""))
    return rows


def save_adapters(out: str, method: str, tree) -> int:
    """Saves an adapter as PEFT files (experts as ``target_parameters``) and orbax; returns
    the PEFT folder's bytes."""
    from lora_jax import checkpoint, peft

    peft_dir = os.path.join(out, method, "peft")
    peft.save(peft_dir, tree, name_map="qwen3_moe")
    checkpoint.save_adapter(os.path.join(out, method, "orbax"), tree)
    return checkpoint.disk_size(peft_dir)
