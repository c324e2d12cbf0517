"""LoRA: adapter leaves, ``init``, ``merge`` and ``unmerge`` (this module gathers them).

The implementation lives in files of one idea each: :mod:`lora_jax.leaves` (the adapter leaf
kinds), :mod:`lora_jax.targets` (which parameters, at which rank and layout),
:mod:`lora_jax.initializers` (``init``), :mod:`lora_jax.merging` (``merge``/``unmerge``) and
:mod:`lora_jax.summaries` (counts and summaries).

>>> import jax, jax.numpy as jnp, lora_jax
>>> params = {"params": {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}}
>>> lora = lora_jax.init(params, r=2, key=jax.random.key(0))
>>> lora["params"]["Dense_0"]["kernel"].a.shape, lora["params"]["Dense_0"]["kernel"].b.shape
((4, 2), (2, 3))
"""

from lora_jax.initializers import INIT_SCHEMES, init
from lora_jax.leaves import LoraWeight, LowRankLeaf, from_leaves, is_lowrank, leaves
from lora_jax.merging import check_fits, merge, unmerge
from lora_jax.summaries import Summary, base_param_count, param_count, summary
from lora_jax.targets import resolve_targets

__all__ = [
    "INIT_SCHEMES",
    "LoraWeight",
    "LowRankLeaf",
    "Summary",
    "base_param_count",
    "check_fits",
    "from_leaves",
    "init",
    "is_lowrank",
    "leaves",
    "merge",
    "param_count",
    "resolve_targets",
    "summary",
    "unmerge",
]
