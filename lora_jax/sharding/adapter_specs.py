"""Adapter specs: :func:`specs` for a LoRA/AdaLoRA tree, :func:`state_specs` for state trees.

An adapter array shards like the kernel axes it spans: ``A (*stack, *in, r)`` like the
kernel's input axes, ``B (*stack, r, *out)`` like its output axes, the rank axis replicated.
Which axes each array field spans is the leaf kind's ``field_roles``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec

from lora_jax import layouts as Lay
from lora_jax import lora as L
from lora_jax import paths as P
from lora_jax.sharding.placement import check_divides
from lora_jax.sharding.plumbing import canonical, is_spec, padded_entries, spec_map

PyTree = Any
POLICIES = ("inherit", "replicate")


def specs(
    lora: PyTree,
    base_specs: PyTree | Mapping[str, PartitionSpec] | None,
    *,
    policy: str = "inherit",
    mesh: Mesh | None = None,
) -> PyTree:
    """PartitionSpecs for a LoRA or AdaLoRA tree, derived from the base's specs.

    Args:
      lora: a LoRA/AdaLoRA tree (arrays or ``jax.ShapeDtypeStruct``).
      base_specs: one ``PartitionSpec`` (or ``NamedSharding``, or ``None`` for replicated) per
        base parameter for its logical shape: a tree shaped like the base params, or a flat
        ``{path: spec}`` dict. Only the adapted parameters are read. Ignored for
        ``policy="replicate"``.
      policy: ``"inherit"``: ``A``/``P`` shard like the kernel's input axes, ``B``/``Q`` like
        its output axes, AdaLoRA's ``E`` and every rank axis replicated, stacked-layer axes like
        the kernel's; ``"replicate"``: every adapter array on every device (adapters are small;
        the merge then needs no communication, but every device holds the whole adapter).
      mesh: if given, checks that the named mesh axes exist and divide the sharded dims.

    Returns:
      A tree with ``lora``'s structure whose adapter leaves hold ``PartitionSpec`` s in place
      of arrays (``leaf.replace(a=spec_a, b=spec_b)``); feed it to :func:`named`.

    Raises:
      ValueError: unknown policy; a target missing from ``base_specs``; a spec longer than the
        kernel's rank; a mesh axis that is absent or does not divide a dim.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    flat = {} if policy == "replicate" else spec_map(base_specs)

    def leaf_specs(path, leaf):
        if policy == "replicate":
            kernel = (None,) * len(leaf.kernel_shape)
        elif path not in flat:
            raise ValueError(f"base_specs has no entry for the adapted parameter {path!r}; "
                             f"it has e.g. {sorted(flat)[:4]}")
        else:
            kernel = padded_entries(flat[path], len(leaf.kernel_shape),
                                    f"base_specs[{path!r}]")
        out = _leaf_specs(leaf, kernel, path)
        if mesh is not None:
            for name, s in array_fields(out).items():
                check_divides(mesh, s, getattr(leaf, name).shape, f"{path}/{name}")
        return out

    def f(kp, x):
        if x is None:
            return None
        if not L.is_lowrank(x):
            raise TypeError(f"LoRA tree entry {P.path_str(kp)!r} is a {type(x).__name__}, "
                            "expected an adapter leaf")
        return leaf_specs(P.path_str(kp), x)

    return jax.tree_util.tree_map_with_path(f, lora, is_leaf=L.is_lowrank)


def array_fields(leaf) -> dict[str, Any]:
    """``{name: value}`` of a struct-dataclass leaf's pytree (array) fields."""
    return {f.name: getattr(leaf, f.name) for f in dataclasses.fields(leaf)
            if f.metadata.get("pytree_node", True)}


def _roles(leaf) -> dict[str, str]:
    """Which kernel axes each array field follows: "in" (*stack, *in, r), "out" (*stack, r,
    *out), "rank" (*stack, r), "unit" (*stack, *out); the leaf kind's ``field_roles``."""
    roles = getattr(leaf, "field_roles", None)
    if not roles:
        raise TypeError(f"no sharding roles known for adapter kind {type(leaf).__name__}; give "
                        "the class a `field_roles = {field: 'in'|'out'|'rank'}` attribute")
    return roles


def _leaf_specs(leaf, kernel: tuple, path: str):
    sa, ia = leaf.stack_axes, leaf.in_axes
    stack, k_in, k_out = Lay.split(leaf.layout, kernel)
    by_role = {"in": stack + k_in + (None,), "out": stack + (None,) + k_out,
               "rank": stack + (None,), "unit": stack + k_out}
    roles = _roles(leaf)
    out = {}
    for name, arr in array_fields(leaf).items():
        if arr is None:
            continue
        role = roles.get(name)
        want = by_role[role] if role else stack + (None,) * (len(arr.shape) - sa)
        if len(want) != len(arr.shape):
            raise ValueError(f"{path}/{name}: shape {tuple(arr.shape)} does not fit the kernel "
                             f"{leaf.kernel_shape} (roles {leaf.layout!r}, stack_axes={sa}, "
                             f"in_axes={ia})")
        out[name] = canonical(want)
    return leaf.replace(**out)


def state_specs(state: PyTree, lora_specs: PyTree) -> PyTree:
    """Specs for a tree that holds copies of the adapter arrays (optimizer or AdaLoRA state).

    Every array whose path ends with an adapter array's path (``.../mu/<lora path>/a``, an
    :class:`lora_jax.adalora.AllocatorState` EMA) takes that array's spec; AdaLoRA masks
    (``mask/<lora path>``, shaped like ``E``) take ``E``'s; everything else (step counts,
    budgets, scalars) is replicated. Works for any optax state, ``AllocatorState``, and trees
    of them.

    Args:
      state: the state tree (arrays or ``jax.ShapeDtypeStruct``).
      lora_specs: from :func:`specs`.

    Returns:
      A ``PartitionSpec`` tree with ``state``'s structure.

    >>> import jax, jax.numpy as jnp, optax, lora_jax
    >>> lora = lora_jax.init({"w": {"kernel": jnp.ones((8, 4))}}, r=2, key=jax.random.key(0))
    >>> s = specs(lora, {"w/kernel": PartitionSpec("data", None)})
    >>> st = state_specs(optax.adam(1e-3).init(lora), s)
    >>> st[0].mu["w"]["kernel"].a, st[0].count
    (P('data',), P())
    """
    table: dict[str, PartitionSpec] = {}
    for path, leaf in L.leaves(lora_specs).items():
        roles = _roles(leaf)
        for name, s in array_fields(leaf).items():
            if is_spec(s):
                table[f"{path}/{name}"] = s
                if roles.get(name) == "rank":
                    table[path] = s

    def f(kp, x):
        shape = getattr(x, "shape", None)
        if shape is None:
            return PartitionSpec()
        parts = P.path_str(kp).split("/")
        for i in range(len(parts)):
            s = table.get("/".join(parts[i:]))
            if s is not None:
                return s if len(s) <= len(shape) else PartitionSpec()
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(f, state)
