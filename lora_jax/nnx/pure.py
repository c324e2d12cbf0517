"""Flax NNX models under :func:`lora_jax.apply`.

An NNX module keeps its RNG streams as state (an ``RngCount`` and an ``RngKey`` per stream):
``nnx.Dropout`` folds the count into the key and increments it on every call. A pure function
of the model state only draws fresh random numbers if it returns the incremented count and the
caller passes it back. :func:`functional` gives that function; :func:`warn_unreturned_rng`
is the check behind the warning that :func:`lora_jax.apply` gives when a function reads an
RNG count and drops its update (the same dropout masks on every step).

>>> import jax, jax.numpy as jnp, lora_jax
>>> from flax import nnx
>>> class MLP(nnx.Module):
...     def __init__(self, rngs):
...         self.l1, self.l2 = nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)
...         self.drop = nnx.Dropout(0.5, rngs=rngs)
...     def __call__(self, x):
...         return self.l2(self.drop(nnx.relu(self.l1(x))))
>>> graphdef, params, rest = nnx.split(MLP(nnx.Rngs(0)), nnx.Param, ...)
>>> lora = lora_jax.init(params, r=2, key=jax.random.key(1))
>>> fwd = lora_jax.apply(lora_jax.nnx.functional(graphdef))
>>> x = jnp.ones((3, 4))
>>> y1, rest = fwd(params, lora, rest, x)
>>> y2, rest = fwd(params, lora, rest, x)   # the updated RNG count: new dropout masks
>>> bool((y1 != y2).any())
True
"""

from __future__ import annotations

import re
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.extend as jex
import jax.numpy as jnp
from flax import nnx

from lora_jax import paths as P
from lora_jax import protocols

PyTree = Any


def functional(graphdef: nnx.GraphDef, method: str | Callable = "__call__", *,
               param_filter: Any = nnx.Param) -> Callable:
    """An NNX model as a pure function that returns its updated non-parameter state.

    ``fn(params, rest, *args, **kwargs) -> (out, new_rest)`` merges ``graphdef`` with
    ``params`` and ``rest`` (as from ``nnx.split(model, nnx.Param, ...)``), calls the model and
    returns its output with the model's non-``Param`` state after the call: RNG counts (so
    that dropout draws new masks on the next call), batch statistics, caches. Pass ``new_rest``
    back in on the next step. Wrap it with :func:`lora_jax.apply`, the base being ``params``.

    Args:
      graphdef: the model's graph definition, from ``nnx.split``.
      method: the method to call, by name (default ``"__call__"``), or a function
        ``method(model, *args, **kwargs)``.
      param_filter: the NNX filter that split off ``params`` (default ``nnx.Param``); everything
        else is ``rest`` and comes back.

    Returns:
      ``fn(params, rest, *args, **kwargs) -> (out, new_rest)``.

    >>> import jax, jax.numpy as jnp, lora_jax
    >>> from flax import nnx
    >>> graphdef, params, rest = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), nnx.Param, ...)
    >>> y, rest = lora_jax.nnx.functional(graphdef)(params, rest, jnp.ones((1, 3)))
    >>> y.shape
    (1, 2)
    """

    def fn(params, rest, *args, **kwargs):
        model = nnx.merge(graphdef, params, rest)
        call = getattr(model, method) if isinstance(method, str) else (
            lambda *a, **k: method(model, *a, **k))
        out = call(*args, **kwargs)
        return out, nnx.state(model, nnx.Not(param_filter))

    return fn


def trace(model: nnx.Module, *args: Any, method: str | Callable = "__call__", **kwargs: Any):
    """:func:`lora_jax.trace` for an NNX model: every weight's layout as ``model(*args)``
    uses it, for ``layouts=`` of :func:`lora_jax.init`, :class:`lora_jax.nnx.LoRA` and
    :func:`lora_jax.quantize`. Runs no FLOPs.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> lay = trace(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), jnp.ones((1, 3)))
    >>> lay["kernel"].roles
    'io'
    """
    from lora_jax.layouts import trace as trace_layouts

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return trace_layouts(functional(graphdef, method), params, rest, *args, **kwargs)


# ----------------------------------------------------------------------------------------
# Detecting an RNG count that a function reads but does not return

# An RNG count in a tree without NNX Variables (e.g. from ``nnx.to_pure_dict``): an integer
# leaf at ``.../rngs/<stream>/count`` (``nnx.Rngs``) or ``.../rngs/count`` (an ``RngStream``).
_COUNT_PATH = re.compile(r"(.*/)?rngs/(.*/)?count")

_warned_ids: set[int] = set()
_warned_refs: weakref.WeakSet = weakref.WeakSet()


def rng_count_paths(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> list:
    """Per leaf of ``tree`` (flattened with ``is_leaf``): its path if it is an RNG count.

    Returns a list aligned with ``jax.tree_util.tree_flatten(tree, is_leaf)[0]`` holding the
    path of every ``nnx.RngCount`` leaf and ``None`` elsewhere.
    """

    def stop(x):
        return isinstance(x, nnx.Variable) or (is_leaf is not None and is_leaf(x))

    out: list = []
    for kp, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=stop)[0]:
        if isinstance(x, nnx.Variable):
            n = len(jax.tree_util.tree_leaves(x, is_leaf=is_leaf))
            out += [P.path_str(kp) if isinstance(x, nnx.RngCount) else None] * n
        else:
            path = P.path_str(kp)
            dtype = getattr(x, "dtype", None)
            is_int = dtype is not None and jnp.issubdtype(dtype, jnp.integer)  # PRNG keys: False
            out.append(path if is_int and _COUNT_PATH.fullmatch(path) else None)
    return out


def unreturned(jaxpr: jex.core.Jaxpr, counts: Sequence[str | None]) -> list[str]:
    """The RNG counts among ``jaxpr``'s inputs that it reads but returns no update of.

    ``counts[i]`` names input ``i`` if it is an RNG count. A count counts as returned when
    some output of the count's shape and dtype depends on it (``count + 1``); the dropout
    mask depends on it too, but is no integer scalar. Calls are followed as a whole (any
    output of an equation depends on all its inputs), which can only hide a warning.
    """
    dep: dict = {}  # var -> indices of the counts it depends on
    read: set[int] = set()
    for i, (v, name) in enumerate(zip(jaxpr.invars, counts)):
        if name is not None:
            dep[v] = {i}
    if not dep:
        return []
    for eqn in jaxpr.eqns:
        src: set[int] = set()
        for v in eqn.invars:
            if not isinstance(v, jex.core.Literal) and v in dep:
                src |= dep[v]
        if src:
            read |= src
            for o in eqn.outvars:
                if not isinstance(o, jex.core.DropVar):
                    dep[o] = dep.get(o, set()) | src
    returned: set[int] = set()
    inputs = set(jaxpr.invars)
    for o in jaxpr.outvars:
        # A count passed through unchanged is no update: the caller gets the old one back.
        if isinstance(o, jex.core.Literal) or o in inputs or o not in dep:
            continue
        for i in dep[o]:
            # Values of array code (the counts among them) have ShapedArray avals; the
            # AbstractValue that Var.aval is declared as has no shape or dtype.
            a, b = (cast("jax.core.ShapedArray", v.aval) for v in (o, jaxpr.invars[i]))
            if a.shape == b.shape and a.dtype == b.dtype:
                returned.add(i)
    # ``read`` holds indices of named counts only: the filter drops nothing.
    return [c for i in sorted(read - returned) if (c := counts[i]) is not None]


def warn_unreturned_rng(fn: Callable, jaxpr: jex.core.Jaxpr, base: PyTree, args: tuple,
                        kwargs: dict, is_dyn: Sequence[bool]) -> None:
    """Warns (once per ``fn``) if ``jaxpr``, the trace of ``fn``, drops an RNG count update.

    ``jaxpr``'s inputs are the leaves of ``base`` (registered base leaves whole), then those
    leaves of ``(args, kwargs)`` that ``is_dyn`` marks, as in :func:`lora_jax.apply`.
    """
    try:
        if fn in _warned_refs:
            return
    except TypeError:  # not weakly referenceable
        if id(fn) in _warned_ids:
            return
    # A dict flattens in key order, so {"args", "kwargs"} has the leaf order of (args, kwargs).
    dyn = rng_count_paths({"args": args, "kwargs": kwargs})
    counts = rng_count_paths(base, protocols.is_base_leaf) + [p for p, d in zip(dyn, is_dyn) if d]
    lost = unreturned(jaxpr, counts)
    if not lost:
        return
    try:
        _warned_refs.add(fn)
    except TypeError:
        _warned_ids.add(id(fn))
    shown = ", ".join(repr(p) for p in lost[:3]) + (f" and {len(lost) - 3} more" if len(lost) > 3
                                                    else "")
    warnings.warn(
        f"lora_jax.apply({getattr(fn, '__name__', fn)!r}): the function reads the NNX RNG "
        f"count {shown} but does not return its update, so every call draws the same random "
        "numbers (the same dropout masks on every step). Return the model's updated state "
        "and pass it back in: with `graphdef, params, rest = nnx.split(model, nnx.Param, ...)` "
        "and `fwd = lora_jax.apply(lora_jax.nnx.functional(graphdef))`, call "
        "`out, rest = fwd(params, lora, rest, x)`.",
        UserWarning,
        stacklevel=3,
    )
