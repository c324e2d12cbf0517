"""Spec plumbing shared by the sharding files: canonical specs, spec maps, padded entries.

A *spec map* is ``{path: PartitionSpec}``, read from a spec tree or a flat dict; *entries* are
a spec's per-axis entries padded with ``None`` to an array's rank.
"""

from __future__ import annotations

from typing import Any

from jax.sharding import NamedSharding, PartitionSpec

from lora_jax import paths as P
from lora_jax import protocols


def is_spec(x: Any) -> bool:
    """True for a ``PartitionSpec``."""
    return isinstance(x, PartitionSpec)


def canonical(entries) -> PartitionSpec:
    """A PartitionSpec without trailing ``None`` s (the canonical form)."""
    entries = list(entries)
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def spec_map(base_specs) -> dict[str, PartitionSpec]:
    """``{path: PartitionSpec}`` from a spec tree or a flat ``{path: spec}`` dict."""
    if base_specs is None:
        return {}

    def leaf(x):
        return x is None or is_spec(x) or isinstance(x, NamedSharding) or protocols.is_base_leaf(x)

    out = {}
    for path, s in P.flatten(base_specs, is_leaf=leaf):
        if isinstance(s, NamedSharding):
            s = s.spec
        elif s is None:
            s = PartitionSpec()
        elif protocols.is_base_leaf(s):
            raise ValueError(f"base_specs[{path!r}] is a {type(s).__name__} of specs (storage "
                             "specs); pass one PartitionSpec for the parameter's logical shape")
        elif not is_spec(s):
            raise TypeError(f"base_specs[{path!r}] is a {type(s).__name__}, expected a "
                            "PartitionSpec")
        out[path] = s
    return out


def padded_entries(spec: PartitionSpec, ndim: int, where: str) -> tuple:
    """The entries of ``spec``, padded with ``None`` to ``ndim`` (an error if longer)."""
    out = tuple(spec)
    if len(out) > ndim:
        raise ValueError(f"{where}: spec {spec} has {len(out)} entries for an array of "
                         f"rank {ndim}")
    return out + (None,) * (ndim - len(out))
