"""Per-example routing: ``apply(fn)(base, stack, *args, adapter_ids=ids)``.

Each example gets its own slot of the stack. The call is ``jax.vmap`` over the examples:
inside, ``fn`` sees one example (its batch axis kept, of size 1) and a plain rank-R adapter
picked from the stack (:meth:`StackedLora.select`), and every use of a targeted weight
takes the unmerged fast path ``y = x·W0 + s_k·(x·A_k)·B_k``. The base is not batched, so
``x·W0`` stays one matmul over all rows; only the thin low-rank matmuls are per example.
Because ``vmap`` batches every primitive, this works for any model whose examples do not
interact (attention within an example, a KV cache, ``scan`` over layers, remat), under
``jit``, ``grad`` and an outer ``vmap``; and the ids are data, so one trace serves every
assignment of adapters to rows.

Batch axes: each array argument whose leading axis has size ``len(ids)`` is batched along
it; one with no axis of that size is shared by all rows. An argument that has the size only
on another axis is refused (8 ids for a batch of 2 with 8 features would otherwise batch the
features): pass ``batch_axes=``, a prefix of ``(args, kwargs)`` as ``vmap``'s ``in_axes``
(``None``: shared by all rows), when the batch is not the leading axis. Outputs are put back
with the batch axis where ``fn`` itself puts it (found by comparing with ``fn``'s output for
the whole batch).

Routing (``routing=``): ``"gather"`` (the default), ``"onehot"`` or ``"grouped"``
(:mod:`lora_jax.multi.grouped`), see :meth:`StackedLora.select`; all give the same values.
Gather is the default everywhere: on XLA:CPU it was fastest at K = 8 and 64, prefill and
decode, forward and train (``benchmarks/RESULTS.md``).

Ids (:func:`lora_jax.multi.adapter_ids`): one per row; concrete ones are checked (range
``[-1, K)``, names, integer dtype). Traced ids (under ``jit``) cannot be: a row whose id is
outside ``[-1, K)`` gets the base alone (its adapter update is masked to zero, in every
routing), never another adapter's factors. To have such ids raise instead, wrap the jitted
function in ``jax.experimental.checkify.checkify`` (the range is a ``checkify.debug_check``
in :func:`lora_jax.multi.adapter_ids`, a no-op otherwise) and call ``err.throw()``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import paths as P
from lora_jax import protocols
from lora_jax.leaves import is_lowrank, leaves
from lora_jax.multi.leaf import ROUTINGS
from lora_jax.multi.stack import adapter_ids as resolve_ids
from lora_jax.multi.stack import is_stacked


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or isinstance(x, jax.core.Tracer)


def _infer_axis(path: str, x, n: int) -> int | None:
    shape = tuple(np.shape(x))
    if shape and shape[0] == n:
        return 0
    if n in shape[1:]:
        raise ValueError(
            f"apply: {n} adapter_ids, but argument {path!r} of shape {shape} has {shape[0]} "
            f"rows on its leading axis (size {n} only on axis {shape.index(n, 1)}); pass one "
            "id per row, or batch_axes= (a prefix of (args, kwargs), as vmap's in_axes) if "
            "the batch is not the leading axis")
    return None


def _axes(args, kwargs, n: int, batch_axes) -> list:
    pairs, _ = jax.tree_util.tree_flatten_with_path((args, kwargs))
    if batch_axes is None:
        axes = [(_infer_axis(P.path_str(kp), x, n) if _is_array(x) else None) for kp, x in pairs]
        if all(a is None for a in axes):
            shapes = [f"{P.path_str(kp)}: {tuple(np.shape(x))}" for kp, x in pairs if _is_array(x)]
            raise ValueError(f"apply: cannot find the batch axis: no argument has a leading "
                             f"axis of size {n} = len(adapter_ids) (arguments {shapes}); pass "
                             "one id per row, or batch_axes=")
        return axes
    is_ax = lambda x: x is None or isinstance(x, int)  # noqa: E731
    try:
        full = jax.tree.map(lambda ax, sub: jax.tree.map(lambda _: ax, sub), batch_axes,
                            (args, kwargs), is_leaf=is_ax)
    except ValueError as e:
        raise ValueError(f"apply: batch_axes {batch_axes!r} is not a prefix of (args, kwargs): "
                         f"{e}") from None
    axes = jax.tree.leaves(full, is_leaf=lambda x: x is None)
    for (kp, x), ax in zip(pairs, axes):
        if ax is not None and (not _is_array(x) or not -np.ndim(x) <= ax < np.ndim(x)
                               or np.shape(x)[ax] != n):
            size = (np.shape(x)[ax] if _is_array(x) and -np.ndim(x) <= ax < np.ndim(x)
                    else "no such axis")
            raise ValueError(f"apply: batch_axes gives axis {ax} for {P.path_str(kp)!r} of "
                             f"shape {tuple(np.shape(x))} (size: {size}), but there are {n} "
                             "adapter_ids: one per row is needed")
    return [None if ax is None else ax % np.ndim(x) for (_, x), ax in zip(pairs, axes)]


def _out_axis(path: str, per: tuple, full: tuple, n: int, dtype) -> int | None:
    for j in range(len(per)):
        if per[j] == 1 and full[j] == n and per[:j] + per[j + 1:] == full[:j] + full[j + 1:]:
            return j
    if per == full and jnp.issubdtype(dtype, jnp.integer):
        return None  # the same for every row (a cache length, a step count)
    raise ValueError(f"apply: output {path!r} has no batch axis (one example gives {per}, the "
                     f"batch {full}); with adapter_ids, fn must keep examples independent: "
                     "reduce over the batch (a mean loss) outside the applied function")


def run(core_run, fn, base, lora, args, kwargs, *, adapter_ids, batch_axes=None,
        routing="gather", rng=None, **run_kw):
    """``core_run`` (:func:`lora_jax.transform.api.run`) per example; see the module doc."""
    lmap = leaves(lora)
    if not any(is_stacked(x) for x in lmap.values()):
        raise TypeError("apply: adapter_ids= needs a stack of adapters (lora_jax.stack)")
    if routing not in ROUTINGS:
        raise ValueError(f"apply: routing must be one of {ROUTINGS}, got {routing!r}")
    ids = resolve_ids(lora, adapter_ids)
    n = ids.shape[0]
    pairs, treedef = jax.tree.flatten((args, kwargs))
    axes = _axes(args, kwargs, n, batch_axes)
    dyn = [i for i, (x, ax) in enumerate(zip(pairs, axes)) if ax is not None]

    def call(i, row, batched):
        flat = list(pairs)
        for j, x in zip(dyn, batched):
            flat[j] = jnp.expand_dims(x, axes[j])
        a, k = jax.tree.unflatten(treedef, flat)
        routed = jax.tree.map(lambda x: x.select(i, routing) if is_stacked(x) else x, lora,
                              is_leaf=is_lowrank)
        r = None if rng is None else jax.random.fold_in(rng, row)
        return core_run(fn, base, routed, a, k, rng=r, unmerged=True, **run_kw)

    out = jax.vmap(call, in_axes=(0, 0, [axes[j] for j in dyn]))(
        ids, jnp.arange(n), [pairs[j] for j in dyn])

    # Where does fn put the batch axis? Compare one example's output with the whole batch's.
    def whole(b, arrays):
        flat = list(pairs)
        for j, x in zip(arr, arrays):
            flat[j] = x
        a, k = jax.tree.unflatten(treedef, flat)
        return fn(b, *a, **k)

    arr = [j for j, x in enumerate(pairs) if _is_array(x)]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base,
                            is_leaf=protocols.is_base_leaf)
    shapes = jax.eval_shape(whole, abstract, [pairs[j] for j in arr])
    o_pairs, o_def = jax.tree_util.tree_flatten_with_path(out)
    f_leaves = jax.tree.leaves(shapes)
    res = []
    for (kp, o), f in zip(o_pairs, f_leaves):
        j = _out_axis(P.path_str(kp), tuple(o.shape[1:]), tuple(f.shape), n, o.dtype)
        res.append(o[0] if j is None else jnp.moveaxis(jnp.squeeze(o, j + 1), 0, j))
    return jax.tree.unflatten(o_def, res)
