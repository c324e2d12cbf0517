"""Meshes and placement: :func:`mesh`, :func:`named`, :func:`device_put` and its checks.

:func:`check_divides` and :func:`check_axes` are the checks every sharding file runs against a
mesh, with errors that name the parameter path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lora_jax import paths as P
from lora_jax.sharding.plumbing import is_spec, padded_entries

PyTree = Any


def mesh(shape: Sequence[int], names: Sequence[str], *, devices=None) -> Mesh:
    """``jax.make_mesh`` with ``Auto`` axes: the ``jit(in_shardings=..., out_shardings=...)``
    style, where XLA propagates shardings through unchanged model code.

    (``jax.make_mesh`` defaults to ``Explicit`` axes, under which every op with an ambiguous
    output sharding, such as Flax's embedding lookup on a batch-sharded input, must be
    annotated in the model code.)

    >>> m = mesh((1,), ("data",))
    >>> m.axis_names, m.axis_types
    (('data',), (Auto,))
    """
    return jax.make_mesh(tuple(shape), tuple(names), axis_types=(AxisType.Auto,) * len(names),
                         devices=devices)


def named(mesh: Mesh, specs: PyTree) -> PyTree:
    """The tree of ``NamedSharding(mesh, spec)`` for a tree of ``PartitionSpec``.

    >>> m = mesh((1,), ("data",))
    >>> named(m, {"w": PartitionSpec("data")})["w"].spec
    P('data',)
    """
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec)


def device_put(tree: PyTree, mesh: Mesh, specs: PyTree | Mapping[str, Any]) -> PyTree:
    """``jax.device_put(tree, named(mesh, specs))``, after checking every spec against its array.

    JAX's own error for a mesh axis that does not divide a dimension names no parameter; this
    one names the path, the dimension and the mesh axes, before anything moves.

    Args:
      tree: a tree of arrays (base params, a LoRA tree, optimizer state...).
      mesh: the mesh.
      specs: ``PartitionSpec`` s shaped like ``tree`` (from :func:`specs`,
        :func:`state_specs`, :func:`storage_specs`), or a flat ``{path: spec}`` dict (from
        :func:`fsdp`, :func:`tensor_parallel`) for trees of dense arrays. Arrays without a
        spec are replicated; a spec for a path the tree lacks is an error.

    Returns:
      The tree, placed.

    Raises:
      ValueError: a spec for a missing path, longer than its array's rank, naming an absent
        mesh axis, or sharding a dim that its mesh axes do not divide.

    >>> import jax.numpy as jnp
    >>> m = mesh((1,), ("data",))
    >>> device_put({"w": jnp.ones((4, 2))}, m, {"w": PartitionSpec("data")})["w"].sharding.spec
    P('data',)
    """
    def spec_like(x):
        return x is None or is_spec(x) or isinstance(x, NamedSharding)

    pairs, tdef = jax.tree_util.tree_flatten_with_path(tree)
    table = {}
    for kp, s in jax.tree_util.tree_flatten_with_path(specs, is_leaf=spec_like)[0]:
        if s is not None and not spec_like(s):
            raise TypeError(f"device_put: specs[{P.path_str(kp)!r}] is a {type(s).__name__}, "
                            "expected a PartitionSpec")
        table[P.path_str(kp)] = s.spec if isinstance(s, NamedSharding) else s
    paths = [P.path_str(kp) for kp, _ in pairs]
    extra = sorted(set(table) - set(paths))
    if extra:
        raise ValueError(f"device_put: specs name {extra[:4]}, which the tree lacks (its arrays "
                         f"are e.g. {paths[:4]}); for quantized weights pass "
                         "storage_specs(base, base_specs, mesh)")
    out = []
    for path, (_, x) in zip(paths, pairs):
        spec = table.get(path) or PartitionSpec()
        check_divides(mesh, spec, tuple(x.shape), f"device_put: {path!r}")
        out.append(NamedSharding(mesh, spec))
    return jax.device_put(tree, tdef.unflatten(out))


def check_axes(mesh: Mesh, axes) -> None:
    """Raises if any of ``axes`` is not a mesh axis."""
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"mesh axes {missing} are not in the mesh {dict(mesh.shape)}")


def check_divides(mesh: Mesh, spec: PartitionSpec, shape, where: str) -> None:
    """Raises unless ``spec`` fits an array of ``shape`` on ``mesh``: no more entries than
    axes, mesh axes that exist, and shard counts that divide their dims."""
    for d, e in enumerate(padded_entries(spec, len(shape), where)):
        if e is None:
            continue
        axes = (e,) if isinstance(e, str) else tuple(e)
        missing = [a for a in axes if a not in mesh.shape]
        if missing:
            raise ValueError(f"{where}: mesh axes {missing} are not in the mesh "
                             f"{dict(mesh.shape)} (spec {spec})")
        n = math.prod(mesh.shape[a] for a in axes)
        if shape[d] % n:
            raise ValueError(f"{where}: dim {d} of shape {tuple(shape)} is not divisible by "
                             f"{n} shards (mesh axes {axes})")
