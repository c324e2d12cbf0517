"""The demos: what ``python -m lora_jax.demo`` runs, and the data and loop the benchmarks share.

* :mod:`~lora_jax.demo.data`: texts that ship with Python, as byte tokens and batches;
* :mod:`~lora_jax.demo.loop`: the small training loop, compiled-memory readout, saving;
* :mod:`~lora_jax.demo.gpt`: the main job (the built-in GPT: full FT, LoRA, AdaLoRA, QLoRA);
* :mod:`~lora_jax.demo.llm`: SmolLM2-135M fine-tuned with QLoRA or LoRA;
* :mod:`~lora_jax.demo.moe`: a tiny Qwen3-MoE, its experts adapted (LoRA, QLoRA);
* :mod:`~lora_jax.demo.cli`: the command line (``python -m lora_jax.demo``).

The demos need tqdm and matplotlib, which ``lora_jax`` itself does not: install them with
``pip install "lora-jax[demo]"``.
"""

from lora_jax.demo.cli import main
from lora_jax.demo.data import (
    ADAPT_MODULES,
    adapt_text,
    batches,
    eval_batches,
    pretrain_text,
    split_tokens,
)
from lora_jax.demo.gpt import METHODS, plot_losses, pretrained_gpt, run, save_adapters
from lora_jax.demo.loop import make_step, peak_bytes, require, save_tree, train

__all__ = [
    "ADAPT_MODULES",
    "METHODS",
    "adapt_text",
    "batches",
    "eval_batches",
    "main",
    "make_step",
    "peak_bytes",
    "plot_losses",
    "pretrain_text",
    "pretrained_gpt",
    "require",
    "run",
    "save_adapters",
    "save_tree",
    "split_tokens",
    "train",
]
