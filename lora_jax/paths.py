"""Parameter paths and target selection.

A parameter's *path* is its position in the pytree written as '/'-joined keys, e.g.
``"params/Dense_0/kernel"``. NNX wraps each array in a ``Variable``, which flattens to one
child under the key ``GetAttrKey('value')``; that wrapper key is dropped, so an NNX kernel
reads ``"l1/kernel"`` whether the tree is an ``nnx.State`` or the module itself. A module
attribute or dict key that is really called ``value`` (``nnx.MultiHeadAttention.value``)
keeps its name: ``"attn/value/kernel"``.
Targets are regular expressions matched with ``re.fullmatch`` against these paths.

>>> import jax.numpy as jnp
>>> tree = {"params": {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}}
>>> [p for p, _ in flatten(tree)]
['params/Dense_0/bias', 'params/Dense_0/kernel']
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from lora_jax.protocols import is_base_leaf

PyTree = Any
Pattern = str | Sequence[str]

def key_str(k: Any) -> str:
    """One path entry as text."""
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def _variable_key_index(keypath: Sequence[Any]) -> int | None:
    """Index of the NNX ``Variable`` wrapper's key in ``keypath``, if it has one.

    A Variable flattens to its value under ``GetAttrKey('value')`` (flax 0.12), and
    holds an array or a registered base leaf, never a module; the attributes of modules lie
    above it (``GetAttrKey`` when a module is flattened itself, ``DictKey`` in an
    ``nnx.State``). So the wrapper is the innermost ``GetAttrKey('value')``, with nothing
    below it but the fields of a leaf object; any other ``value`` is a real attribute
    (``MultiHeadAttention.value``) and stays in the path. Keys alone cannot tell a dataclass
    field ``value`` holding a bare array from a Variable: such a field is dropped too.
    """
    for i in range(len(keypath) - 1, -1, -1):
        k = keypath[i]
        if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
            return i
        if isinstance(k, (jax.tree_util.DictKey, jax.tree_util.SequenceKey)):
            return None  # inside a dict or list: not a Variable's (array) content
    return None


def path_str(keypath: Sequence[Any]) -> str:
    """'/'-joined text form of a jax key path, without NNX's ``Variable`` wrapper key.

    >>> from jax.tree_util import DictKey, GetAttrKey
    >>> path_str((GetAttrKey("attn"), GetAttrKey("value"), DictKey("kernel"), GetAttrKey("value")))
    'attn/value/kernel'
    """
    skip = _variable_key_index(keypath)
    return "/".join(key_str(k) for i, k in enumerate(keypath) if i != skip)


def flatten(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
    """``(path, leaf)`` pairs of a tree; registered base leaves count as leaves."""

    def leaf(x):
        return is_base_leaf(x) or (is_leaf is not None and is_leaf(x))

    pairs, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=leaf)
    return [(path_str(p), x) for p, x in pairs]


def map_with_path(fn: Callable[[str, Any], Any], tree: PyTree) -> PyTree:
    """``jax.tree.map`` with the leaf's path string as first argument."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: fn(path_str(p), x), tree, is_leaf=is_base_leaf
    )


def as_patterns(p: Pattern | None) -> tuple[str, ...]:
    """Normalises a pattern argument (one regex or a list of them) to a tuple."""
    if p is None:
        return ()
    if isinstance(p, str):
        return (p,)
    return tuple(p)


def matches(path: str, patterns: Iterable[str]) -> bool:
    """True if any pattern equals ``path`` or fully matches it as a regex."""
    return any(p == path or re.fullmatch(p, path) for p in patterns)


def check_pattern(pattern: Any, what: str = "pattern") -> str:
    """Validates one regex; raises ``ValueError`` naming it."""
    if not isinstance(pattern, str):
        raise TypeError(f"{what} {pattern!r} is a {type(pattern).__name__}, expected a regex "
                        "string")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what} {pattern!r} is not a valid regex: {e}") from e
    return pattern


def setting_for(arg: Any, path: str, rule_value: Any = None, default: Any = None) -> Any:
    """One per-path setting: a rule's value if set, else ``arg`` (a value for every path, or
    ``{regex: value}`` where the first fully matching regex wins), else ``default``.

    >>> setting_for({".*attn.*": 2}, "attn/q/kernel"), setting_for(3, "x")
    (2, 3)
    >>> setting_for(None, "x", default=1)
    1
    """
    if rule_value is not None:
        return rule_value
    if arg is None:
        return default
    if not isinstance(arg, Mapping):
        return arg
    for pat, v in arg.items():
        if matches(path, (pat,)):
            return v
    return default


def path_key(key: jax.Array, path: str) -> jax.Array:
    """A PRNG key of its own for a parameter path: ``fold_in(key, crc32(path))``, so that
    no two adapters share a key and a path always gets the same one."""
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


# The names under which JAX libraries store matmul weights: Flax ("kernel"), Haiku and
# gemma-style einsum modules ("w"), PyTorch-style ports ("weight").
KERNEL_NAMES = ("kernel", "w", "weight")


def is_default_target(path: str, x: Any) -> bool:
    """The default target without a traced model: every float weight named ``kernel``,
    ``w`` or ``weight`` with two or more axes.

    That is Dense, DenseGeneral, Einsum and Conv kernels, and never embeddings, biases or
    norm scales. :func:`lora_jax.trace` finds targets by use instead of by name.
    """
    leaf_name = path.rsplit("/", 1)[-1]
    shape = getattr(x, "shape", ())
    return leaf_name in KERNEL_NAMES and len(shape) >= 2 and is_float(x)


def is_float(x: Any) -> bool:
    """True for an array (or base leaf) of a floating-point dtype, bfloat16 included."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and np.issubdtype(np.dtype(dtype), np.floating) or (
        dtype is not None and "bfloat16" in str(dtype)
    )



@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """Per-module LoRA settings (PEFT's ``rank_pattern``/``alpha_pattern``).

    Rules are tried in order and the first whose ``pattern`` fully matches a parameter path
    decides that parameter's settings. Unset fields (``None``) fall back to the arguments of
    :func:`lora_jax.init`.

    Attributes:
      pattern: regex matched with ``re.fullmatch`` against the '/'-joined path of each
        candidate target (by default every float kernel with two or more axes).
      r: rank; ``0`` excludes the matched parameters.
      alpha: LoRA alpha (scaling alpha/r, or alpha/sqrt(r) with rslora).
      in_axes: how many leading (non-stacked) kernel axes are the input.
      stack_axes: leading axes that stack layers (``nn.scan``/``nn.vmap``), LoRA per slice.
      roles: the kernel's layout, one character per axis (``"s"`` stack, ``"i"`` input,
        ``"o"`` output; see :mod:`lora_jax.layouts`), overriding a traced layout: e.g.
        ``"soio"`` for a fused ``kv_einsum`` ``(2, K, D, H)`` gives k and v adapters of
        their own.

    >>> Rule(pattern=r".*attn.*", r=16, alpha=32)
    Rule(pattern='.*attn.*', r=16, alpha=32, in_axes=None, stack_axes=None, roles=None)
    """

    pattern: str
    r: int | None = None
    alpha: float | None = None
    in_axes: int | None = None
    stack_axes: int | None = None
    roles: str | None = None

    def __post_init__(self):
        from lora_jax import validation as V  # here: validation reads paths

        V.regex(self.pattern, "Rule pattern")
        where = f"Rule {self.pattern!r}:"
        # Numbers normalised (np.int64 -> int), so rules stay hashable static values.
        for name, low in (("r", 0), ("in_axes", 1), ("stack_axes", 0)):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, V.integer(getattr(self, name), f"{where} {name}",
                                                         low=low))
        V.alpha(self.alpha, f"{where} alpha")


def default_in_axes(path: str, shape: Sequence[int], stack_axes: int = 0) -> int:
    """Flax's conventions for how many leading kernel axes are the input.

    * 2-D kernels (Dense, Embed-like): 1.
    * Conv kernels (a module name containing "conv"): all but the last (the output channels).
    * Attention output projections (module "out", "o", "o_proj", "out_proj", "wo"): all but the
      last, as in ``nn.MultiHeadDotProductAttention`` whose ``out`` kernel is (heads, head_dim, d).
    * Otherwise 1 (DenseGeneral with ``axis=-1``: (in, *features)).
    """
    ndim = len(shape) - stack_axes
    if ndim <= 2:
        return 1
    parts = path.split("/")
    module = parts[-2].lower() if len(parts) >= 2 else ""
    if "conv" in module or module in ("out", "o", "o_proj", "out_proj", "wo", "proj_out"):
        return ndim - 1
    return 1
