"""Base specs for common layouts: :func:`fsdp` and Megatron-style :func:`tensor_parallel`.

For users who have no base specs of their own: both return ``{path: PartitionSpec}`` for the
logical shapes of the base parameters, accepted wherever base specs are.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

from jax.sharding import Mesh, PartitionSpec

from lora_jax import paths as P
from lora_jax import protocols
from lora_jax import validation as V
from lora_jax.sharding.placement import check_axes
from lora_jax.sharding.plumbing import canonical, padded_entries, spec_map
from lora_jax.sharding.storage import splits_storage

PyTree = Any

# Megatron-style tensor parallelism: column-parallel layers split their output features,
# row-parallel layers their input features, so each MLP/attention block needs one all-reduce.
COLUMN_PARALLEL = (r"(.*/)?(q|k|v|query|key|value|qkv|q_proj|k_proj|v_proj|qkv_proj|in_proj|"
                   r"c_attn|up|gate|up_proj|gate_proj|wi|wi_0|wi_1|w1|w3|fc1|c_fc)/kernel")
ROW_PARALLEL = (r"(.*/)?(o|out|o_proj|out_proj|wo|proj|c_proj|down|down_proj|w2|fc2)/kernel")


def _axes_of(spec) -> tuple[str, ...]:
    out = []
    for e in spec:
        out += [] if e is None else [e] if isinstance(e, str) else list(e)
    return tuple(out)


def fsdp(
    params: PyTree,
    mesh: Mesh,
    *,
    axis: str | tuple[str, ...] = "data",
    min_size: int = 1024,
    specs: PyTree | Mapping[str, Any] | None = None,
) -> dict[str, PartitionSpec]:
    """Base specs for fully sharded data parallelism: each parameter split along its largest
    axis that the mesh ``axis`` divides (a quantized weight along its leading axis if it can).

    Args:
      params: the base tree (dense or quantized leaves; abstract is fine).
      mesh: the mesh.
      axis: mesh axis (or tuple of axes) to shard over, usually the data axis.
      min_size: parameters with fewer elements stay replicated.
      specs: existing base specs (e.g. from :func:`tensor_parallel`) to add FSDP to; axes
        they already shard are left alone.

    Returns:
      ``{path: PartitionSpec}`` for every parameter (accepted wherever base specs are).
      A parameter of at least ``min_size`` elements that cannot be split (no axis divisible,
      or blocks of a quantized weight that would be split) stays replicated with a warning.

    >>> import jax.numpy as jnp
    >>> from lora_jax.sharding import mesh
    >>> p = {"w": {"kernel": jnp.ones((64, 256))}, "b": {"bias": jnp.ones(256)}}
    >>> fsdp(p, mesh((1,), ("data",)))
    {'b/bias': P(), 'w/kernel': P(None, 'data')}
    """
    axes = (axis,) if isinstance(axis, str) else tuple(axis)
    check_axes(mesh, axes)
    min_size = V.integer(min_size, "fsdp: min_size", low=0)
    n = math.prod(mesh.shape[a] for a in axes)
    prior = spec_map(specs) if specs is not None else {}
    out = {}
    for path, x in P.flatten(params):
        shape = tuple(x.shape)
        entries = list(padded_entries(prior.get(path, PartitionSpec()), len(shape), path))
        used = set(_axes_of(entries))
        if math.prod(shape) >= min_size and not used & set(axes):
            # A quantized weight prefers the axis its blocks were flattened along first: its
            # shards then hold whole runs of blocks, and dequantizing needs no communication.
            first = x.major_axis if protocols.is_base_leaf(x) else None
            for d in sorted(range(len(shape)), key=lambda d: (d != first, -shape[d], d)):
                if entries[d] is not None or shape[d] % n:
                    continue
                trial = entries.copy()
                trial[d] = axes if len(axes) > 1 else axes[0]
                if splits_storage(x, trial, mesh):
                    continue
                entries = trial
                break
            else:
                warnings.warn(f"fsdp: {path!r} of shape {shape} has no axis that {n} shards "
                              "divide (or its quantization blocks would be split); replicated",
                              stacklevel=2)
        out[path] = canonical(entries)
    return out


def tensor_parallel(
    params: PyTree,
    mesh: Mesh,
    *,
    axis: str = "model",
    column: P.Pattern = COLUMN_PARALLEL,
    row: P.Pattern = ROW_PARALLEL,
    stack_axes: int = 0,
    in_axes: int | Mapping[str, int] | None = None,
) -> dict[str, PartitionSpec]:
    """Base specs for Megatron-style tensor parallelism over mesh ``axis``.

    Column-parallel kernels (attention q/k/v, MLP up/gate; ``column`` regexes, ``re.fullmatch``
    over paths) split their first output axis, and their biases too; row-parallel kernels
    (attention output, MLP down; ``row``) split their first input axis. Everything else is
    replicated. Input axes follow :func:`lora_jax.paths.default_in_axes` unless ``in_axes``
    says otherwise; ``stack_axes`` leading axes (``nn.scan``) are never split.

    Returns:
      ``{path: PartitionSpec}`` for every parameter. A matched kernel whose axis the mesh
      axis does not divide (or whose quantization blocks would be split) stays replicated,
      with a warning.

    >>> import jax.numpy as jnp
    >>> from lora_jax.sharding import mesh
    >>> p = {"q": {"kernel": jnp.ones((8, 8)), "bias": jnp.ones(8)},
    ...      "o": {"kernel": jnp.ones((8, 8))}}
    >>> tensor_parallel(p, mesh((1,), ("model",)))
    {'o/kernel': P('model',), 'q/bias': P('model',), 'q/kernel': P(None, 'model')}
    """
    check_axes(mesh, (axis,))
    in_axes = V.axes_arg(in_axes, "tensor_parallel: in_axes", low=1)
    stack_axes = V.integer(stack_axes, "tensor_parallel: stack_axes", low=0)
    V.patterns(column, "tensor_parallel: column")
    V.patterns(row, "tensor_parallel: row")
    n = mesh.shape[axis]
    cols, rows = P.as_patterns(column), P.as_patterns(row)
    flat = P.flatten(params)
    out: dict[str, PartitionSpec] = {}
    column_modules = set()
    for path, x in flat:
        shape = tuple(x.shape)
        entries: list[str | None] = [None] * len(shape)
        kind = "column" if P.matches(path, cols) else "row" if P.matches(path, rows) else None
        if kind and len(shape) - stack_axes >= 2:
            ia = P.setting_for(in_axes, path, None, None) or P.default_in_axes(path, shape,
                                                                               stack_axes)
            d = stack_axes + ia if kind == "column" else stack_axes
            entries[d] = axis
            if shape[d] % n or splits_storage(x, entries, mesh):
                warnings.warn(f"tensor_parallel: {path!r} of shape {shape}: axis {d} cannot be "
                              f"split {n} ways; replicated", stacklevel=2)
                entries[d] = None
            elif kind == "column":
                column_modules.add(path.rsplit("/", 1)[0])
        out[path] = canonical(entries)
    for path, x in flat:  # column-parallel biases follow their kernels' output split
        parent, _, name = path.rpartition("/")
        if name == "bias" and parent in column_modules and len(x.shape) > stack_axes:
            if x.shape[stack_axes] % n == 0:
                out[path] = PartitionSpec(*([None] * stack_axes + [axis]))
    return out
