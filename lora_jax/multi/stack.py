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
from jax.experimental import checkify

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
        out: dict[str, PyTree] = {}
        keys: dict[str, Any] = {}
        for k, v in adapters.items():
            name = str(k)
            if name in out:
                raise ValueError(f"stack: adapter names {keys[name]!r} and {k!r} are both "
                                 f"{name!r} as strings (slot names); give them distinct names")
            out[name], keys[name] = v, k
    elif isinstance(adapters, Sequence) and not isinstance(adapters, str):
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
      adapters: ``{name: LoRA tree}`` (or a list: names ``"0"``, ``"1"``, ...); names are
        converted to ``str`` and must stay distinct. Every tree holds adapter leaves (LoRA,
        or any kind whose update is ``scale·A·B``) of the same layout at a path; a path one
        adapter lacks is a zero slot for it. Adapters of different dtypes stack in the
        dtype that holds them all exactly (bfloat16 with float32: float32), so every slot
        keeps its adapter's values.

    Returns:
      A LoRA tree of :class:`StackedLora` leaves; run it with
      ``apply(fn)(base, stack, *args, adapter_ids=ids)``.

    Raises:
      ValueError: adapters disagree on a path's kernel shape or layout (naming both), two
        names are equal as strings (``1`` and ``"1"``), or a name is ``"__base__"``.
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


def add(tree: PyTree, name: Any, lora: PyTree) -> PyTree:
    """The stack with ``lora`` added as a new last slot ``name`` (a string, as
    :func:`stack`'s names; the padded rank grows if ``lora``'s rank is larger, the dtype is
    promoted if ``lora``'s needs it)."""
    key = f"{name}"
    if key in names(tree):
        raise ValueError(f"add: the stack already has {key!r}; use replace")
    return stack({**unstack_untrimmed(tree), key: lora})


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
      ValueError: ``lora`` has a path the stack lacks, a layout that differs, a rank
        above the padded rank, or a dtype the stack's cannot hold exactly (a float32
        adapter in a bfloat16 stack; use :func:`remove` and :func:`add`, which re-pad and
        promote).
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
        require_linear(leaf, name, path, "replace")
        fa, fb = leaf.factors()
        for f, have in ((fa, x.a.dtype), (fb, x.b.dtype)):
            if jnp.result_type(f.dtype, have) != have:
                raise ValueError(f"replace: {name!r}'s new adapter at {path!r} is {f.dtype}, "
                                 f"which the stack's {have} would round; use remove and add "
                                 "(the stack is promoted to hold both)")
        try:
            out[path] = x.set_slot(k, fa, fb, leaf.scale)
        except ValueError as e:
            raise ValueError(f"replace: {path!r}: {e}") from None
    return from_leaves(out)


def _slot_error(bad: list[tuple[int, Any]], ns: tuple[str, ...]) -> IndexError:
    rows = [r for r, _ in bad]
    ids = [i for _, i in bad]
    return IndexError(
        f"adapter_ids: {ids} (at rows {rows}) are not slots of this stack of K={len(ns)} "
        f"adapters {list(ns)}: ids are 0..{len(ns) - 1}, or -1 / None / {BASE!r} for the base "
        "alone")


def _check_range(values: np.ndarray, ns: tuple[str, ...]) -> None:
    bad = np.nonzero((values < -1) | (values >= len(ns)))[0]
    if bad.size:
        raise _slot_error([(int(r), int(values[r])) for r in bad[:8]], ns)


def _id_of(row: int, i: Any, ns: tuple[str, ...]) -> int | str:
    """One concrete id as a slot index, or the name itself if the stack lacks it."""
    if i is None or (isinstance(i, str) and i == BASE):
        return -1
    if isinstance(i, str):
        return ns.index(i) if i in ns else i
    if isinstance(i, jax.core.Tracer):
        raise TypeError(f"adapter_ids: row {row} is a traced value; under jit pass the ids as "
                        "one (batch,) integer array (multi.adapter_ids(stack, names))")
    if isinstance(i, (jax.Array, np.ndarray, np.generic)) and np.ndim(i) == 0:
        i = np.asarray(i)
        if np.issubdtype(i.dtype, np.integer):
            return int(i)
        kind = str(i.dtype)
    elif isinstance(i, (int, np.integer)) and not isinstance(i, bool):
        return int(i)
    else:
        kind = type(i).__name__
    raise TypeError(f"adapter_ids: row {row} is {i!r} of type {kind}; an id is an integer slot "
                    f"index, an adapter name, or -1 / None / {BASE!r} for the base alone")


def _traced_ids(ids: jax.Array, k: int) -> jax.Array:
    """Traced ids as int32, every id outside ``[-1, K)`` made ``-1`` (the base alone) before
    the cast, so that no wide or unsigned id wraps round to a slot; a ``checkify`` check."""
    if jnp.issubdtype(ids.dtype, jnp.unsignedinteger):
        valid = ids < k
    else:
        valid = (ids >= -1) & (ids < k)
    checkify.debug_check(jnp.all(valid), f"adapter_ids {{ids}} has ids outside [-1, {k}) for a "
                         f"stack of K={k} adapters; those rows got the base alone", ids=ids)
    return jnp.where(valid, ids.astype(jnp.int32), jnp.int32(-1))


def adapter_ids(tree: PyTree, ids: Any) -> jax.Array:
    """Per-example slot indices: one id per row (a list, a tuple or a ``(batch,)`` array)
    to an int32 ``(batch,)`` array. An id is an adapter name or an integer slot in
    ``0..K-1``; ``"__base__"``, ``None`` and ``-1`` are the base alone.

    Concrete ids are checked: an id outside ``[-1, K)``, a name the stack lacks, a non-integer
    id (a float, a bool) or a single id instead of one per row raises, naming the ids and
    their rows. A traced array (under ``jit``) can only be checked for its dtype and shape;
    a row whose traced id is outside ``[-1, K)`` gets the base alone (its adapter update is
    masked to zero, :meth:`StackedLora.select`), never another adapter.

    Raises:
      IndexError: integer ids outside ``[-1, K)``.
      KeyError: names not in the stack (listing the names it has).
      TypeError: a scalar, a float/bool id or array, or an array that is not ``(batch,)``.
    """
    ns = names(tree)
    if isinstance(ids, jax.core.Tracer):
        if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.ndim != 1:
            raise TypeError(f"adapter_ids: expected a (batch,) integer array, got "
                            f"{ids.dtype}{list(ids.shape)}")
        return _traced_ids(ids, len(ns))
    if isinstance(ids, (jax.Array, np.ndarray, np.generic)):
        values = np.asarray(ids)
        if values.dtype.kind in "UO" and values.ndim == 1:
            ids = values.tolist()  # names: checked one by one below
        elif values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
            what = "a single id" if values.ndim == 0 else f"{values.dtype}{list(values.shape)}"
            raise TypeError(f"adapter_ids: expected one integer id per row, a (batch,) integer "
                            f"array, got {what}" + (
                                " (float or bool ids are not slot indices)"
                                if values.ndim == 1 else ""))
        else:
            _check_range(values, ns)
            return jnp.asarray(values, jnp.int32)
    if isinstance(ids, (str, int, float, np.generic)) or not isinstance(ids, (Sequence,)):
        raise TypeError(
            f"adapter_ids: expected one id per row (a list, tuple or (batch,) array), got "
            f"{ids!r}; for the same adapter on every row pass [{ids!r}] * batch (or run "
            "lora_jax.unstack(stack)[name] without adapter_ids)")
    if len(ids) == 0:
        raise ValueError("adapter_ids: no ids given (one per row is needed)")
    out = [_id_of(row, i, ns) for row, i in enumerate(ids)]
    missing = [(row, i) for row, i in enumerate(out) if isinstance(i, str)]
    if missing:
        raise KeyError(f"adapter_ids: no adapter {missing[0][1]!r} (rows "
                       f"{[r for r, _ in missing][:8]}: {[i for _, i in missing][:8]}); the "
                       f"stack has {list(ns)} (and {BASE!r})")
    bad = [(row, i) for row, i in enumerate(out) if not -1 <= int(i) < len(ns)]
    if bad:
        raise _slot_error(bad[:8], ns)
    return jnp.asarray(out, jnp.int32)
