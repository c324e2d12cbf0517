"""The NNX variable types of :class:`lora_jax.nnx.LoRA`, and how adapters live in them.

* :class:`LoraParam` (a subclass of ``nnx.Param``): one array of an adapter (LoRA's A or B,
  AdaLoRA's P, E or Q). The only thing trained, so ``nnx.Optimizer(lm, tx, wrt=LoraParam)``,
  ``nnx.grad`` with ``nnx.DiffState(0, LoraParam)``, and even the default ``wrt=nnx.Param``
  see the adapters and nothing else.
* :class:`FrozenParam`: a base weight of the wrapped model (an array, or a quantized leaf),
  no longer an ``nnx.Param``, so that no ``nnx.Param`` filter can train it by mistake.
* :class:`AdaLoraState`: the AdaLoRA allocator's arrays (importance EMAs, masks, budget,
  step), state that changes in training but is not optimized.

An adapter leaf is a pytree of arrays plus static settings; the module keeps one
:class:`LoraParam` per array, named by the leaf's own pytree keys (``a``/``b`` for LoRA), and
the leaf's tree definition as a static attribute. :func:`pack` and :func:`unpack` go between a
LoRA tree and that form without naming any leaf kind's fields.

>>> import jax, jax.numpy as jnp, lora_jax
>>> lora = lora_jax.init({"fc": {"kernel": jnp.ones((4, 3))}}, r=2, key=jax.random.key(0))
>>> variables, defs = pack(lora)
>>> sorted(variables["fc"]["kernel"]), type(variables["fc"]["kernel"]["a"]).__name__
(['a', 'b'], 'LoraParam')
>>> unpack(variables, defs)["fc"]["kernel"].a.shape
(4, 2)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from lora_jax import paths as P
from lora_jax.leaves import from_leaves, leaves

PyTree = Any
# Per adapter: its path, its pytree definition, and the names of its arrays in that order.
Defs = tuple[tuple[str, Any, tuple[str, ...]], ...]


class LoraParam(nnx.Param):
    """One array of an adapter: what ``nnx.Optimizer(lm, tx, wrt=LoraParam)`` trains."""


class FrozenParam(nnx.Variable):
    """A frozen base weight of a wrapped model: a dense array or a quantized leaf."""


class AdaLoraState(nnx.Variable):
    """The AdaLoRA rank allocator's state: updated by ``AdaLoRA.update``, never optimized."""


def is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def pack(lora: PyTree, var_type: type = LoraParam) -> tuple[dict, Defs]:
    """A LoRA tree as nested dicts of ``var_type`` variables, one per array, and its defs."""
    variables, defs = {}, []
    for path, leaf in leaves(lora).items():
        pairs, treedef = jax.tree_util.tree_flatten_with_path(leaf)
        names = tuple(P.path_str(kp) for kp, _ in pairs)
        variables[path] = {n: var_type(x) for n, (_, x) in zip(names, pairs)}
        defs.append((path, treedef, names))
    return from_leaves(variables), tuple(defs)


def unpack(tree: Any, defs: Defs) -> dict:
    """The LoRA tree held by ``tree`` (what :func:`pack` made, or ``nnx.grad``'s State of it,
    variables or plain arrays at the leaves)."""
    out = {}
    for path, treedef, names in defs:
        node = _get(tree, path)
        vals = [_value(node[n]) for n in names]
        out[path] = jax.tree.unflatten(treedef, vals)
    return from_leaves(out)


def assign(tree: Any, defs: Defs, lora: PyTree) -> None:
    """Writes the arrays of the LoRA tree ``lora`` into the variables of ``tree``.

    Everything is checked before anything is written: on an error the variables are as
    they were.
    """
    got = leaves(lora)
    extra = sorted(set(got) - {p for p, _, _ in defs})
    if extra:
        raise ValueError(f"the LoRA tree has adapters this module does not adapt: {extra[:4]}")
    writes = []
    for path, treedef, names in defs:
        if path not in got:
            raise ValueError(f"the LoRA tree has no adapter at {path!r}, which this module adapts"
                             f" (it has {sorted(got)[:4]})")
        pairs, tdef = jax.tree_util.tree_flatten_with_path(got[path])
        node = _get(tree, path)
        if tdef != treedef:
            mine = jax.tree.unflatten(treedef, [_value(node[n]) for n in names])
            theirs = got[path]
            bases = [getattr(x, "residual_init", "") or "the model's own" for x in (theirs, mine)]
            base = ("" if bases[0] == bases[1] else f"; its base is {bases[0]!r}, this module's "
                    f"{bases[1]!r} (the residual of that init scheme)")
            raise ValueError(f"adapter at {path!r} is a {type(theirs).__name__} of rank "
                             f"{theirs.r} with {theirs.hparams()}, expected a "
                             f"{type(mine).__name__} of rank {mine.r} with {mine.hparams()} "
                             f"(this module's kind and settings){base}")
        for n, (_, x) in zip(names, pairs):
            old = node[n]
            if tuple(x.shape) != tuple(old.shape):
                raise ValueError(f"adapter array {path}/{n} has shape {tuple(x.shape)}, expected "
                                 f"{tuple(old.shape)}")
            writes.append((old, x))
    for var, x in writes:
        var.set_value(x)


def _get(tree: Any, path: str) -> Any:
    node = tree
    for k in path.split("/"):
        if not isinstance(node, Mapping) and not hasattr(node, "__getitem__"):
            raise ValueError(f"no adapter arrays at {path!r}")
        try:
            node = node[k]
        except (KeyError, TypeError):
            raise ValueError(f"no adapter arrays at {path!r} (missing {k!r})") from None
    return node


def _value(x: Any) -> Any:
    return x.get_value() if is_variable(x) else x
