"""Choosing the parameters to adapt and each one's rank, alpha and layout.

Targets are regexes over '/'-joined paths (``re.fullmatch``), :class:`lora_jax.Rule` lists
(first match wins), or by default the weights a traced model multiplies by (``layouts``) or
the weights named ``kernel``/``w``/``weight``. A target's layout comes from a rule's
``roles``, explicit ``in_axes``/``stack_axes``, the traced layouts, or its name, in that order.
Shared by :func:`lora_jax.init` and :func:`lora_jax.adalora.init`.

>>> import jax.numpy as jnp
>>> spec = resolve_targets({"mlp": {"kernel": jnp.ones((8, 4))}}, r=2, alpha=None,
...                        targets=None, exclude=None, rules=None, in_axes=None,
...                        stack_axes=None)
>>> spec["mlp/kernel"]["roles"], spec["mlp/kernel"]["r"], spec["mlp/kernel"]["alpha"]
('io', 2, 2.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from lora_jax import layouts as Lay
from lora_jax import paths as P
from lora_jax import protocols

PyTree = Any


def resolve_targets(
    params: PyTree,
    *,
    r: int | np.integer,
    alpha: float | None,
    targets: P.Pattern | None,
    exclude: P.Pattern | None,
    rules: Sequence[P.Rule] | None,
    in_axes: int | Mapping[str, int] | None,
    stack_axes: int | Mapping[str, int] | None,
    layouts: Mapping[str, Any] | None = None,
) -> dict[str, dict]:
    """Chooses the targeted paths and their settings; raises on bad input.

    A target's layout (its roles string) comes from, in order: a matching rule's ``roles``;
    explicit ``in_axes``/``stack_axes`` (argument or rule); ``layouts`` (from
    :func:`lora_jax.trace`); the parameter's name (:func:`lora_jax.layouts.from_names`).

    Returns ``{path: dict(shape, leaf, r, alpha, roles, in_axes, stack_axes)}``.
    """
    flat = P.flatten(params)
    target_pats = P.as_patterns(targets)
    exclude_pats = P.as_patterns(exclude)
    rules = tuple(rules or ())
    for pat in target_pats + exclude_pats:
        P.check_pattern(pat, "target pattern")
    Lay.check_layouts(layouts, "init")

    if target_pats:
        for pat in target_pats:
            if not any(P.matches(path, (pat,)) for path, _ in flat):
                raise ValueError(
                    f"target pattern {pat!r} matches no parameter; paths look like "
                    f"{_examples(flat)}"
                )
        cands = [(p, x) for p, x in flat if P.matches(p, target_pats)]
    else:
        if layouts is not None:
            dense = {p for p, w in layouts.items() if w.kind == "dense"}
            cands = [(p, x) for p, x in flat if p in dense]
            what = "weights that the traced function reads with a matmul"
        else:
            cands = [(p, x) for p, x in flat if P.is_default_target(p, x)]
            what = "float weights named " + "/".join(P.KERNEL_NAMES) + " with >= 2 axes"
        if not cands:
            raise ValueError(
                f"no parameter selected for LoRA: the default targets are {what}, and "
                f"there are none; paths look like {_examples(flat)}. Pass targets= (regexes "
                "over these paths)" + ("" if layouts is not None else
                                       " or layouts=lora_jax.trace(fn, params, *args)"))
        if rules:
            for rule in rules:
                if rule.r != 0 and not any(P.matches(p, (rule.pattern,)) for p, _ in cands):
                    raise ValueError(
                        f"rule pattern {rule.pattern!r} matches no kernel; kernels are "
                        f"{_examples(cands)}"
                    )
            cands = [(p, x) for p, x in cands if any(P.matches(p, (ru.pattern,)) for ru in rules)]
    cands = [(p, x) for p, x in cands if not P.matches(p, exclude_pats)]
    if not cands:
        raise ValueError(
            "no parameter selected for LoRA (targets="
            f"{targets!r}, exclude={exclude!r}); paths look like {_examples(flat)}"
        )

    out = {}
    for path, x in cands:
        rule = next((ru for ru in rules if P.matches(path, (ru.pattern,))), None)
        rr = r if rule is None or rule.r is None else rule.r
        if rr == 0:
            continue
        aa = rule.alpha if rule is not None and rule.alpha is not None else alpha
        aa = float(rr if aa is None else aa)
        shape = tuple(getattr(x, "shape", ()))
        dtype = getattr(x, "dtype", None)
        if not P.is_float(x):
            raise TypeError(f"LoRA target {path!r} has dtype {dtype}, expected a float kernel")
        roles = _roles_for(path, shape, rule, in_axes, stack_axes, layouts)
        stack, ins, outs = Lay.split(roles, shape)
        n_in, n_out = math.prod(ins), math.prod(outs)
        if not isinstance(rr, (int, np.integer)) or isinstance(rr, bool) or not (
                1 <= rr <= min(n_in, n_out)):
            raise ValueError(
                f"LoRA target {path!r} (shape {shape}, roles {roles!r}): rank r={rr!r} must be "
                f"an integer between 1 and min(in, out) = min({n_in}, {n_out}) = "
                f"{min(n_in, n_out)}"
            )
        _check_finite(path, x)
        out[path] = dict(leaf=x, shape=shape, r=int(rr), alpha=aa, roles=roles,
                         in_axes=len(ins), stack_axes=len(stack))
    if not out:
        raise ValueError("every selected parameter has rank 0: no LoRA target left")
    return out


def _roles_for(path, shape, rule, in_axes, stack_axes, layouts) -> str:
    """A target's roles; see :func:`resolve_targets` for the order of precedence."""
    if rule is not None and rule.roles is not None:
        return Lay.check(rule.roles, shape, f"Rule {rule.pattern!r} at {path!r}")
    sa = P.setting_for(stack_axes, path, rule.stack_axes if rule else None, None)
    ia = P.setting_for(in_axes, path, rule.in_axes if rule else None, None)
    traced = layouts.get(path) if layouts is not None else None
    if sa is None and ia is None and traced is not None and traced.roles is not None:
        return Lay.check(traced.roles, shape, f"traced layout of {path!r}")
    sa = sa or 0
    if len(shape) - sa < 2:
        raise ValueError(
            f"LoRA target {path!r} has shape {shape} ({sa} stack axes), expected a kernel "
            "with at least two axes"
        )
    if ia is None:
        ia = P.default_in_axes(path, shape, sa)
    core = shape[sa:]
    if not 1 <= ia < len(core):
        raise ValueError(
            f"LoRA target {path!r}: in_axes={ia} does not split kernel shape {core} into "
            "input and output axes"
        )
    return Lay.canonical(len(shape), ia, sa)


def _examples(flat, n=4) -> str:
    names = [p for p, _ in flat[:n]]
    return repr(names) + (" ..." if len(flat) > n else "")


def _check_finite(path: str, x: Any) -> None:
    concrete = isinstance(x, (np.ndarray, np.generic, jax.Array))
    if not concrete or protocols.is_base_leaf(x) or isinstance(x, jax.core.Tracer):
        return  # abstract (ShapeDtypeStruct), traced or quantized: nothing to read
    arr = np.asarray(x, dtype=np.float32) if "bfloat16" in str(x.dtype) else np.asarray(x)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(f"base parameter {path!r} contains {bad} NaN/Inf values")
