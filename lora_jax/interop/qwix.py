"""qwix's LoRA parameters: :func:`to_qwix` and :func:`from_qwix`.

qwix (``qwix.LoraProvider``, ``qwix.apply_lora_to_model``) stores a LoRA adapter as two params
beside the weight it adapts, in the same module: ``<name>_lora_a`` and ``<name>_lora_b``
(``kernel_lora_a``, ``kernel_lora_b``). For a weight used by ``dot_general`` (``nn.Dense``,
``nn.DenseGeneral``) ``lora_a`` is ``(*batch, prod(contracting), r)`` and ``lora_b``
``(*batch, r, prod(rest))``; for one used by ``einsum`` the axes are kept,
``(*contracting, r)`` and ``(r, *rest)``. The update is scaled by the rule's
``alpha / rank``; the scale is not stored in the params.

lora_jax's :class:`~lora_jax.LoraWeight` holds ``A (*stack, *in, r)``, ``B (*stack, r, *out)``
and its own scale, so the conversion is a reshape plus the scale: :func:`to_qwix` folds
``leaf.scale / (alpha / r)`` into ``lora_b``; :func:`from_qwix` needs the rules' ``alpha``.

Nothing here imports qwix: the functions move arrays between trees.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax import layouts, paths
from lora_jax import leaves as lora_leaves
from lora_jax.leaves import LoraWeight

PyTree = Any
SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"


def _nest(items: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, x in items.items():
        node = tree
        *keys, last = path.split("/")
        for k in keys:
            node = node.setdefault(k, {})
        node[last] = x
    return tree


def to_qwix(lora: PyTree, params: PyTree, *, alpha: float | None = None,
            like: PyTree | None = None) -> dict:
    """``params`` with qwix's ``<name>_lora_a``/``<name>_lora_b`` beside each adapted weight.

    Run the result through the model wrapped by ``qwix.apply_lora_to_model(model,
    qwix.LoraProvider(rank=leaf.r, alpha=alpha, ...))``: its output equals
    ``lora_jax.apply(model.apply)(params, lora, ...)``.

    Args:
      lora: a LoRA tree of :class:`lora_jax.LoraWeight` leaves for ``params``.
      params: the base variables (``{"params": ...}``), dense.
      alpha: the qwix rules' ``alpha``; default: each adapter's own alpha. Where an adapter's
        scale is not ``alpha / r`` (another alpha, rsLoRA) the ratio is folded into
        ``lora_b``.
      like: qwix's own variables (from ``qwix_model.init``) to take the LoRA shapes from
        (needed where qwix keeps the axes: weights used by ``einsum``); default: the
        ``dot_general`` shapes ``(*stack, prod(in), r)`` and ``(*stack, r, prod(out))``.

    Raises:
      TypeError: an adapter kind other than LoRA. ValueError: a kernel layout other than
      ``(*stack, *in, *out)``, a name that is already taken, a ``like`` entry of another size
      or rank, an adapted path missing from ``params``.
    """
    flat = dict(paths.flatten(params))
    template = dict(paths.flatten(like)) if like is not None else {}
    for p, leaf in lora_leaves.leaves(lora).items():
        if type(leaf) is not LoraWeight:
            raise TypeError(f"to_qwix: {p!r} is a {leaf.kind} adapter; qwix's LoRA is plain LoRA")
        if p not in flat:
            raise ValueError(f"to_qwix: {p!r} has an adapter but no weight in params")
        canonical = layouts.canonical(len(leaf.layout), leaf.in_axes, leaf.stack_axes)
        if leaf.layout != canonical:
            raise ValueError(f"to_qwix: {p!r} has layout {leaf.layout!r}; qwix's shapes are "
                             f"derived here for {canonical!r} kernels only")
        a, b = leaf.factors()
        r, stack = leaf.r, leaf.stack_shape
        fold = float(leaf.scale) / ((float(leaf.alpha) if alpha is None else float(alpha)) / r)
        if fold != 1.0:
            b = b * fold
        a = a.reshape(stack + (math.prod(leaf.in_shape), r))
        b = b.reshape(stack + (r, math.prod(leaf.out_shape)))
        for suffix, x in ((SUFFIX_A, a), (SUFFIX_B, b)):
            name = p + suffix
            if name in flat:
                raise ValueError(f"to_qwix: params already hold {name!r}")
            if name in template:
                want = tuple(template[name].shape)
                if math.prod(want) != x.size or (want[-1] if suffix == SUFFIX_A
                                                 else want[len(stack)]) != r:
                    raise ValueError(f"to_qwix: like[{name!r}] has shape {want}, which does not "
                                     f"hold a rank-{r} factor of {x.shape}")
                x = x.reshape(want)
            flat[name] = x
    return _nest(flat)


def _alpha_for(alpha: float | Mapping[str, float], path: str) -> float:
    if not isinstance(alpha, Mapping):
        return float(alpha)
    for pattern, value in alpha.items():
        if re.fullmatch(pattern, path):
            return float(value)
    raise ValueError(f"from_qwix: no alpha pattern matches {path!r}; patterns: {list(alpha)}")


def _split_axes(kernel: tuple[int, ...], a: tuple[int, ...], b: tuple[int, ...],
                stack_axes: int, path: str) -> int:
    """The number of input axes of ``kernel`` whose sizes the factors ``a``, ``b`` flatten."""
    body = kernel[stack_axes:]
    fits = [k for k in range(1, len(body))
            if math.prod(body[:k]) == math.prod(a[stack_axes:-1])
            and math.prod(body[k:]) == math.prod(b[stack_axes + 1:])]
    if not fits:
        raise ValueError(f"from_qwix: {path!r}: lora_a {a} and lora_b {b} do not fit the kernel "
                         f"{kernel} as (*stack, *in, *out) with {stack_axes} stack axes")
    if len(fits) > 1:
        raise ValueError(f"from_qwix: {path!r}: the kernel {kernel} splits into input and output "
                         f"axes in several ways ({fits} input axes); pass in_axes")
    return fits[0]


def from_qwix(params_with_lora: PyTree, *, alpha: float | Mapping[str, float],
              in_axes: int | Mapping[str, int] | None = None,
              stack_axes: int | Mapping[str, int] | None = None) -> tuple[dict, dict]:
    """Splits qwix's variables into ``(params, lora)``: the base without the LoRA params and a
    LoRA tree of :class:`lora_jax.LoraWeight` (scale ``alpha / r``, as qwix's).

    Args:
      params_with_lora: qwix's variables (``{"params": {..., "kernel_lora_a": ...}}``).
      alpha: the ``LoraProvider`` rules' alpha: one number, or ``{regex: alpha}`` matched
        (``re.fullmatch``) against the adapted weight's path, the first match winning.
      in_axes: input axes of each kernel (an int, or ``{regex: int}``); default: the split
        the factor shapes allow (an error where several do).
      stack_axes: leading stack axes (``nn.scan``), an int or ``{regex: int}``; default 0.

    Raises:
      ValueError: a ``_lora_a`` without its ``_lora_b`` or the reverse, factors whose
        rank differs, factors without the weight they adapt, shapes that do not fit the
        weight, a path no ``alpha`` pattern matches. Each message names the path.
    """
    flat = dict(paths.flatten(params_with_lora))
    base = {p: x for p, x in flat.items() if not p.endswith((SUFFIX_A, SUFFIX_B))}
    items: dict[str, LoraWeight] = {}
    for p in flat:
        for suffix, other in ((SUFFIX_A, SUFFIX_B), (SUFFIX_B, SUFFIX_A)):
            if p.endswith(suffix) and p[: -len(suffix)] + other not in flat:
                raise ValueError(f"from_qwix: {p!r} has no matching "
                                 f"{p[: -len(suffix)] + other!r}")
        if not p.endswith(SUFFIX_A):
            continue
        w = p[: -len(SUFFIX_A)]
        if w not in base:
            raise ValueError(f"from_qwix: {p!r} adapts {w!r}, which the params lack")
        a, b = np.shape(flat[p]), np.shape(flat[w + SUFFIX_B])
        sa = int(paths.setting_for(stack_axes, w, None, 0))
        if len(a) < sa + 2 or len(b) < sa + 2 or a[-1] != b[sa] or a[:sa] != b[:sa]:
            raise ValueError(f"from_qwix: {p!r} has shape {a} and {w + SUFFIX_B!r} {b}; "
                             f"expected (*stack, *in, r) and (*stack, r, *out) with the same "
                             f"r and {sa} stack axes")
        kernel = tuple(np.shape(base[w]))
        ia = paths.setting_for(in_axes, w, None, None)
        ia = _split_axes(kernel, a, b, sa, w) if ia is None else int(ia)
        in_shape, out_shape = kernel[sa: sa + ia], kernel[sa + ia:]
        if (math.prod(in_shape) != math.prod(a[sa:-1])
                or math.prod(out_shape) != math.prod(b[sa + 1:])):
            raise ValueError(f"from_qwix: {p!r} {a} and {w + SUFFIX_B!r} {b} do not fit "
                             f"{w!r} {kernel} with {ia} input axes")
        r = a[-1]
        items[w] = LoraWeight(
            a=jnp.reshape(flat[p], kernel[:sa] + in_shape + (r,)),
            b=jnp.reshape(flat[w + SUFFIX_B], kernel[:sa] + (r,) + out_shape),
            alpha=_alpha_for(alpha, w), in_axes=ia, stack_axes=sa)
    return _nest(base), lora_leaves.from_leaves(items)
