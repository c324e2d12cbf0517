"""Flax NNX: LoRA, QLoRA and AdaLoRA as NNX modules, and NNX models under ``lora_jax.apply``.

Two ways in, the same fast path underneath:

* :class:`LoRA` / :class:`AdaLoRA` (:mod:`.module`, :mod:`.adaptive`): ``nnx.Module``
  wrappers with typed variables (:class:`LoraParam` trained, :class:`FrozenParam` frozen),
  for ``nnx.Optimizer``, ``nnx.jit`` and ``nnx.grad`` as usual.
* :func:`functional` (:mod:`.pure`): an NNX model as a pure function
  ``fn(params, rest, *args) -> (out, rest)`` for :func:`lora_jax.apply`, for training loops
  written over parameter trees.

Loaded on first use of ``lora_jax.nnx`` (``import lora_jax`` does not import ``flax.nnx``).
"""

from lora_jax.nnx.adaptive import AdaLoRA
from lora_jax.nnx.module import LoRA
from lora_jax.nnx.pure import functional, rng_count_paths, trace, unreturned, warn_unreturned_rng
from lora_jax.nnx.variables import AdaLoraState, FrozenParam, LoraParam

__all__ = [
    "AdaLoRA",
    "AdaLoraState",
    "FrozenParam",
    "LoRA",
    "LoraParam",
    "functional",
    "rng_count_paths",
    "trace",
    "unreturned",
    "warn_unreturned_rng",
]
