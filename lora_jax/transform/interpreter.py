"""The interpreter: evaluates a jaxpr with targeted weights flowing through it as tags.

A :class:`Tagged` value stands for a view (casts, reshapes, transposes, constant indexing) of
a targeted or quantized base weight. Equations without one are bound as they are; an
equation with one goes to the rule registered for its primitive (:func:`rule`; the rules
live in :mod:`.rules` and :mod:`.control_flow`), or falls back to the merged weight
``W0 + s·A·B`` for that use (:func:`fallback`), or raises with ``strict``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend as jex

from lora_jax import fast_dot
from lora_jax.leaves import LowRankLeaf
from lora_jax.transform.report import Use


class LoraFallbackError(ValueError):
    """Raised by ``apply(..., strict=True)`` when a targeted weight cannot take the fast path."""


@dataclasses.dataclass(frozen=True)
class Tagged:
    """A (view of a) targeted or quantized base weight flowing through the jaxpr."""

    path: str
    base: Any  # dense array or registered base leaf, kernel-shaped (incl. stack axes)
    lora: LowRankLeaf | None
    ops: tuple  # ((primitive, params), ...) replayed on the kernel to give this view
    axes: tuple | None  # per view dim: tuple of kernel axes it flattens; None if untracked
    shape: tuple
    dtype: Any
    fixed: tuple = ()  # (kernel axis, index) of axes indexed away by a constant slice

    @property
    def kernel_shape(self) -> tuple:
        return tuple(self.base.shape)

    def materialize(self) -> jax.Array:
        """This view of the effective kernel ``W0 + s·A·B`` (gradients to the adapter only)."""
        return fast_dot.merged_view(self.base, self.lora, self.ops)


@dataclasses.dataclass
class Config:
    strict: bool
    rng: jax.Array | None
    report: dict | None
    use_count: dict = dataclasses.field(default_factory=dict)
    compute_dtype: Any = None
    unmerged: bool = False  # x·W0 + s·(x·A)·B: per-example adapters, no merged weight


def note(cfg: Config, path: str, primitive: str, route: str, reason: str | None = None):
    if cfg.report is not None:
        cfg.report.setdefault(path, []).append(Use(primitive, route, reason))


def is_tagged(x) -> bool:
    return isinstance(x, Tagged)


def eval_jaxpr(cfg: Config, jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list:
    env: dict = {}

    def read(v):
        if isinstance(v, jex.core.Literal):
            return v.val
        return env[v]

    def write(v, val):
        if not isinstance(v, jex.core.DropVar):
            env[v] = val

    for v, val in zip(jaxpr.constvars, consts):
        write(v, val)
    for v, val in zip(jaxpr.invars, args):
        write(v, val)
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if any(map(is_tagged, invals)):
            outs = handle(cfg, eqn, invals)
        else:
            outs = bind(eqn, invals)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for v, val in zip(eqn.outvars, outs):
            write(v, val)
    return [read(v) for v in jaxpr.outvars]


def bind(eqn, invals):
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # older JAX returned (subfuns, params)
        subfuns, params = params
        invals = [*subfuns, *invals]
    with eqn.ctx.manager:
        return eqn.primitive.bind(*invals, **params)


def fallback(cfg: Config, eqn, invals, why: str | None = None):
    for x in invals:
        if is_tagged(x):
            if cfg.strict and x.lora is not None:
                raise LoraFallbackError(
                    f"LoRA weight {x.path!r} is used by primitive {eqn.primitive.name!r}, which "
                    f"has no fast LoRA rule ({why or 'unsupported'}); use strict=False to fall "
                    "back to the merged weight"
                )
            note(cfg, x.path, eqn.primitive.name, "fallback", why or "no fast rule for it")
    vals = [x.materialize() if is_tagged(x) else x for x in invals]
    return bind(eqn, vals)


RULES: dict[str, Callable] = {}


def rule(*names: str) -> Callable:
    """Registers ``fn(cfg, eqn, invals)`` as the rule for primitives ``names``: called when
    a tagged weight is among an equation's inputs."""

    def register(fn):
        for n in names:
            RULES[n] = fn
        return fn

    return register


def handle(cfg: Config, eqn, invals):
    """An equation with a tagged weight among its inputs: its rule, or the merged weight."""
    fn = RULES.get(eqn.primitive.name)
    return fallback(cfg, eqn, invals) if fn is None else fn(cfg, eqn, invals)


def concrete(outs):
    """Outputs leaving a control-flow body must be plain arrays."""
    return [o.materialize() if is_tagged(o) else o for o in outs]


def eval_closed(cfg, closed, invals):
    if isinstance(closed, jex.core.ClosedJaxpr):
        return eval_jaxpr(cfg, closed.jaxpr, closed.consts, invals)
    return eval_jaxpr(cfg, closed, (), invals)


def tag(path: str, base: Any, lora_leaf) -> Tagged:
    shape = tuple(base.shape)
    return Tagged(
        path=path,
        base=base,
        lora=lora_leaf,
        ops=(),
        axes=tuple((k,) for k in range(len(shape))),
        shape=shape,
        dtype=base.dtype,
    )
