"""Combining adapters into one (PEFT's ``add_weighted_adapter``).

Follows PEFT 0.21 (``tuners/lora/model.py`` ``add_weighted_adapter``, ``utils/merge_utils.py``),
checked against its outputs in ``tests/data/peft_weighted.npz``. With ``s_i`` each source
adapter's scaling and ``w_i`` its weight, per targeted kernel:

* ``cat``: ``A = [w_i·s_i·A_i]`` side by side along the rank, ``B = [B_i]`` (rank Σ r_i);
* ``svd``: ``ΔW = Σ w_i·s_i·A_i·B_i`` cut to rank ``svd_rank`` by an SVD, all of S on B;
* ``linear``, ``ties``, ``magnitude_prune``, ``dare_linear``, ``dare_ties`` (equal ranks):
  A and B combined separately, with weights ``√|w_i·s_i|·sign(w_i·s_i)`` on A and
  ``√|w_i·s_i|`` on B; ``magnitude_prune`` keeps each factor's top ``density`` fraction of
  entries by magnitude, ``dare_*`` keeps entries with probability ``density`` (rescaled by
  ``1/density``; a JAX ``key``), ``ties``/``dare_ties`` then keep, per entry, only the
  factors agreeing with the majority sign and average them.

The result is a plain LoRA tree with scale 1 (``alpha = r``), as PEFT's new adapter.
Stacked kernels (``nn.scan`` layers) are pruned per layer, as PEFT's per-module tensors.

>>> import jax, jax.numpy as jnp, lora_jax
>>> p = {"w": {"kernel": jnp.ones((4, 3))}}
>>> x, y = (lora_jax.init(p, r=2, key=jax.random.key(i)) for i in range(2))
>>> c = lora_jax.multi.combine({"x": x, "y": y}, [0.5, 0.5], "cat")
>>> c["w"]["kernel"].r
4
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import paths as P
from lora_jax.leaves import LoraWeight, from_leaves, leaves
from lora_jax.multi.stack import is_stacked, require_linear, unstack

METHODS = ("linear", "cat", "svd", "ties", "magnitude_prune", "dare_linear", "dare_ties")
_EQUAL_RANK = ("linear", "ties", "magnitude_prune", "dare_linear", "dare_ties")


def _prune_magnitude(t: jax.Array, density: float, lead: int) -> jax.Array:
    """Keeps the top ``int(density·n)`` |entries| of ``t`` per leading (stack) index."""
    flat = t.reshape(t.shape[:lead] + (-1,))
    k = int(density * flat.shape[-1])
    if k == 0:
        return jnp.zeros_like(t)
    _, idx = jax.lax.top_k(jnp.abs(flat), k)
    mask = jnp.zeros(flat.shape, bool)
    mask = jnp.put_along_axis(mask, idx, True, axis=-1, inplace=False)
    return jnp.where(mask, flat, 0).reshape(t.shape)


def _prune_random(t: jax.Array, density: float, key: jax.Array) -> jax.Array:
    keep = jax.random.bernoulli(key, density, t.shape)
    return jnp.where(keep, t / density, 0).astype(t.dtype)


def _disjoint(ts: jax.Array, weights: jax.Array, method: str) -> jax.Array:
    """TIES: the weighted sum over the factors agreeing with the majority sign, averaged."""
    if method == "total":
        maj = jnp.sign(ts.sum(0))
    else:  # "frequency"
        maj = jnp.sign(jnp.sign(ts).sum(0))
    maj = jnp.where(maj == 0, 1.0, maj)
    agree = jnp.sign(ts) == maj
    w = weights.reshape((-1,) + (1,) * (ts.ndim - 1))
    mixed = jnp.sum(jnp.where(agree, ts * w, 0), axis=0)
    return mixed / jnp.maximum(agree.sum(0), 1).astype(ts.dtype)


def _weighted_sum(weights, ts) -> jax.Array:
    return jnp.sum(jnp.stack([w * t for w, t in zip(weights, ts)]), axis=0)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 6))
def _combine_factor(ts: list, weights: jax.Array, method: str, density, lead: int, keys,
                    sign_method: str) -> jax.Array:
    if method == "linear":
        return _weighted_sum(weights, ts)
    if method in ("ties", "magnitude_prune"):
        ts = [_prune_magnitude(t, density, lead) for t in ts]
    else:  # dare_*
        ts = [_prune_random(t, density, k) for t, k in zip(ts, keys)]
    if method in ("magnitude_prune", "dare_linear"):
        return _weighted_sum(weights, ts)
    return _disjoint(jnp.stack(ts), weights, sign_method)


def combine(adapters: Mapping[str, Any] | Any, weights: Sequence[float], method: str = "svd",
            *, density: float | None = None, svd_rank: int | None = None,
            key: jax.Array | None = None, majority_sign_method: str = "total") -> dict:
    """One adapter from several, as PEFT's ``add_weighted_adapter`` (see the module doc).

    Args:
      adapters: ``{name: LoRA tree}`` (in the order of ``weights``), or a stack.
      weights: one finite number per adapter.
      method: one of :data:`METHODS`.
      density: fraction kept, in ``(0, 1]`` (``ties``, ``magnitude_prune``, ``dare_*``).
      svd_rank: the result's rank for ``svd``, a positive int (default: the largest source
        rank).
      key: PRNG key for ``dare_*``.
      majority_sign_method: ``"total"`` or ``"frequency"`` (``ties``, ``dare_ties``).

    Returns:
      A LoRA tree of :class:`lora_jax.LoraWeight` with scale 1.

    Raises:
      ValueError: an unknown method, unequal ranks where equal ones are needed (naming the
        path and ranks), a missing density/key, a weight that is not finite, a weight count
        that is not the adapter count, ``svd_rank`` < 1 or ``density`` outside ``(0, 1]``,
        or adapters of different layouts.
      TypeError: a weight, ``svd_rank`` or ``density`` that is not a number of its kind.
    """
    if method not in METHODS:
        raise ValueError(f"combine: method must be one of {METHODS}, got {method!r}")
    if _is_stack(adapters):
        adapters = unstack(adapters)
    names = list(adapters)
    weights = _weights(weights, names)
    if svd_rank is not None and (isinstance(svd_rank, (bool, np.bool_))
                                 or not isinstance(svd_rank, (int, np.integer))):
        raise TypeError(f"combine: svd_rank must be a positive int, got {svd_rank!r} "
                        f"({type(svd_rank).__name__})")
    if svd_rank is not None and svd_rank < 1:
        raise ValueError(f"combine: svd_rank must be a positive int, got {svd_rank}")
    if density is not None and (isinstance(density, (bool, np.bool_))
                                or not isinstance(density, (int, float, np.integer, np.floating))):
        raise TypeError(f"combine: density must be a number in (0, 1], got {density!r}")
    if density is not None and not 0.0 < density <= 1.0:  # NaN fails too
        raise ValueError(f"combine: density must be in (0, 1], got {density!r}")
    if method in ("ties", "magnitude_prune", "dare_linear", "dare_ties") and density is None:
        raise ValueError(f"combine: method {method!r} needs density in (0, 1], got {density!r}")
    if method.startswith("dare") and key is None:
        raise ValueError(f"combine: method {method!r} needs key= (a jax.random key)")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"combine: majority_sign_method must be 'total' or 'frequency', got "
                         f"{majority_sign_method!r}")
    per = {n: leaves(adapters[n]) for n in names}
    paths = list(dict.fromkeys(p for m in per.values() for p in m))
    out = {}
    for path in paths:
        idx = [i for i, n in enumerate(names) if path in per[n]]
        src = [per[names[i]][path] for i in idx]
        w = [float(weights[i]) for i in idx]
        first = src[0]
        meta = (first.in_axes, first.stack_axes, first.layout, first.kernel_shape)
        for i, leaf in zip(idx, src):
            require_linear(leaf, names[i], path, "combine")
            if (leaf.in_axes, leaf.stack_axes, leaf.layout, leaf.kernel_shape) != meta:
                raise ValueError(f"combine: {names[i]!r} at {path!r} has another layout or "
                                 "kernel shape than the first adapter there")
        sa = first.stack_axes
        fac = [leaf.factors() for leaf in src]
        ranks = [a.shape[-1] for a, _ in fac]
        if method in _EQUAL_RANK and len(set(ranks)) > 1:
            raise ValueError(
                f"combine: method {method!r} needs adapters of equal rank; at {path!r} "
                f"{dict(zip([names[i] for i in idx], ranks))} (use 'cat' or 'svd')")
        ws = [wi * float(leaf.scale) for wi, leaf in zip(w, src)]
        if method == "cat":
            a = jnp.concatenate([x * a_ for x, (a_, _) in zip(ws, fac)], axis=-1)
            b = jnp.concatenate([b_ for _, b_ in fac], axis=sa)
        elif method == "svd":
            a, b = _svd(fac, ws, sa, svd_rank or max(ranks), path)
        else:
            wa = jnp.asarray([math.sqrt(abs(x)) * math.copysign(1.0, x) for x in ws])
            wb = jnp.asarray([math.sqrt(abs(x)) for x in ws])
            keys = [None] * (2 * len(fac))
            if key is not None:
                keys = list(jax.random.split(P.path_key(key, path), 2 * len(fac)))
            a = _combine_factor([a_ for a_, _ in fac], wa, method, density, sa,
                                keys[: len(fac)], majority_sign_method)
            b = _combine_factor([b_ for _, b_ in fac], wb, method, density, sa,
                                keys[len(fac):], majority_sign_method)
        r = a.shape[-1]
        out[path] = LoraWeight(a=a, b=b, alpha=float(r), in_axes=first.in_axes,
                               stack_axes=sa, dropout=first.dropout, roles=first.layout)
    return from_leaves(out)


def _weights(weights, names: list[str]) -> list[float]:
    """``weights`` as floats, one per adapter, each finite (naming the adapter otherwise)."""
    if isinstance(weights, (str, bytes, Mapping)) or np.ndim(weights) != 1:
        raise TypeError(f"combine: weights must be a sequence of numbers, one per adapter "
                        f"{names}, got {weights!r}")
    if len(weights) != len(names):
        raise ValueError(f"combine: {len(weights)} weights for {len(names)} adapters {names}")
    out = []
    for name, w in zip(names, weights):
        if isinstance(w, (bool, np.bool_)) or not (
                isinstance(w, (int, float, np.integer, np.floating))
                or (isinstance(w, (jax.Array, np.ndarray)) and np.ndim(w) == 0
                    and not isinstance(w, jax.core.Tracer))):
            raise TypeError(f"combine: the weight of adapter {name!r} is {w!r}, not a number")
        w = float(w)
        if not math.isfinite(w):
            raise ValueError(f"combine: the weight of adapter {name!r} is {w}; weights must "
                             "be finite")
        out.append(w)
    return out


def _is_stack(tree) -> bool:
    return any(is_stacked(x) for x in leaves(tree).values())


def _svd(fac, ws, sa: int, k: int, path: str):
    """Rank-``k`` SVD of ``Σ w_i·A_i·B_i`` (per stack index), S folded into B."""
    a0, b0 = fac[0]
    stack_shape, in_shape = a0.shape[:sa], a0.shape[sa:-1]
    out_shape = b0.shape[sa + 1:]
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    if not 1 <= k <= min(n_in, n_out):
        raise ValueError(f"combine: svd_rank {k} at {path!r} must be in 1..{min(n_in, n_out)}")
    dw = sum(w * jnp.matmul(a.reshape(stack_shape + (n_in, a.shape[-1])),
                            b.reshape(stack_shape + (b.shape[sa], n_out)))
             for w, (a, b) in zip(ws, fac))
    # PEFT factors ΔW as (out, in) = U·S·Vh; in the (in, out) layout that is Vhᵀ·S·Uᵀ.
    u, s, vh = jnp.linalg.svd(jnp.swapaxes(dw, -1, -2), full_matrices=False)
    a = jnp.swapaxes(vh[..., :k, :], -1, -2).reshape(stack_shape + in_shape + (k,))
    b = jnp.swapaxes(u[..., :, :k] * s[..., None, :k], -1, -2).reshape(
        stack_shape + (k,) + out_shape)
    return a, b
