"""Tracing a function of a parameter tree to a jaxpr, once per call signature.

Both :func:`lora_jax.apply` (which evaluates the jaxpr with the fast LoRA rules) and
:func:`lora_jax.trace` (which reads weight layouts off it) start here. Base leaves enter the
jaxpr as abstract values of their logical shape, quantized ones included; array arguments
are traced; anything else (Python scalars, strings, ``deterministic=True``) is closed over.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lora_jax import paths as P
from lora_jax import protocols


@dataclasses.dataclass
class Traced:
    """A traced call: the closed jaxpr and how its inputs map to the call's arguments.

    Attributes:
      closed: the ``ClosedJaxpr``; its inputs are the base leaves, then ``dyn_vals``.
      base_paths: the path of every base leaf, in jaxpr input order.
      base_leaves: the base leaves (dense arrays or registered base leaves such as
        ``QuantizedArray``), in the same order.
      dyn_vals: the traced (array) leaves of ``(args, kwargs)``.
      is_dyn: per leaf of ``(args, kwargs)``: whether it is traced (in ``dyn_vals``).
      out_tree: the output's pytree structure.
    """

    closed: Any
    base_paths: list[str]
    base_leaves: list[Any]
    dyn_vals: list[Any]
    is_dyn: list[bool]
    out_tree: Any


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def trace(fn: Callable, base: Any, args: tuple, kwargs: dict) -> Traced:
    """Traces ``fn(base, *args, **kwargs)``; see the module docstring."""
    pairs, base_def = jax.tree_util.tree_flatten_with_path(base, is_leaf=protocols.is_base_leaf)
    base_paths = [P.path_str(p) for p, _ in pairs]
    base_leaves = [x for _, x in pairs]
    for path, x in zip(base_paths, base_leaves):
        if not (_is_array(x) or protocols.is_base_leaf(x) or isinstance(x, jax.core.Tracer)):
            raise TypeError(
                f"base parameter {path!r} is a {type(x).__name__} ({x!r:.60}), expected an "
                "array; wrap Python numbers with jnp.asarray, or pass them as arguments")
    abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in base_leaves]

    dyn_leaves, dyn_def = jax.tree.flatten((args, kwargs))
    is_dyn = [_is_array(x) or isinstance(x, jax.core.Tracer) for x in dyn_leaves]
    dyn_vals = [x for x, d in zip(dyn_leaves, is_dyn) if d]
    out_tree = []

    def traced(base_leaves_, dyn):
        it = iter(dyn)
        leaves_ = [next(it) if d else x for x, d in zip(dyn_leaves, is_dyn)]
        a, k = jax.tree.unflatten(dyn_def, leaves_)
        out = fn(jax.tree.unflatten(base_def, base_leaves_), *a, **k)
        flat, tree = jax.tree.flatten(out)
        out_tree.append(tree)
        return flat

    abstract_dyn = [jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct)
                    else x for x in dyn_vals]
    closed = jax.make_jaxpr(traced)(abstract, abstract_dyn)
    return Traced(closed, base_paths, base_leaves, dyn_vals, is_dyn, out_tree[0])
