"""``trace``: every weight's layout learned from how a model function uses it.

The jaxpr of the function is walked with a :class:`~lora_jax.layouts.views.View` for each
float parameter of two or more axes, through calls, ``remat``, ``custom_jvp``/``custom_vjp``,
``scan``, ``cond`` and ``while``; the first matmul (``dot_general``, or
``ragged_dot_general`` over a stack of experts), convolution or row lookup of each weight
decides its roles and kind. A gather that picks whole sub-kernels off a stack axis
(``w[expert_ids]``) is followed as a view whose picked axes are stack axes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax.extend as jex
import jax.numpy as jnp

from lora_jax import tracing
from lora_jax.layouts.roles import IN, OUT
from lora_jax.layouts.views import (
    CALL_PRIMS,
    REMAT_PRIMS,
    VIEW_PRIMS,
    View,
    conv_roles,
    dot_roles,
    gather_roles,
    pick_view,
    ragged_roles,
    view_after,
)


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """How a model uses one weight.

    Attributes:
      path: the '/'-joined parameter path.
      shape: the kernel's shape.
      roles: one character per axis (``"s"``, ``"i"``, ``"o"``), from the first matmul or
        lookup that reads the weight; ``None`` if no use determines it.
      kind: ``"dense"`` (first read by a matmul or convolution), ``"embedding"`` (first read
        by a row lookup), or ``"other"``.
      uses: the primitive of every use, in program order (``"dot_general"``,
        ``"ragged_dot_general"``, ``"gather"``, ``"conv_general_dilated"``, or any other
        primitive that reads the weight).
      why: for a weight that feeds a contraction but got no roles, the reason; else ``None``.
    """

    path: str
    shape: tuple[int, ...]
    roles: str | None
    kind: str
    uses: tuple[str, ...]
    why: str | None = None

    def __str__(self) -> str:
        why = f" ({self.why})" if self.why else ""
        return (f"{self.path}: {self.kind} {self.shape} roles={self.roles} "
                f"uses={', '.join(self.uses) or 'none'}{why}")


class Layouts(Mapping[str, WeightLayout]):
    """``{path: WeightLayout}`` for the weights a model reads, from :func:`trace`.

    Accepted by :func:`lora_jax.init`, :func:`lora_jax.adalora.init` and
    :func:`lora_jax.quantize` (``layouts=``): targets default to the ``"dense"`` weights, and
    each target's adapter (or quantization blocks) follow its roles.
    """

    def __init__(self, items: Mapping[str, WeightLayout]):
        self._items = dict(items)

    def __getitem__(self, path: str) -> WeightLayout:
        return self._items[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def dense(self) -> list[str]:
        """Paths of the weights whose first use is a matmul (the default LoRA targets)."""
        return [p for p, w in self._items.items() if w.kind == "dense"]

    def __repr__(self) -> str:
        kinds: dict[str, int] = {}
        for w in self._items.values():
            kinds[w.kind] = kinds.get(w.kind, 0) + 1
        return "Layouts(" + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + ")"

    def __str__(self) -> str:
        return "\n".join(str(w) for w in self._items.values())


KINDS = ("dense", "embedding", "other")


def check_layouts(layouts: Any, where: str) -> Mapping[str, WeightLayout] | None:
    """``layouts`` (None, or ``{path: WeightLayout}`` as :func:`trace` returns), checked.

    Raises:
      TypeError: not a mapping, a path that is not a string, or a value that is not a
        :class:`WeightLayout` (e.g. a roles string: that goes in ``rules=``), each naming the
        path and what was expected.
    """
    if layouts is None:
        return None
    hint = "the result of lora_jax.trace(fn, params, *args)"
    if not isinstance(layouts, Mapping):
        raise TypeError(f"{where}: layouts must be {hint}, got a {type(layouts).__name__}")
    for path, layout in layouts.items():
        if not isinstance(path, str):
            raise TypeError(f"{where}: layouts must be {hint}, whose keys are '/'-joined "
                            f"parameter paths; got the key {path!r:.80}")
        if not isinstance(layout, WeightLayout):
            roles = (f"; to set a kernel's roles by hand use rules=[lora_jax.Rule({path!r}, "
                     f"roles={layout!r})]" if isinstance(layout, str) else "")
            raise TypeError(f"{where}: layouts[{path!r}] must be a lora_jax.WeightLayout (from "
                            f"lora_jax.trace), got the {type(layout).__name__} {layout!r:.80}"
                            + roles)
        if layout.kind not in KINDS or not (layout.roles is None or isinstance(layout.roles, str)):
            raise TypeError(f"{where}: layouts[{path!r}] has kind {layout.kind!r} and roles "
                            f"{layout.roles!r}; expected a kind in {KINDS} and a roles string "
                            "or None")
    return layouts


class _Recorder:
    def __init__(self, shapes: dict[str, tuple]):
        self.shapes = shapes
        self.uses: dict[str, list[str]] = {p: [] for p in shapes}
        self.first: dict[str, tuple[str, str | None]] = {}
        self.why: dict[str, str] = {}  # a contraction that gave the weight no roles
        self.lookup: dict[str, str | None] = {}  # roles as an embedding, if no matmul follows

    def use(self, path: str, prim: str, kind: str | None = None, roles: str | None = None):
        self.uses[path].append(prim)
        if kind is not None and path not in self.first:
            self.first[path] = (kind, roles)

    def unplaced(self, path: str, prim: str, why: str):
        """A contraction reads the weight but gives it no roles: say why."""
        self.uses[path].append(prim)
        self.why.setdefault(path, f"{prim}: {why}")


def _walk(rec: _Recorder, jaxpr, env_in: Sequence[tuple[str, View] | None]) -> list:
    """Follows tagged views through ``jaxpr``; returns the views of its outputs."""
    env: dict = {}
    for var, val in zip(jaxpr.invars, env_in):
        if val is not None:
            env[var] = val

    def get(v):
        return None if isinstance(v, jex.core.Literal) else env.get(v)

    for eqn in jaxpr.eqns:
        ins = [get(v) for v in eqn.invars]
        if not any(x is not None for x in ins):
            continue
        outs = _eqn(rec, eqn, ins)
        for var, val in zip(eqn.outvars, outs):
            if val is not None and not isinstance(var, jex.core.DropVar):
                env[var] = val
    return [get(v) for v in jaxpr.outvars]


def _sub(closed):
    return closed.jaxpr if isinstance(closed, jex.core.ClosedJaxpr) else closed


def _eqn(rec: _Recorder, eqn, ins) -> list:
    name = eqn.primitive.name
    tagged = [i for i, x in enumerate(ins) if x is not None]
    none = [None] * len(eqn.outvars)
    if len(ins) == 1 and (name in VIEW_PRIMS or name == "slice"):
        path, v = ins[0]
        nv = view_after(eqn, v, rec.shapes[path])
        if nv is not None:
            return [(path, nv)]
    if name in ("dot_general", "ragged_dot_general") and len(tagged) == 2:
        for i in tagged:
            rec.unplaced(ins[i][0], name, "multiplied by another weight, not by activations")
        return none
    if name == "dot_general" and len(tagged) == 1:
        path, v = ins[tagged[0]]
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        c, b = (lc, lb) if tagged[0] == 0 else (rc, rb)
        roles = dot_roles(v, rec.shapes[path], c, b)
        if roles is None:
            rec.unplaced(path, name, "reshaped across kernel axes before the matmul")
        else:
            rec.use(path, name, "dense", roles)
        return none
    if name == "ragged_dot_general" and len(tagged) == 1:
        path, v = ins[tagged[0]]
        if tagged[0] != 1:
            rec.unplaced(path, name, "the weight is the ragged operand (lhs), not the grouped "
                         "one (rhs)" if tagged[0] == 0 else "the weight is the group sizes")
            return none
        roles = ragged_roles(eqn, v, rec.shapes[path])
        if roles is None:
            rec.unplaced(path, name, "reshaped across kernel axes before the matmul")
        else:
            rec.use(path, name, "dense", roles)
        return none
    if name == "conv_general_dilated" and tagged == [1]:
        path, v = ins[1]
        roles = conv_roles(eqn, v, rec.shapes[path])
        if roles is None:
            rec.unplaced(path, name, "a grouped (feature_group_count > 1) convolution, or the "
                         "kernel was reshaped across its axes")
        else:
            rec.use(path, name, "dense", roles)
        return none
    if name == "gather" and tagged == [0]:
        path, v = ins[0]
        picked = pick_view(eqn, v, rec.shapes[path])
        if picked is not None:  # w[expert_ids]: the matmul that follows decides
            rec.use(path, name)
            rec.lookup.setdefault(path, gather_roles(eqn, v, rec.shapes[path]))
            return [(path, picked)]
        rec.use(path, name, "embedding", gather_roles(eqn, v, rec.shapes[path]))
        return none
    sub = None
    if name in CALL_PRIMS or name in REMAT_PRIMS:
        sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    elif name in ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"):
        sub = eqn.params.get("call_jaxpr", eqn.params.get("fun_jaxpr"))
    if sub is not None:
        return _walk(rec, _sub(sub), ins)
    if name == "scan":
        return _scan(rec, eqn, ins)
    if name == "cond":
        for br in eqn.params["branches"]:
            _walk(rec, _sub(br), ins[1:])
        return none
    if name == "while":
        p = eqn.params
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        for path, _ in (x for x in ins[nc + nb:] if x is not None):
            rec.use(path, "while (carried)")
        _walk(rec, _sub(p["cond_jaxpr"]), ins[:nc])
        _walk(rec, _sub(p["body_jaxpr"]), ins[nc:nc + nb] + [None] * (len(ins) - nc - nb))
        return none
    for i in tagged:
        rec.use(ins[i][0], name)
    return none


def _scan(rec: _Recorder, eqn, ins) -> list:
    p = eqn.params
    nc, ncarry = p["num_consts"], p["num_carry"]
    body_in = list(ins[:nc]) + [None] * ncarry
    for x in ins[nc:nc + ncarry]:
        if x is not None:
            rec.use(x[0], "scan (carried)")
    for x in ins[nc + ncarry:]:
        if x is None:
            body_in.append(None)
            continue
        path, v = x
        shape = rec.shapes[path]
        if v.axes is None or len(atoms := [k for k in v.axes[0] if shape[k] != 1]) != 1:
            rec.use(path, "scan (sliced across kernel axes)")
            body_in.append(None)
            continue
        body_in.append((path, View(v.axes[1:], v.fixed + ((atoms[0], None),))))
    _walk(rec, _sub(p["jaxpr"]), body_in)
    return [None] * len(eqn.outvars)


def trace(fn: Callable, params: Any, *args, **kwargs) -> Layouts:
    """The layout of every weight ``fn(params, *args, **kwargs)`` reads, learned from use.

    Traces abstractly (no FLOPs run). Every floating-point parameter with two or more axes
    is followed through casts, reshapes, transposes, constant indexing, expert picks
    (``w[ids]``), calls, ``remat``, ``scan``, ``cond`` and ``while``; its first matmul
    (``dot_general``, ``ragged_dot_general``), convolution or row lookup (``gather``) decides
    its roles, see the module docstring. A weight that a contraction reads but that gets no
    roles says why (``WeightLayout.why``).

    Args:
      fn: the model function, e.g. ``model.apply``.
      params: its parameter tree (arrays, ``jax.ShapeDtypeStruct`` or quantized leaves).
      *args, **kwargs: example arguments (only shapes and dtypes matter).

    Returns:
      :class:`Layouts` with an entry per float parameter of two or more axes that ``fn``
      reads.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> model = nn.Sequential([nn.Embed(10, 4), nn.Dense(8)])
    >>> ids = jnp.zeros((2, 3), jnp.int32)
    >>> layouts = trace(model.apply, model.init(jax.random.key(0), ids), ids)
    >>> [(p, w.kind, w.roles) for p, w in layouts.items()]
    [('params/layers_0/embedding', 'embedding', 'io'), ('params/layers_1/kernel', 'dense', 'io')]
    """
    jx = tracing.trace(fn, params, args, kwargs)
    shapes, env = {}, []
    for path, x in zip(jx.base_paths, jx.base_leaves):
        shape = tuple(getattr(x, "shape", ()))
        dtype = getattr(x, "dtype", None)
        if len(shape) >= 2 and dtype is not None and jnp.issubdtype(dtype, jnp.floating):
            shapes[path] = shape
            env.append((path, View.of(shape)))
        else:
            env.append(None)
    rec = _Recorder(shapes)
    _walk(rec, jx.closed.jaxpr, env + [None] * len(jx.dyn_vals))
    out = {}
    for path, shape in shapes.items():
        uses = tuple(rec.uses[path])
        if not uses:
            continue
        first = rec.first.get(path)
        if first is None and path in rec.lookup:  # picked rows never multiplied: a lookup
            first = ("embedding", rec.lookup[path])
        kind, roles = first if first is not None else ("other", None)
        why = rec.why.get(path) if first is None else None
        if roles is not None and (IN not in roles or OUT not in roles or math.prod(shape) == 0):
            why = why or (f"its first matmul gives roles {roles!r}, without both an input and "
                          "an output axis")
            kind = "other"
        out[path] = WeightLayout(path=path, shape=shape, roles=roles,
                                 kind=kind if roles is not None else "other", uses=uses, why=why)
    return Layouts(out)
