"""Per-adapter hyperparameters in one optax transform: a sweep of K settings as one job.

:func:`scale_by_slot` multiplies each slot's updates by its own factor: after
``optax.scale_by_adam()`` with factors ``-lr_k`` it is Adam with a learning rate per adapter
(Adam's statistics are per entry, so slots never mix). Stacks' frozen fields (the scalings)
get zero updates; arrays of other trees pass through unchanged.

>>> import jax, jax.numpy as jnp, optax, lora_jax
>>> p = {"w": {"kernel": jnp.ones((4, 3))}}
>>> s = lora_jax.stack([lora_jax.init(p, r=2, key=jax.random.key(i)) for i in range(3)])
>>> tx = lora_jax.multi.adam(jnp.array([1e-3, 1e-2, 1e-1]))
>>> state = tx.init(s)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from lora_jax.leaves import is_lowrank
from lora_jax.multi.stack import is_stacked


def _per_slot(u, f):
    return u * f.astype(u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))


def scale_by_slot(factors: jax.typing.ArrayLike) -> optax.GradientTransformation:
    """Updates of slot ``k`` of every stacked leaf times ``factors[k]``; frozen fields 0."""
    factors = jnp.asarray(factors)

    def update(updates, state, params=None):
        del params

        def leaf(u):
            if not is_stacked(u):
                return u
            return u.replace(**{
                name: jnp.zeros_like(val) if name in u.frozen_fields else _per_slot(val, factors)
                for name, val in ((n, getattr(u, n)) for n in u.field_roles)})

        return jax.tree.map(leaf, updates, is_leaf=is_lowrank), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def adam(learning_rates: jax.typing.ArrayLike, *, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-8, weight_decay: float = 0.0) -> Any:
    """Adam (AdamW with ``weight_decay``) with one learning rate per slot of a stack: for
    slot ``k`` exactly ``optax.adamw(learning_rates[k], ...)`` on that adapter alone."""
    parts = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)]
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(scale_by_slot(-jnp.asarray(learning_rates)))
    return optax.chain(*parts)
