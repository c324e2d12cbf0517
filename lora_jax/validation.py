"""Checks of user input, shared by the public functions.

Each check raises before anything is computed or written, with a message that names the
argument or parameter path and what was expected. Numbers follow one rule: a rank or an axis
count is any integer type (``int``, ``np.int64``, a 0-d integer array) but never a ``bool`` or
a float; alpha is a finite float.

>>> integer(np.int64(4), "init: r", low=0)
4
>>> integer(4.0, "init: r")
Traceback (most recent call last):
...
TypeError: init: r must be an integer, got 4.0 (float)
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import protocols

PyTree = Any
INT_ROUNDINGS = (None, "nearest")


# ----------------------------------------------------------------------------------------
# Numbers


def _kind(value: Any) -> str:
    return type(value).__name__


def _show(value: Any) -> str:
    """A short repr: numpy scalars as plain numbers, long values cut."""
    if isinstance(value, np.generic):
        value = value.item()
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def integer(value: Any, where: str, *, low: int | None = None) -> int:
    """``value`` as a Python int; any integer type, never a bool or a float.

    Raises:
      TypeError: not an integer. ValueError: below ``low``.
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where} must be an integer, got the bool {value!r}")
    if isinstance(value, (int, np.integer)):
        v = int(value)
    elif (hasattr(value, "dtype") and getattr(value, "shape", None) == ()
          and jnp.issubdtype(value.dtype, jnp.integer)
          and not isinstance(value, jax.core.Tracer)):
        v = int(value)  # a 0-d integer array, e.g. a step counter
    else:
        raise TypeError(f"{where} must be an integer, got {_show(value)} ({_kind(value)})")
    if low is not None and v < low:
        raise ValueError(f"{where} must be an integer >= {low}, got {v}")
    return v


def number(value: Any, where: str) -> float:
    """``value`` as a finite Python float (ints and numpy scalars accepted, bools not)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)):
        if not (hasattr(value, "dtype") and getattr(value, "shape", None) == ()
                and jnp.issubdtype(value.dtype, jnp.number)
                and not isinstance(value, jax.core.Tracer)):
            raise TypeError(f"{where} must be a number, got {_show(value)} ({_kind(value)})")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{where} must be a finite number, got {v}")
    return v


def alpha(value: Any, where: str, *, zero_means: str | None = None) -> float | None:
    """A LoRA alpha: ``None`` (the caller's default) or a finite number > 0.

    ``zero_means``: if given, 0 is accepted and means this (AdaLoRA: PEFT uses ``init_r``).
    """
    if value is None:
        return None
    v = number(value, where)
    if v == 0 and zero_means is not None:
        return v
    if v <= 0:
        extra = f" (or 0 for {zero_means})" if zero_means else ""
        raise ValueError(f"{where} must be > 0{extra}, got {v}: the update is scaled by "
                         "alpha / r, so alpha <= 0 switches the adapter off or reverses it")
    return v


def dropout(value: Any, where: str) -> float:
    """A dropout rate in [0, 1)."""
    v = number(value, where)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{where} must be in [0, 1), got {v}")
    return v


def axes_arg(value: Any, where: str, *, low: int) -> Any:
    """``in_axes``/``stack_axes`` of ``init``: None, an integer, or ``{regex: integer}``."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        out = {}
        for pat, v in value.items():
            regex(pat, f"{where} key")
            out[pat] = integer(v, f"{where}[{pat!r}]", low=low)
        return out
    return integer(value, where, low=low)


# ----------------------------------------------------------------------------------------
# Patterns, keys, dtypes


def regex(pattern: Any, where: str) -> str:
    """A regex string that compiles."""
    if not isinstance(pattern, str):
        raise TypeError(f"{where} must be a regex string, got {_show(pattern)} "
                        f"({_kind(pattern)})")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{where} {pattern!r} is not a valid regex: {e}") from None
    return pattern


def patterns(value: Any, where: str) -> Any:
    """A regex or a list of regexes (``targets=``/``exclude=``), each compiled once to check it."""
    if value is None or isinstance(value, str):
        if value is not None:
            regex(value, where)
        return value
    if isinstance(value, (list, tuple)):
        for i, p in enumerate(value):
            regex(p, f"{where}[{i}]")
        return value
    raise TypeError(f"{where} must be a regex string or a list of them, got {_show(value)} "
                    f"({_kind(value)})")


def prng_key(key: Any, where: str) -> None:
    """A typed key (``jax.random.key``) or a raw ``uint32[2]`` key (``jax.random.PRNGKey``)."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if getattr(key, "shape", None) != ():
            raise ValueError(f"{where} must be a single PRNG key, got keys of shape {key.shape}")
        return
    if dtype is not None and np.dtype(dtype) == np.uint32 and tuple(key.shape) == (2,):
        return
    raise TypeError(f"{where} must be a PRNG key such as jax.random.key(0), got {_show(key)} "
                    f"({_kind(key)})")


def float_dtype(dtype: Any, where: str) -> None:
    """A floating dtype (factors must be trainable)."""
    try:
        ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        raise TypeError(f"{where} must be a floating dtype, got {dtype!r}") from None
    if not ok:
        raise TypeError(f"{where} must be a floating dtype such as jnp.float32, got "
                        f"{jnp.dtype(dtype).name}")


# ----------------------------------------------------------------------------------------
# Trees


def _paths():
    from lora_jax import paths  # imported here: paths imports this module

    return paths


def _is_lowrank(x: Any) -> bool:
    from lora_jax import lora  # imported here: lora imports this module

    return lora.is_lowrank(x)


def _array_like(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def params_tree(params: PyTree, where: str, what: str = "params") -> None:
    """A base parameter tree: arrays (or quantized leaves), and no adapter leaves."""
    P = _paths()
    flat = P.flatten(params, is_leaf=_is_lowrank)
    ada = [p for p, x in flat if _is_lowrank(x)]
    if ada:
        raise TypeError(f"{where}: {what} holds adapter leaves (at {ada[0]!r}), expected the base "
                        "parameters; a LoRA tree goes in the lora argument, after the base")
    if flat and not any(_array_like(x) for _, x in flat):
        raise TypeError(f"{where}: {what} holds no arrays (got a {_kind(params)}); pass the "
                        "parameter tree, e.g. variables = model.init(key, x) or nnx.state(model)")


def base_leaves(base: PyTree, where: str) -> None:
    """Every leaf of a base tree given to ``apply`` is an array (or a quantized weight)."""
    P = _paths()
    params_tree(base, where, "base")
    for path, x in P.flatten(base):
        if not _array_like(x):
            raise TypeError(f"{where}: base entry {path!r} is a {_kind(x)}, expected an array; "
                            "wrap Python numbers with jnp.asarray, or pass them as arguments")


def no_default_target(params: PyTree, where: str) -> None:
    """Explains why the default target selection by name (float weights named ``kernel``,
    ``w`` or ``weight`` with >= 2 axes) found nothing."""
    P = _paths()
    flat = P.flatten(params)
    if any(P.is_default_target(p, x) for p, x in flat):
        return
    names = "/".join(P.KERNEL_NAMES)
    kernels = [(p, x) for p, x in flat if p.rsplit("/", 1)[-1] in P.KERNEL_NAMES]
    found = ", ".join(f"{p!r} is {getattr(x, 'dtype', _kind(x))} "
                      f"{tuple(getattr(x, 'shape', ()))}"
                      for p, x in kernels[:4]) + (" ..." if len(kernels) > 4 else "")
    why = (f"none of the kernels in params is one ({found})" if kernels
           else f"params has no leaf named {names} (paths look like {[p for p, _ in flat[:4]]})")
    raise ValueError(f"{where}: no parameter to adapt: by default LoRA adapts float weights named "
                     f"{names} with two or more axes, and {why}; pass "
                     "layouts=lora_jax.trace(fn, params, *args) to find the weights the model "
                     "multiplies by, targets= (regexes over the paths) to choose parameters, or "
                     "cast integer kernels to a float dtype first")


def init_args(where, params, r, key, alpha_arg, targets, exclude, rules, dtype, dropout_arg,
              in_axes, stack_axes, *, alpha_zero_means=None, layouts=None):
    """The arguments shared by ``init`` and ``adalora.init``, checked; numbers normalised.

    Returns:
      ``(r, alpha, dropout, in_axes, stack_axes)`` as Python numbers.
    """
    params_tree(params, where)
    r = integer(r, f"{where}: r", low=0)
    alpha_arg = alpha(alpha_arg, f"{where}: alpha", zero_means=alpha_zero_means)
    prng_key(key, f"{where}: key")
    patterns(targets, f"{where}: targets")
    patterns(exclude, f"{where}: exclude")
    if rules is not None and not all(isinstance(ru, _paths().Rule) for ru in rules):
        raise TypeError(f"{where}: rules must be a list of lora_jax.Rule, got {_show(rules)}")
    float_dtype(dtype, f"{where}: dtype")
    dropout_arg = dropout(dropout_arg, f"{where}: dropout")
    in_axes = axes_arg(in_axes, f"{where}: in_axes", low=1)
    stack_axes = axes_arg(stack_axes, f"{where}: stack_axes", low=0)
    if targets is None and not rules and layouts is None:
        no_default_target(params, where)
    return r, alpha_arg, dropout_arg, in_axes, stack_axes


# ----------------------------------------------------------------------------------------
# Adapter leaves


def adapter_leaf(path: str, leaf: Any, where: str = "LoRA tree") -> None:
    """Checks that an adapter leaf (built by hand, or read from a file) is self-consistent:
    the leaf kind's own ``check``.

    Raises:
      TypeError: a field that is not an array, or not floating. ValueError: factors that do
        not chain, a stack or axis count that does not fit them, or a non-finite alpha.
    """
    leaf.check(f"{where}: adapter leaf {path!r}")


def leaf_arrays(leaf: Any, at: str) -> None:
    """Every array field of a leaf is a floating-point array."""
    for f in dataclasses.fields(leaf):
        x = getattr(leaf, f.name)
        if not f.metadata.get("pytree_node", True) or x is None:
            continue
        if not _array_like(x):
            raise TypeError(f"{at}: field {f.name} is a {_kind(x)}, expected an array")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{at}: field {f.name} has dtype {x.dtype}, expected a float dtype")


def factor_chain(at: str, a: tuple, b: tuple, sa: int, ia: int) -> None:
    """The factor layout of every adapter leaf: A ``(*stack, *in, r)``, B ``(*stack, r,
    *out)`` (the kernel's own axis order is the leaf's ``layout``)."""
    layout = "a must be (*stack, *in, r) and b (*stack, r, *out)"
    if len(a) != sa + ia + 1 or len(b) < sa + 2:
        raise ValueError(f"{at}: factors a {a} and b {b} do not fit stack_axes={sa}, "
                         f"in_axes={ia}: {layout}")
    if a[:sa] != b[:sa]:
        raise ValueError(f"{at}: a {a} and b {b} stack {a[:sa]} and {b[:sa]} layers; {layout}")
    if a[-1] != b[sa]:
        raise ValueError(f"{at}: the factors do not chain: a {a} has rank {a[-1]} (its last "
                         f"axis) but b {b} has rank {b[sa]} (axis {sa}); {layout}")


# ----------------------------------------------------------------------------------------
# merge / unmerge of integer kernels


def int_rounding(value: Any, where: str) -> None:
    if value not in INT_ROUNDINGS:
        raise ValueError(f"{where}: int_rounding must be None or 'nearest', got {value!r}")


def merge_dtypes(targets: Mapping[str, Any], dtype: Any, rounding: Any, where: str) -> None:
    """Refuses to cast a merged kernel to an integer dtype unless a rounding was asked for."""
    int_rounding(rounding, where)
    out = None if dtype is None else jnp.dtype(dtype)
    for path, w in targets.items():
        if not _array_like(w):
            raise TypeError(f"{where}: base entry {path!r} is a {_kind(w)}, expected a kernel "
                            "array")
        d = out if out is not None else jnp.dtype(w.dtype)
        if d == jnp.bool_:
            raise TypeError(f"{where}: kernel {path!r} would be merged as bool, which cannot hold "
                            "a LoRA update; pass a float dtype=")
        if jnp.issubdtype(d, jnp.integer) and rounding is None:
            src = "dtype=" if out is not None else "the kernel's dtype"
            raise TypeError(f"{where}: kernel {path!r} would be merged as {d.name} ({src}): "
                            "casting kernel + update to integers silently truncates the update; "
                            "pass int_rounding='nearest' to round (clipped to the dtype's range), "
                            "or a float dtype=")


def cast_merged(x: jax.Array, dtype: Any, rounding: str | None) -> jax.Array:
    """``x`` in ``dtype``: integers rounded half to even and clipped to the dtype's range."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.integer) and rounding == "nearest":
        info = jnp.iinfo(dtype)
        return jnp.clip(jnp.round(x), info.min, info.max).astype(dtype)
    return x.astype(dtype)


def dense_as(w: Any, dtype: Any, rounding: str | None) -> jax.Array:
    """A quantized base leaf, dequantized to ``dtype`` (integers rounded as in merge)."""
    if dtype is not None and jnp.issubdtype(jnp.dtype(dtype), jnp.integer):
        return cast_merged(protocols.dense(w, jnp.float32), dtype, rounding)
    return protocols.dense(w, dtype)
