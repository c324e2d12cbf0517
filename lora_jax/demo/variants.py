"""The demo's LoRA variants beyond the main four: DoRA, LoRA+, LoftQ and OLoRA.

Each :func:`setup` returns ``(optimizer, base, adapter tree)`` for one method, trained by
the same loop as LoRA (:mod:`lora_jax.demo.gpt`):

* ``dora``: DoRA adapters (``init(..., dora=True)``) on the float32 base;
* ``loraplus``: LoRA with LoRA+'s learning rates (B at 16× A's; A at a quarter of LoRA's
  rate, so B learns at 4× it);
* ``loftq``: an NF4 (double quant) base and factors from 5 LoftQ iterations, QLoRA's
  storage with a better start;
* ``olora``: OLoRA's QR init, on the adjusted base ``W − s·B·A``.
"""

from __future__ import annotations

import optax

import lora_jax
from lora_jax import loftq, loraplus

NAMES = ("dora", "loraplus", "loftq", "olora")


def setup(method: str, params, *, rank: int, alpha: float, lr: float, key):
    """``(tx, base, trainable)`` for ``method`` (one of :data:`NAMES`)."""
    if method == "loftq":
        base, lora = loftq.init(params, r=rank, alpha=alpha, key=key, num_iter=5,
                                double_quant=True)
        return optax.adamw(lr), base, lora
    lora = lora_jax.init(params, r=rank, alpha=alpha, key=key, dora=method == "dora",
                         init="olora" if method == "olora" else "default")
    base = lora_jax.unmerge(params, lora) if method == "olora" else params
    if method == "loraplus":
        return loraplus.optimizer(lora, lr=lr / 4, ratio=16, weight_decay=1e-4), base, lora
    return optax.adamw(lr), base, lora
