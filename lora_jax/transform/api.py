"""``apply`` and ``report``: the public entry points of the transform.

``apply(fn)`` traces ``fn`` to a jaxpr (:mod:`lora_jax.tracing`) and evaluates it with the
interpreter (:mod:`.interpreter`) and its rules; ``report`` runs the same trace abstractly
and returns what each use of each weight took.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax import paths as P
from lora_jax import protocols, tracing
from lora_jax import validation as V
from lora_jax.leaves import leaves
from lora_jax.merging import check_fits, merge
from lora_jax.train import trainable_base_paths
from lora_jax.transform.interpreter import Config, concrete, eval_jaxpr, tag
from lora_jax.transform.report import Report, WeightReport


def apply(
    fn: Callable,
    *,
    strict: bool = False,
    mode: str = "fast",
    modules_to_save: P.Pattern | None = None,
    bias: str = "none",
    compute_dtype: Any = None,
) -> Callable:
    """Wraps ``fn(params, *args, **kwargs)`` as ``f(base, lora, *args, **kwargs)``.

    ``f(base, lora, ...)`` equals ``fn(merge(base, lora), ...)`` up to float rounding, and
    gradients flow to the adapters only: frozen base weights never get a gradient computed.

    Args:
      fn: any function whose first argument is the parameter tree: ``model.apply``, an NNX
        model as :func:`lora_jax.nnx.functional(graphdef) <lora_jax.nnx.functional>`
        (``fn(params, rest, x) -> (y, rest)``, returning the updated RNG counts), a plain
        function. A function that reads an NNX RNG count and does not return its update
        (``lambda s, x: nnx.merge(graphdef, s)(x)`` with dropout) gets a ``UserWarning``: it
        would draw the same random numbers on every call.
      strict: raise :class:`LoraFallbackError` instead of falling back to the merged weight.
      mode: ``"fast"`` (trace and rewrite) or ``"merged"`` (merge the weights, then run
        ``fn``; the simple reference path).
      modules_to_save: base paths (regexes) that keep their gradients, for full training.
      bias: ``"none"``, ``"lora_only"`` or ``"all"``: which biases keep their gradients.
      compute_dtype: if set (e.g. ``jnp.bfloat16``), every matmul with a targeted or
        quantized weight runs in this dtype: the weight is dequantized/merged and cast at its
        use, the input cast, the result cast back to the model's dtype.

    Returns:
      ``f(base, lora, *args, lora_rng=None, **kwargs)``; ``lora_rng`` drives LoRA dropout.
      With a stack of adapters (:func:`lora_jax.stack`) as ``lora``, pass
      ``adapter_ids=`` (one slot index or name per example, ``-1``/``"__base__"``: the base
      alone), optionally ``batch_axes=`` and ``routing=`` (``"gather"``, the default;
      ``"onehot"``; ``"grouped"``: :mod:`lora_jax.multi.routing`).
      Concrete ids are checked (a single id instead of one per row, float or bool ids, ids
      outside ``[-1, K)`` and names the stack lacks raise: :func:`lora_jax.multi.adapter_ids`);
      traced ids under ``jit`` cannot be, and a row whose id is outside ``[-1, K)`` gets the
      base alone.
      Python scalars and other non-array arguments are static (closed over when tracing).
    """
    if mode not in ("fast", "merged"):
        raise ValueError(f"mode must be 'fast' or 'merged', got {mode!r}")
    if not callable(fn):
        raise TypeError(f"apply: fn must be a function of the parameter tree (e.g. model.apply),"
                        f" got a {type(fn).__name__}; call apply(fn)(base, lora, *args)")

    @functools.wraps(fn)
    def wrapped(base, lora, *args, lora_rng=None, adapter_ids=None, batch_axes=None,
                routing=None, **kwargs):
        if adapter_ids is not None:  # a stack of adapters, one per example
            from lora_jax.multi import routing as R

            return R.run(run, fn, base, lora, args, kwargs, adapter_ids=adapter_ids,
                         batch_axes=batch_axes,
                         routing="gather" if routing is None else routing, rng=lora_rng,
                         strict=strict, mode=mode, modules_to_save=modules_to_save, bias=bias,
                         compute_dtype=compute_dtype)
        if batch_axes is not None or routing is not None:
            raise TypeError("apply: batch_axes= and routing= route a stack of adapters per "
                            "example and need adapter_ids= (one id per example)")
        return run(fn, base, lora, args, kwargs, rng=lora_rng, strict=strict, mode=mode,
                    modules_to_save=modules_to_save, bias=bias, compute_dtype=compute_dtype)

    return wrapped


def report(fn: Callable, base, lora, *args, **kwargs) -> Report:
    """How ``apply(fn)`` computes each use of each adapted (or quantized) weight.

    Traces abstractly (no FLOPs run).

    Returns:
      A :class:`Report`; ``str(report)`` is a readable table, ``report.fallbacks`` lists the
      uses that take the merged weight and why, ``report.unused`` the adapters ``fn`` never
      reads.

    >>> import jax, jax.numpy as jnp, lora_jax
    >>> p = {"w": {"kernel": jnp.ones((4, 3))}}
    >>> lora = lora_jax.init(p, r=2, key=jax.random.key(0))
    >>> rep = lora_jax.report(lambda p, x: x @ p["w"]["kernel"], p, lora, jnp.ones((2, 4)))
    >>> rep["w/kernel"].routes, rep.fallbacks
    (['fast'], [])
    """
    uses: dict = {}
    jax.eval_shape(lambda b, l, a, k: run(fn, b, l, a, k, report=uses), base, lora, args, kwargs)
    lmap = leaves(lora)
    order = list(lmap) + [p for p in uses if p not in lmap]
    return Report({p: WeightReport(p, lmap[p].layout if p in lmap else None,
                                   tuple(uses.get(p, ()))) for p in order})


def run(fn, base, lora, args, kwargs, *, rng=None, strict=False, mode="fast",
         modules_to_save=None, bias="none", report=None, compute_dtype=None, unmerged=False):
    V.base_leaves(base, "apply")
    check_fits(base, lora, where="apply")
    lmap = leaves(lora)
    if any(x.stacked for x in lmap.values()):
        raise TypeError("apply: the LoRA tree is a stack of adapters; pass adapter_ids= (one "
                        "per example) or pick one adapter with lora_jax.unstack")
    keep = trainable_base_paths(base, lora, modules_to_save=modules_to_save, bias=bias)

    def freeze(path, x):
        dtype = getattr(x, "dtype", None)
        if path in keep or protocols.is_base_leaf(x) or dtype is None or not jnp.issubdtype(
                dtype, jnp.floating):
            return x
        return lax.stop_gradient(x)

    base = P.map_with_path(freeze, base)
    if mode == "merged":
        return fn(merge(base, lora), *args, **kwargs)

    jx = tracing.trace(fn, base, args, kwargs)
    if report is None:  # an NNX RNG count read but not returned: the same masks every call
        from lora_jax import nnx as NNX  # flax.nnx loads only for users of apply

        NNX.warn_unreturned_rng(fn, jx.closed.jaxpr, base, args, kwargs, jx.is_dyn)
    invals = []
    for path, x in zip(jx.base_paths, jx.base_leaves):
        if path in lmap or protocols.is_base_leaf(x):
            invals.append(tag(path, x, lmap.get(path)))
        else:
            invals.append(x)
    cfg = Config(strict=strict, rng=rng, report=report, compute_dtype=compute_dtype,
                 unmerged=unmerged)
    outs = concrete(eval_jaxpr(cfg, jx.closed.jaxpr, jx.closed.consts, invals + jx.dyn_vals))
    return jax.tree.unflatten(jx.out_tree, outs)
