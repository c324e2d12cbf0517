"""Building and taking apart stacks of adapters: ``stack``, ``unstack``, ``add``, ``remove``,
``replace``, ``names`` and ``adapter_ids``.

A stack is a LoRA tree with a :class:`~lora_jax.multi.leaf.StackedLora` at every path any of
its adapters targets; an adapter without that path gets a zero slot there. Ranks are padded
with zeros to the largest at each path, which leaves every output unchanged.

>>> import jax, jax.numpy as jnp, lora_jax
>>> p = {"w": {"kernel": jnp.ones((4, 3))}}
>>> s = lora_jax.stack({"x": lora_jax.init(p, r=2, key=jax.random.key(0)),
...                     "y": lora_jax.init(p, r=1, key=jax.random.key(1))})
>>> lora_jax.multi.names(s), lora_jax.multi.adapter_ids(s, ["y", "__base__", "x"]).tolist()
(('x', 'y'), [1, -1, 0])
>>> {k: v["w"]["kernel"].r for k, v in lora_jax.unstack(s).items()}
{'x': 2, 'y': 1}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.leaves import from_leaves, is_lowrank, leaves
from lora_jax.multi.leaf import StackedLora

PyTree = Any
BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


def is_stacked(x: Any) -> bool:
    """True for a stacked adapter leaf."""
    return is_lowrank(x) and x.stacked


def _stacked_leaves(tree: PyTree, where: str) -> dict[str, StackedLora]:
    out = leaves(tree)
    bad = [p for p, x in out.items() if not is_stacked(x)]
    if bad or not out:
        raise TypeError(f"{where}: expected a stack of adapters (from lora_jax.stack); "
                        + (f"{bad[0]!r} is a single adapter" if bad else "the tree has none"))
    return out  # type: ignore[return-value]


def names(tree: PyTree) -> tuple[str, ...]:
    """The adapter names of a stack, in slot order."""
    return next(iter(_stacked_leaves(tree, "names").values())).names


def _named(adapters) -> dict[str, PyTree]:
    if isinstance(adapters, Mapping):
        out = {str(k): v for k, v in adapters.items()}
    elif isinstance(adapters, Sequence):
        out = {str(i): v for i, v in enumerate(adapters)}
    else:
        raise TypeError(f"stack: adapters must be a dict {{name: LoRA tree}} or a list, got a "
                        f"{type(adapters).__name__}")
    if not out:
        raise ValueError("stack: no adapters given")
    if BASE in out:
        raise ValueError(f"stack: {BASE!r} is reserved for the base-only slot (adapter id -1)")
    return out


def require_linear(leaf, name: str, path: str, where: str) -> None:
    """Raise unless ``leaf``'s update is ``scale·A·B`` alone (not DoRA's rescale, not a stack)."""
    if leaf.linear_part() is not leaf or leaf.stacked:
        raise ValueError(
            f"{where}: adapter {name!r} at {path!r} is a {leaf.kind} leaf, whose update is not "
            "scale·A·B alone (LoRA, rsLoRA, PiSSA, OLoRA, LoftQ and AdaLoRA adapters are)")
    from lora_jax.init_schemes import require_shared_base  # PiSSA/OLoRA/LoftQ: own base only

    require_shared_base(leaf, name, path, where)


def _meta(leaf) -> tuple:
    return (leaf.in_axes, leaf.stack_axes, leaf.layout, float(leaf.dropout))


def stack(adapters: Mapping[str, PyTree] | Sequence[PyTree]) -> PyTree:
    """One tree holding K adapters for the same base (ranks zero-padded to the largest).

    Args:
      adapters: ``{name: LoRA tree}`` (or a list: names ``"0"``, ``"1"``, ...). Every tree
        holds adapter leaves (LoRA, or any kind whose update is ``scale·A·B``) of the same
        layout at a path; a path one adapter lacks is a zero slot for it.

    Returns:
      A LoRA tree of :class:`StackedLora` leaves; run it with
      ``apply(fn)(base, stack, *args, adapter_ids=ids)``.

    Raises:
      ValueError: adapters disagree on a path's kernel shape or layout (naming both).
    """
    named = _named(adapters)
    per = {n: leaves(t) for n, t in named.items()}
    paths = list(dict.fromkeys(p for m in per.values() for p in m))
    out = {}
    for path in paths:
        have = {n: m[path] for n, m in per.items() if path in m}
        first_name, first = next(iter(have.items()))
        for n, leaf in have.items():
            require_linear(leaf, n, path, "stack")
            if _meta(leaf) != _meta(first) or leaf.kernel_shape != first.kernel_shape:
                raise ValueError(
                    f"stack: adapters {first_name!r} and {n!r} differ at {path!r}: kernel "
                    f"{first.kernel_shape} vs {leaf.kernel_shape}, (in_axes, stack_axes, "
                    f"layout, dropout) {_meta(first)} vs {_meta(leaf)}")
        slots = [None if n not in have else (*have[n].factors(), have[n].scale)
                 for n in named]
        out[path] = StackedLora.of(slots, tuple(named), first)
    return from_leaves(out)


def unstack(tree: PyTree) -> dict[str, PyTree]:
    """``{name: LoRA tree}`` of a stack: each adapter with its padding cut off (trailing
    rank components zero in both factors) and ``alpha = scale·r`` (the same update; an
    rsLoRA adapter comes back as plain LoRA with that alpha). A slot that is zero
    everywhere at a path (the adapter did not target it) is left out there."""
    st = _stacked_leaves(tree, "unstack")
    out: dict[str, dict] = {n: {} for n in names(tree)}
    for path, leaf in st.items():
        for k, n in enumerate(leaf.names):
            w = leaf.trimmed_slot(k)
            if w is not None:
                out[n][path] = w
    return {n: from_leaves(m) for n, m in out.items()}


def _map_stacked(tree, fn):
    return jax.tree.map(lambda x: fn(x) if is_stacked(x) else x, tree, is_leaf=is_lowrank)


def remove(tree: PyTree, name: str) -> PyTree:
    """The stack without adapter ``name``."""
    ns = names(tree)
    if name not in ns:
        raise KeyError(f"remove: no adapter {name!r} in the stack; it has {list(ns)}")
    if len(ns) == 1:
        raise ValueError("remove: a stack keeps at least one adapter")
    k = ns.index(name)
    return _map_stacked(tree, lambda x: x.keep_slots([i for i in range(len(ns)) if i != k]))


def add(tree: PyTree, name: str, lora: PyTree) -> PyTree:
    """The stack with ``lora`` added as a new last slot ``name`` (the padded rank grows if
    ``lora``'s rank is larger)."""
    if name in names(tree):
        raise ValueError(f"add: the stack already has {name!r}; use replace")
    return stack({**unstack_untrimmed(tree), name: lora})


def unstack_untrimmed(tree: PyTree) -> dict[str, PyTree]:
    """``{name: LoRA tree}`` with every slot at the padded rank (exact, jittable)."""
    st = _stacked_leaves(tree, "unstack")
    ns = names(tree)
    return {n: from_leaves({p: x.slot(k) for p, x in st.items()}) for k, n in enumerate(ns)}


def replace(tree: PyTree, name: str, lora: PyTree) -> PyTree:
    """Hot swap: slot ``name`` holds ``lora`` instead (its rank ≤ the padded rank at every
    path). The tree structure is unchanged, so a jitted step or decode loop does not
    retrace.

    Raises:
      ValueError: ``lora`` has a path the stack lacks, a layout that differs, or a rank
        above the padded rank (use :func:`remove` and :func:`add`, which re-pad).
    """
    ns = names(tree)
    if name not in ns:
        raise KeyError(f"replace: no adapter {name!r} in the stack; it has {list(ns)}")
    k = ns.index(name)
    st = _stacked_leaves(tree, "replace")
    new = leaves(lora)
    extra = set(new) - set(st)
    if extra:
        raise ValueError(f"replace: {name!r}'s new adapter has {sorted(extra)[0]!r}, which the "
                         "stack lacks; use remove and add")
    out = {}
    for path, x in st.items():
        leaf = new.get(path)
        if leaf is None:  # the new adapter does not target this kernel: a zero slot
            a0, b0 = x.slot(k).factors()
            out[path] = x.set_slot(k, jnp.zeros_like(a0), jnp.zeros_like(b0), 1.0)
            continue
        if (leaf.in_axes, leaf.stack_axes, leaf.layout) != (x.in_axes, x.stack_axes, x.layout):
            raise ValueError(f"replace: {path!r} has layout {leaf.layout!r}, the stack "
                             f"{x.layout!r}")
        try:
            out[path] = x.set_slot(k, *leaf.factors(), leaf.scale)
        except ValueError as e:
            raise ValueError(f"replace: {path!r}: {e}") from None
    return from_leaves(out)


def adapter_ids(tree: PyTree, ids: Any) -> jax.Array:
    """Per-example slot indices: names (or ints) to an int32 array; ``"__base__"``, ``None``
    and ``-1`` are the base alone. Arrays pass through (they may be traced)."""
    if isinstance(ids, (jax.Array, np.ndarray)):
        if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.ndim != 1:
            raise TypeError(f"adapter_ids: expected a (batch,) integer array, got "
                            f"{ids.dtype}{list(ids.shape)}")
        return jnp.asarray(ids, jnp.int32)
    ns = names(tree)
    out = []
    for i in ids:
        if i is None or i == BASE:
            out.append(-1)
        elif isinstance(i, str):
            if i not in ns:
                raise KeyError(f"adapter_ids: no adapter {i!r}; the stack has {list(ns)} "
                               f"(and {BASE!r})")
            out.append(ns.index(i))
        else:
            j = int(i)
            if not -1 <= j < len(ns):
                raise IndexError(f"adapter_ids: {j} is not a slot of a stack of {len(ns)} "
                                 "(-1: base only)")
            out.append(j)
    return jnp.asarray(out, jnp.int32)
