"""Cutting a trained AdaLoRA tree to its surviving ranks: :func:`finalize`."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax import lora as L
from lora_jax.adalora.allocator import AllocatorState, check_state
from lora_jax.adalora.leaf import flatten

PyTree = Any


def finalize(lora: PyTree, state: AllocatorState) -> tuple[dict, dict[str, int]]:
    """Cuts every module to its surviving rank: a plain LoRA tree and the rank pattern.

    E (masked) is folded into ``a = P * E``, ``b = Q``, with ``alpha = scale * r`` so that the
    LoraWeight scale ``alpha / r`` equals the AdaLoRA scale: ``lora_jax.merge(base, final)``
    equals ``lora_jax.merge(base, apply_mask(lora, state))``. A module pruned to rank 0 is left
    out of the tree and reported with rank 0. For stacked leaves the rank is the largest over
    the slices; slices with fewer survivors get zero columns. Not jittable (shapes depend on
    the mask).

    Returns:
      ``(tree of lora_jax.LoraWeight, {path: rank})``.

    >>> import jax, jax.numpy as jnp
    >>> from lora_jax import adalora
    >>> lora = adalora.init({"kernel": jnp.ones((4, 4))}, init_r=3, target_r=1,
    ...                     key=jax.random.key(0))
    >>> state = adalora.Allocator(total_steps=4).init(lora)
    >>> state = state._replace(mask={"kernel": jnp.array([True, False, True])})
    >>> final, ranks = adalora.finalize(lora, state)
    >>> final["kernel"].a.shape, ranks
    ((4, 2), {'kernel': 2})
    """
    paths, ws, tdef = flatten(lora)
    check_state(paths, ws, state, "adalora.finalize")
    masks = tdef.flatten_up_to(state.mask)
    out, ranks = {}, {}
    for path, w, m in zip(paths, ws, masks):
        m = np.asarray(m, bool)
        rank = int(m.sum(-1).max(initial=0)) if m.size else 0
        ranks[path] = rank
        if rank == 0:
            continue
        sa, nin, nout = w.stack_axes, len(w.in_shape), len(w.out_shape)
        # Survivors first (stable), then pruned ones whose folded columns are zero. On the host
        # (numpy): a one-off export, so no compilation per module shape.
        idx = np.argsort(~m, axis=-1, kind="stable")[..., :rank]
        p, e, q = (np.asarray(x) for x in (w.p, w.e, w.q))
        pe = p * np.where(m, e, 0).astype(p.dtype).reshape(m.shape[:-1] + (1,) * nin + m.shape[-1:])
        a = np.take_along_axis(pe, idx.reshape(idx.shape[:-1] + (1,) * nin + (rank,)), axis=-1)
        b = np.take_along_axis(q, idx.reshape(idx.shape + (1,) * nout), axis=sa)
        out[path] = L.LoraWeight(a=jnp.asarray(a), b=jnp.asarray(b), alpha=w.scale * rank,
                                 in_axes=w.in_axes, stack_axes=sa, dropout=w.dropout,
                                 roles=w.roles)
    return L.from_leaves(out), ranks
