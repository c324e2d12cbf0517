"""Training helpers: split a tree into trainable and frozen parts, and an optax wrapper.

The usual LoRA training loop differentiates with respect to the LoRA tree alone:

>>> import jax, jax.numpy as jnp, optax, lora_jax
>>> params = {"w": {"kernel": jax.random.normal(jax.random.key(0), (4, 3))}}
>>> lora = lora_jax.init(params, r=2, key=jax.random.key(1))
>>> f = lora_jax.apply(lambda p, x: x @ p["w"]["kernel"])
>>> tx = optax.adam(1e-2)
>>> opt_state = tx.init(lora)
>>> g = jax.grad(lambda l: jnp.sum(f(params, l, jnp.ones((2, 4))) ** 2))(lora)
>>> updates, opt_state = tx.update(g, opt_state, lora)
>>> lora = optax.apply_updates(lora, updates)

When the whole ``{"base": params, "lora": lora}`` tree is the optimiser's argument (to also
train some base leaves, PEFT's ``modules_to_save``), :func:`optimizer` freezes everything
else with ``optax.partition`` and ``optax.set_to_zero``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from lora_jax import lora as L
from lora_jax import paths as P
from lora_jax import protocols

PyTree = Any


def _is_node(x):
    return L.is_lowrank(x) or protocols.is_base_leaf(x)


def trainable_base_paths(
    base: PyTree, lora: PyTree, *, modules_to_save: P.Pattern | None = None, bias: str = "none"
) -> set[str]:
    """Base paths that train besides the adapters (PEFT ``modules_to_save`` and ``bias``).

    Args:
      base: the base parameter tree.
      lora: the LoRA tree.
      modules_to_save: regexes; every base leaf whose path matches (or lies below a matching
        module path) trains in full.
      bias: ``"none"``, ``"lora_only"`` (biases of adapted modules) or ``"all"``.
    """
    if bias not in ("none", "lora_only", "all"):
        raise ValueError(f"bias must be 'none', 'lora_only' or 'all', got {bias!r}")
    pats = P.as_patterns(modules_to_save)
    lora_paths = set(L.leaves(lora))
    mods = {p.rsplit("/", 1)[0] for p in lora_paths}
    out = set()
    for path, _ in P.flatten(base):
        parent, _, name = path.rpartition("/")
        if pats and (P.matches(path, pats) or any(P.matches(path[:i], pats)
                                                  for i in _prefix_cuts(path))):
            if path in lora_paths:
                raise ValueError(
                    f"{path!r} is both a LoRA target and in modules_to_save; exclude it from "
                    "the LoRA targets to train it in full"
                )
            out.add(path)
        elif name == "bias" and (bias == "all" or (bias == "lora_only" and parent in mods)):
            out.add(path)
    return out


def _prefix_cuts(path: str):
    return [i for i, ch in enumerate(path) if ch == "/"]


def trainable_mask(
    tree: PyTree, *, modules_to_save: P.Pattern | None = None, bias: str = "none"
) -> PyTree:
    """A bool tree: True on adapter arrays (and chosen base leaves), False elsewhere.

    ``tree`` is a LoRA tree, or a combined ``{"base": params, "lora": lora}`` tree; in the
    latter, ``modules_to_save`` (regexes over base paths) and ``bias`` (``"none"``,
    ``"lora_only"``, ``"all"``) choose base leaves that train too.
    """
    keep: set[str] = set()
    if isinstance(tree, dict) and set(tree) == {"base", "lora"}:
        keep = {"base/" + p for p in trainable_base_paths(
            tree["base"], tree["lora"], modules_to_save=modules_to_save, bias=bias)}
    elif modules_to_save or bias != "none":
        raise ValueError("modules_to_save/bias need a combined {'base': ..., 'lora': ...} tree")

    def label(path, x):
        if L.is_lowrank(x):  # every array trains but a kind's frozen fields (a stack's scales)
            m = jax.tree.map(lambda _: True, x)
            return m.replace(**{f: False for f in x.frozen_fields}) if x.frozen_fields else m
        if protocols.is_base_leaf(x):
            return jax.tree.map(lambda _: False, x)
        return path in keep

    return jax.tree_util.tree_map_with_path(
        lambda kp, x: label(P.path_str(kp), x), tree, is_leaf=_is_node
    )


def optimizer(
    tx: optax.GradientTransformation,
    tree: PyTree,
    *,
    modules_to_save: P.Pattern | None = None,
    bias: str = "none",
) -> optax.GradientTransformation:
    """``tx`` on the trainable leaves of ``tree``, ``optax.set_to_zero`` on the rest.

    Use the same ``modules_to_save``/``bias`` with :func:`lora_jax.apply` so that the frozen
    base gets no gradient computed at all (``apply`` stops it), and the saved modules do.

    >>> import jax, jax.numpy as jnp, optax, lora_jax
    >>> params = {"d": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    >>> tree = {"base": params, "lora": lora_jax.init(params, r=2, key=jax.random.key(0))}
    >>> tx = lora_jax.optimizer(optax.sgd(0.1), tree, bias="lora_only")
    >>> state = tx.init(tree)
    """
    mask = trainable_mask(tree, modules_to_save=modules_to_save, bias=bias)
    labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
    return optax.partition({"train": tx, "freeze": optax.set_to_zero()}, labels)


def split(
    tree: PyTree, is_trainable: Callable[[str, Any], bool] | PyTree | None = None
) -> tuple[PyTree, PyTree]:
    """Splits ``tree`` into ``(trainable, frozen)``; each has ``None`` where the other has a leaf.

    Args:
      tree: any pytree (adapter leaves are entered).
      is_trainable: a function ``(path, leaf) -> bool``, a bool mask tree (e.g. from
        :func:`trainable_mask`), or ``None`` for :func:`trainable_mask`'s default.

    >>> import jax.numpy as jnp, lora_jax
    >>> t, f = lora_jax.split({"a": jnp.ones(2), "b": jnp.zeros(2)}, lambda p, x: p == "a")
    >>> t["b"] is None and f["a"] is None
    True
    """
    if is_trainable is None:
        mask = trainable_mask(tree)
    elif callable(is_trainable):
        mask = jax.tree_util.tree_map_with_path(
            lambda kp, x: bool(is_trainable(P.path_str(kp), x)), tree)
    else:
        mask = is_trainable
    train = jax.tree.map(lambda m, x: x if m else None, mask, tree)
    frozen = jax.tree.map(lambda m, x: None if m else x, mask, tree)
    return train, frozen


def combine(trainable: PyTree, frozen: PyTree) -> PyTree:
    """Inverse of :func:`split`."""
    return jax.tree.map(
        lambda a, b: b if a is None else a, trainable, frozen, is_leaf=lambda x: x is None
    )
