"""Sharding LoRA, AdaLoRA and QLoRA trees on a device mesh.

Adapters take their sharding from the base weight they adapt: ``A (*stack, *in, r)`` shards
like the kernel's input axes, ``B (*stack, r, *out)`` like its output axes, the rank axis is
replicated. Under FSDP the merged weight ``W0 + s·A·B`` is then formed shard by shard, where
``W0`` lives, and gathered for each matmul that needs it (the forward, and ``dx`` in the
backward pass), exactly as ``W0`` alone would be; ``ΔW`` is never communicated on its own, and
no weight-sized gradient is (the backward pass never forms ``dW``).

Specs are ordinary :class:`jax.sharding.PartitionSpec` trees. *Base specs* give one spec per
base parameter, for its logical (dense) shape, also where the parameter is a
:class:`lora_jax.QuantizedArray`; :func:`storage_specs` turns them into specs for the arrays
actually stored. :func:`fsdp` and :func:`tensor_parallel` derive base specs for users who
have none.

>>> import jax, jax.numpy as jnp, lora_jax
>>> from jax.sharding import PartitionSpec as P
>>> params = {"up": {"kernel": jnp.ones((8, 16))}, "down": {"kernel": jnp.ones((16, 8))}}
>>> lora = lora_jax.init(params, r=2, key=jax.random.key(0))
>>> s = specs(lora, {"up": {"kernel": P(None, "model")}, "down": {"kernel": P("model", None)}})
>>> s["up"]["kernel"].a, s["up"]["kernel"].b
(P(), P(None, 'model'))
>>> s["down"]["kernel"].a, s["down"]["kernel"].b
(P('model',), P())

The files, one idea each:

- ``placement.py``: :func:`mesh`, :func:`named`, :func:`device_put` and the checks against a mesh;
- ``adapter_specs.py``: adapter specs, :func:`specs` and :func:`state_specs`;
- ``storage.py``: :func:`storage_specs`, the arrays a base tree actually stores;
- ``policies.py``: base specs for common layouts, :func:`fsdp` and :func:`tensor_parallel`;
- ``hlo.py``: :func:`collectives`, what a compiled program communicates;
- ``plumbing.py``: spec helpers the others share.
"""

from lora_jax.sharding.adapter_specs import POLICIES, specs, state_specs
from lora_jax.sharding.hlo import Collective, collectives
from lora_jax.sharding.placement import device_put, mesh, named
from lora_jax.sharding.policies import COLUMN_PARALLEL, ROW_PARALLEL, fsdp, tensor_parallel
from lora_jax.sharding.storage import storage_specs

__all__ = [
    "COLUMN_PARALLEL",
    "POLICIES",
    "ROW_PARALLEL",
    "Collective",
    "collectives",
    "device_put",
    "fsdp",
    "mesh",
    "named",
    "specs",
    "state_specs",
    "storage_specs",
    "tensor_parallel",
]
