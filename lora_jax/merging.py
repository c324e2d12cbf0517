"""Folding adapters into their kernels and back: ``check_fits``, ``merge``, ``unmerge``.

>>> import jax, jax.numpy as jnp
>>> from lora_jax.leaves import LoraWeight
>>> base = {"w": {"kernel": jnp.zeros((4, 3))}}
>>> lora = {"w": {"kernel": LoraWeight(a=jnp.ones((4, 1)), b=jnp.ones((1, 3)))}}
>>> merged = merge(base, lora)
>>> merged["w"]["kernel"].sum().item(), unmerge(merged, lora)["w"]["kernel"].sum().item()
(12.0, 0.0)
"""

from __future__ import annotations

import difflib
from typing import Any

import jax.numpy as jnp

from lora_jax import paths as P
from lora_jax import protocols
from lora_jax import validation as V
from lora_jax.leaves import leaves

PyTree = Any


def check_fits(base: PyTree, lora: PyTree, *, where: str = "check_fits") -> dict[str, Any]:
    """Checks that ``lora`` fits ``base``; returns ``{path: base leaf}`` of the targets.

    Raises:
      ValueError: a LoRA path missing from the base, or a factor shape that does not fit
        the kernel.
    """
    V.params_tree(base, where, "the base tree")
    base_flat = dict(P.flatten(base))
    out = {}
    for path, leaf in leaves(lora).items():
        V.adapter_leaf(path, leaf, where)
        if path not in base_flat:
            # The base paths most like it, compared by path component (a module renamed or
            # dropped from the path is one component off), so that the culprit is shown.
            parts = path.split("/")
            near = sorted((p for p in base_flat if p.rsplit("/", 1)[-1] == parts[-1]),
                          key=lambda p: -difflib.SequenceMatcher(None, parts, p.split("/")).ratio())
            raise ValueError(
                f"LoRA tree has {path!r}, which the base tree lacks"
                + (f"; base has e.g. {near[:3]}" if near else "")
            )
        w = base_flat[path]
        wshape = tuple(getattr(w, "shape", ()))
        if wshape != leaf.kernel_shape:
            raise ValueError(
                f"LoRA factors at {path!r} fit a kernel of shape {leaf.kernel_shape} "
                f"(a {tuple(leaf.factors()[0].shape)}, b {tuple(leaf.factors()[1].shape)}), "
                f"but the base kernel has shape {wshape}"
            )
        out[path] = w
    return out


def merge(base: PyTree, lora: PyTree, *, dtype=None, requantize: bool = False,
          int_rounding: str | None = None):
    """``base`` with every targeted kernel replaced by ``kernel + scale * A @ B`` (the leaf
    kind's ``merged``: DoRA rescales it per output unit).

    Quantized base leaves are dequantized (to ``dtype``, default their original dtype);
    merged kernels keep the base dtype unless ``dtype`` is given.

    Args:
      base: the base tree (dense, or with quantized leaves).
      lora: a LoRA tree fitting ``base``.
      dtype: output dtype of merged and dequantized leaves.
      requantize: quantize each merged, quantized target again in its own format. Merging
        a small update into 4-bit weights loses much of it (the update is often below the
        quantization step): the added error is measured and returned, not hidden.
      int_rounding: how a merged kernel goes back to an integer dtype (an int8 kernel, or
        an integer ``dtype``): ``None`` (default) refuses, since a cast would silently truncate
        the update; ``"nearest"`` rounds half to even and clips to the dtype's range.

    Returns:
      The merged tree; with ``requantize=True``, ``(quantized tree, errors)`` where
      ``errors[path]`` has ``"weight_rel_error"`` (``|Q(W) - W| / |W|`` for the merged W) and
      ``"update_rel_error"`` (how much of the LoRA update is lost: ``|(Q(W) - W0) - ΔW| /
      |ΔW|`` with ``W0`` the dequantized base).

    Raises:
      ValueError: ``lora`` does not fit ``base`` (a missing path, a shape), or a leaf whose
        factors do not chain. TypeError: an integer kernel or ``dtype`` without
        ``int_rounding``, a bool kernel, a base holding adapter leaves.

    >>> import jax, jax.numpy as jnp, lora_jax
    >>> p = {"kernel": jnp.ones((4, 3))}
    >>> lora = lora_jax.init(p, r=2, key=jax.random.key(0))
    >>> bool(jnp.allclose(lora_jax.merge(p, lora)["kernel"], 1.0))   # B = 0 at init
    True
    """
    targets = check_fits(base, lora, where="merge")
    V.merge_dtypes(targets, dtype, int_rounding, "merge")
    lmap = leaves(lora)
    errors: dict[str, dict[str, float]] = {}

    def f(path, w):
        if path in targets:
            wd = protocols.dense(w)
            merged = lmap[path].merged(wd)
            delta = merged - wd.astype(merged.dtype)
            if requantize and protocols.is_base_leaf(w):
                q = w.requantize(merged, path=path)
                qd = q.dequantize(jnp.float32)
                nrm = lambda v: float(jnp.linalg.norm(v))  # noqa: E731
                errors[path] = {
                    "weight_rel_error": nrm(qd - merged) / max(nrm(merged), 1e-30),
                    "update_rel_error": nrm(qd - wd.astype(jnp.float32) - delta)
                    / max(nrm(delta), 1e-30),
                }
                return q
            return V.cast_merged(merged, dtype or wd.dtype, int_rounding)
        if protocols.is_base_leaf(w):
            return w if requantize else V.dense_as(w, dtype, int_rounding)
        return w

    out = P.map_with_path(f, base)
    return (out, errors) if requantize else out


def unmerge(merged: PyTree, lora: PyTree, *, int_rounding: str | None = None) -> PyTree:
    """Inverse of :func:`merge`: ``kernel - scale * A @ B`` at every targeted path.

    Also gives PiSSA's residual base: ``base = unmerge(params, init(params, init="pissa"))``.
    ``int_rounding`` is as in :func:`merge` (integer kernels are refused without it).
    """
    targets = check_fits(merged, lora, where="unmerge")
    V.merge_dtypes(targets, None, int_rounding, "unmerge")
    lmap = leaves(lora)

    def f(path, w):
        if path in targets:
            wd = protocols.dense(w)
            return V.cast_merged(lmap[path].unmerged(wd), wd.dtype, int_rounding)
        return w

    return P.map_with_path(f, merged)
