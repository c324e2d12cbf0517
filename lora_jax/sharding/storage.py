"""Specs for the arrays a base tree stores: :func:`storage_specs`.

Base specs describe each parameter's logical (dense) shape; a base leaf that stores something
else (a :class:`lora_jax.QuantizedArray`) is asked, through its ``storage_specs`` protocol
member, how its stored arrays shard.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec

from lora_jax import paths as P
from lora_jax import protocols
from lora_jax.sharding.placement import check_divides
from lora_jax.sharding.plumbing import canonical, padded_entries, spec_map

PyTree = Any


def storage_specs(base: PyTree, base_specs: PyTree | Mapping[str, Any], mesh: Mesh) -> PyTree:
    """Specs for the arrays a base tree stores, from specs of its logical (dense) shapes.

    Dense parameters keep their spec. A :class:`lora_jax.QuantizedArray` stores its codes and
    block scales flat in row-major block order; they are sharded over the same mesh axes as
    the kernel's spec, each shard holding whole blocks. Where the kernel's spec shards only its
    leading axis, a shard of the codes is exactly the codes of a shard of the kernel, so
    dequantizing needs no communication; otherwise XLA reshuffles at the dequantization (the
    memory is still divided). Second-level scales (double quantization) are sharded when every
    shard holds whole groups of 256 blocks, else replicated (they are tiny).

    Args:
      base: the base tree (dense arrays and/or ``QuantizedArray`` leaves; abstract is fine).
      base_specs: one spec per parameter, as for :func:`specs`; missing entries replicate.
      mesh: the mesh (for the axis sizes).

    Returns:
      A spec tree with ``base``'s pytree structure, for :func:`named`/``jax.device_put``.

    Raises:
      ValueError: a spec does not fit its parameter, or a shard would split a quantization
        block.
    """
    flat = spec_map(base_specs)

    def f(kp, x):
        path = P.path_str(kp)
        spec = canonical(padded_entries(flat.get(path, PartitionSpec()), len(x.shape),
                                        f"base_specs[{path!r}]"))
        check_divides(mesh, spec, x.shape, path)
        if not protocols.is_base_leaf(x):
            return spec
        return x.storage_specs(spec, dict(mesh.shape), path)

    return jax.tree_util.tree_map_with_path(f, base, is_leaf=protocols.is_base_leaf)


def splits_storage(x: Any, spec_entries: Sequence, mesh: Mesh) -> bool:
    """True if a spec with ``spec_entries`` would split a storage unit of the base leaf ``x``
    (a quantization block); always False for a dense array."""
    if not protocols.is_base_leaf(x):
        return False
    try:
        x.storage_specs(canonical(spec_entries), dict(mesh.shape), "")
    except ValueError:
        return True
    return False
