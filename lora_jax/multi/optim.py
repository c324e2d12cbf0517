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
import numpy as np
import optax

from lora_jax.leaves import is_lowrank
from lora_jax.multi.stack import is_stacked


def _per_slot(u, f):
    return u * f.astype(u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))


def _as_per_slot(values, what: str, where: str, *, nonnegative: bool) -> jax.Array:
    """``values`` as a ``(K,)`` array; concrete values are checked: finite (and ≥ 0)."""
    arr = jnp.asarray(values)
    numeric = jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)
    if arr.ndim != 1 or not numeric:
        raise TypeError(f"{where}: {what} must be one number per slot of the stack, a (K,) "
                        f"array, got {arr.dtype}{list(arr.shape)}")
    if not isinstance(arr, jax.core.Tracer):
        host = np.asarray(arr, np.float64)
        bad = np.nonzero(~np.isfinite(host) | ((host < 0) if nonnegative else False))[0]
        if bad.size:
            need = "finite and >= 0" if nonnegative else "finite"
            got = ", ".join(f"{v:.4g}" for v in host[bad])
            raise ValueError(f"{where}: {what} must be {need}; slots {bad.tolist()} have "
                             f"[{got}]")
    return arr


def _check_slots(tree, count: int, what: str, where: str) -> None:
    """Every stacked leaf of ``tree`` has ``count`` slots (a clear error otherwise)."""
    for x in jax.tree.leaves(tree, is_leaf=is_lowrank):
        if is_stacked(x) and x.a.shape[0] != count:
            raise ValueError(f"{where}: {count} {what} for a stack of K={x.a.shape[0]} adapters "
                             f"{list(x.names)}: one per slot is needed")


def _scale_by_slot(factors, what: str, where: str) -> optax.GradientTransformation:
    count = factors.shape[0]

    def init(params):
        _check_slots(params, count, what, where)
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        _check_slots(updates, count, what, where)

        def leaf(u):
            if not is_stacked(u):
                return u
            return u.replace(**{
                name: jnp.zeros_like(val) if name in u.frozen_fields else _per_slot(val, factors)
                for name, val in ((n, getattr(u, n)) for n in u.field_roles)})

        return jax.tree.map(leaf, updates, is_leaf=is_lowrank), state

    return optax.GradientTransformation(init, update)


def scale_by_slot(factors: jax.typing.ArrayLike) -> optax.GradientTransformation:
    """Updates of slot ``k`` of every stacked leaf times ``factors[k]``; frozen fields 0.

    ``factors`` is a ``(K,)`` array of finite numbers, one per slot: ``init`` and ``update``
    raise if a stack has another number of slots."""
    factors = _as_per_slot(factors, "factors", "scale_by_slot", nonnegative=False)
    return _scale_by_slot(factors, "factors", "scale_by_slot")


def adam(learning_rates: jax.typing.ArrayLike, *, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-8, weight_decay: float = 0.0) -> Any:
    """Adam (AdamW with ``weight_decay``) with one learning rate per slot of a stack: for
    slot ``k`` exactly ``optax.adamw(learning_rates[k], ...)`` on that adapter alone.

    ``learning_rates`` is a ``(K,)`` array, finite and ≥ 0, one per slot: ``init`` and
    ``update`` raise if a stack has another number of slots."""
    rates = _as_per_slot(learning_rates, "learning rates", "multi.adam", nonnegative=True)
    parts = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)]
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(_scale_by_slot(-rates, "learning rates", "multi.adam"))
    return optax.chain(*parts)
