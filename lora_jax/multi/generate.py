"""Decoding with one adapter per row: the bundled Llama's KV-cache loop over a stack.

The loop is :func:`lora_jax.models.llama.generate`'s (the prompt fed one token per step
through the same compiled step that decodes), with each step's model call routed per row.
The cache keeps batch on axis 1, which ``batch_axes`` says.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.multi.stack import adapter_ids as resolve_ids
from lora_jax.transform.api import apply


@functools.lru_cache(maxsize=8)
def _generator(model, prompt_len: int, n: int, routing: str):
    from lora_jax.models.llama import KVCache, init_cache

    f = apply(model.apply)
    axes = ((0,), {"cache": KVCache(1, 1, None)})  # type: ignore[arg-type]

    @jax.jit
    def run(base, stack, tokens, ids):
        b = tokens.shape[0]

        def step(carry, t):
            prev, cache = carry
            fed = jnp.where(t < prompt_len, tokens[:, jnp.minimum(t, prompt_len - 1)], prev)
            logits, cache = f(base, stack, fed[:, None], cache=cache, adapter_ids=ids,
                              batch_axes=axes, routing=routing)
            return (jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache), fed

        steps = prompt_len + n - 1
        carry = (jnp.zeros(b, jnp.int32), init_cache(model.cfg, b, steps))
        (last, _), fed = jax.lax.scan(step, carry, jnp.arange(steps))
        return jnp.concatenate([fed.T, last[:, None]], axis=1)

    return run


def generate(model, base: Any, stack: Any, tokens: jax.typing.ArrayLike, n: int, *,
             adapter_ids: Any, routing: str = "gather") -> jax.Array:
    """Greedy continuation of ``tokens`` by ``n`` tokens, row ``i`` with adapter
    ``adapter_ids[i]`` of ``stack`` (``"__base__"``/``-1``: the base alone).

    Args:
      model: a :class:`lora_jax.models.Llama`.
      base: its variables (``{"params": ...}``; dense or quantized).
      stack: a stack of adapters for them (:func:`lora_jax.stack`).
      tokens: (batch, time) int prompt.
      n: tokens to add, >= 1.
      adapter_ids: one adapter name or slot index per row, checked before the loop
        compiles (:func:`lora_jax.multi.adapter_ids`: count, range ``[-1, K)``, dtype).
      routing: ``"gather"``, ``"onehot"`` or ``"grouped"`` (:meth:`StackedLora.select`).

    Returns:
      (batch, time + n) int32. Swapping an adapter in ``stack`` (:func:`replace`) reuses
      the compiled loop.

    Raises:
      IndexError, KeyError, TypeError: bad ids (:func:`lora_jax.multi.adapter_ids`).
      ValueError: not one id per row of ``tokens``.
    """
    if n < 1:
        raise ValueError(f"generate: n={n} must be >= 1")
    tokens = jnp.atleast_2d(jnp.asarray(tokens, jnp.int32))
    ids = resolve_ids(stack, adapter_ids)
    if ids.shape[0] != tokens.shape[0]:
        raise ValueError(f"generate: {ids.shape[0]} adapter_ids for {tokens.shape[0]} rows of "
                         f"tokens {tuple(tokens.shape)}: one id per row is needed")
    return _generator(model, tokens.shape[1], n, routing)(base, stack, tokens, ids)
