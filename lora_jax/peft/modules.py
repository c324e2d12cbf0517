"""Module planning: the PEFT modules of each adaptable Flax parameter.

A :class:`Target` is one adaptable parameter (a ``kernel`` or ``embedding`` of >= 2 axes that
the name map names) with the torch layer it becomes (Linear, Conv, Embedding), its input axes,
its stack axes (one module per layer of an ``nn.scan`` stack) and its modules, each with its
slice of the output axis when one fused kernel holds several modules (qkv).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from lora_jax import paths
from lora_jax.peft.names import (
    NAME_MAPS,
    PLACEHOLDERS,
    NameMap,
    Part,
    map_parts,
    resolve,
    stack_axes_of,
)

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Target:
    """One adaptable Flax parameter and the torch modules it becomes."""

    path: str
    layer: str  # "linear", "conv", "embedding" or "conv_transpose"
    in_axes: int
    stack_shape: tuple[int, ...]
    core: tuple[int, ...]  # kernel shape without stack axes
    modules: tuple[tuple[tuple[int, ...], str, slice | None], ...]  # (stack index, name, slice)

    @property
    def n_in(self) -> int:
        return math.prod(self.core[: self.in_axes])

    @property
    def n_out(self) -> int:
        return math.prod(self.core[self.in_axes:])


def _layer_kind(path: str, core_ndim: int, in_axes: int) -> str:
    """The torch layer of a parameter: from its leaf and module names, and its axes."""
    parts = path.split("/")
    if parts[-1] == "embedding":
        return "embedding"
    module = parts[-2].lower() if len(parts) > 1 else ""
    if "conv" in module and "transpose" in module:
        return "conv_transpose"  # neither PEFT nor this module handles these
    if "conv" in module and core_ndim >= 3 and in_axes == core_ndim - 1:
        return "conv"
    return "linear"


def tile(parts: list[Part], out_size: int, path: str) -> Sequence[tuple[str, slice | None]]:
    """Validates fused slices (they must tile the output axis); sorted by start."""
    if len(parts) == 1 and parts[0].out is None:
        return [(parts[0].template, None)]
    res = []
    for p in parts:
        if p.out is None:
            raise ValueError(f"fused name_map entry for {path!r}: every part needs a slice")
        start, stop, step = p.out.indices(out_size)
        if step != 1 or stop <= start:
            raise ValueError(f"fused name_map entry for {path!r}: bad slice {p.out} of {out_size}")
        res.append((p.template, slice(start, stop)))
    res.sort(key=lambda t: t[1].start)
    edges = [0] + [s.stop for _, s in res]
    if any(s.start != e for (_, s), e in zip(res, edges)) or edges[-1] != out_size:
        raise ValueError(f"fused name_map entry for {path!r}: slices {[s for _, s in res]} do "
                         f"not tile the flattened output axis of size {out_size}")
    return res


def target(path, shape, in_axes, parts, stack_axes=None) -> Target:
    """The :class:`Target` of a parameter of ``shape`` with the map's ``parts``;
    ``in_axes``/``stack_axes`` default to Flax's conventions and the placeholders."""
    sa = stack_axes_of(parts, path)
    if stack_axes is not None and stack_axes != sa:
        raise ValueError(f"{path!r} has {stack_axes} stack axes but its module name "
                         f"{parts[0].template!r} has {sa} placeholders ({{i}}, {{j}}, {{k}})")
    stack, core = tuple(shape[:sa]), tuple(shape[sa:])
    if in_axes is None:
        in_axes = paths.default_in_axes(path, shape, sa)
    layer = _layer_kind(path, len(core), in_axes)
    n_out = math.prod(core[in_axes:])
    tiles = tile(parts, n_out, path)
    if layer != "linear" and tiles[0][1] is not None:
        raise NotImplementedError(f"{path!r}: fused (sliced) name_map entries are supported for "
                                  f"Linear kernels only, not {layer}")
    mods = []
    for idx in np.ndindex(*stack):
        fmt = dict(zip(PLACEHOLDERS, idx))
        mods += [(tuple(idx), t.format(**fmt), s) for t, s in tiles]
    return Target(path, layer, in_axes, stack, core, tuple(mods))


def supported(t: Target) -> Target:
    """``t``, or NotImplementedError for a layer PEFT has no LoRA for."""
    if t.layer == "conv_transpose":
        raise NotImplementedError(f"{t.path!r}: transposed convolutions are not supported (PEFT "
                                  "has no LoRA layer for them)")
    return t


def targets_of(params, name_map, in_axes=None, stack_axes=None) -> dict[str, Target]:
    """``{path: Target}`` of every adaptable parameter (a ``kernel`` or ``embedding`` of
    >= 2 axes) that the name map names."""
    fn = resolve(name_map)
    out = {}
    for path, x in paths.flatten(params):
        shape = tuple(getattr(x, "shape", ()))
        if path.rsplit("/", 1)[-1] not in ("kernel", "embedding") or len(shape) < 2:
            continue
        parts = map_parts(fn, path)
        if parts is None:
            continue
        sa = paths.setting_for(stack_axes, path, None, None)
        out[path] = target(path, shape, paths.setting_for(in_axes, path, None, None), parts, sa)
    return out


def module_names(params: PyTree, *, name_map: NameMap = None) -> dict[str, list[str]]:
    """``{Flax kernel path: [torch module names]}`` of every adaptable parameter, to check a map.

    >>> import jax.numpy as jnp
    >>> module_names({"params": {"fc1": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}})
    {'params/fc1/kernel': ['fc1']}
    """
    return {t.path: [m[1] for m in t.modules] for t in targets_of(params, name_map).values()}


def suggest_map(modules: Sequence[str], params: PyTree, current: NameMap) -> str:
    """A built-in name map under which ``params`` has all of ``modules``, as a hint."""
    for name, m in NAME_MAPS.items():
        if m is current or name == current:
            continue
        try:
            known = {mod for t in targets_of(params, name).values() for _, mod, _ in t.modules}
        except (ValueError, TypeError, NotImplementedError):
            continue
        if set(modules) <= known:
            return f"; these are the names of name_map={name!r}: pass it"
    return ""
