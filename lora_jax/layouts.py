"""Weight layouts: which axes of a kernel are its input, its output, or a stack of kernels.

A layout is a *roles* string with one character per kernel axis:

* ``"i"``: an input axis (a matmul contracts it; LoRA's A spans the input axes),
* ``"o"``: an output axis (B spans the output axes),
* ``"s"``: a stack axis (an independent adapter per index: ``nn.scan`` layers, the block axis
  of a block-diagonal kernel, a fused axis the model indexes).

A Dense kernel ``(in, out)`` is ``"io"``; Gemma's ``q_einsum`` ``(N, D, H)`` used as
``BTD,NDH->BTNH`` is ``"oio"``; a block-diagonal ``(Nb, Bs, Bs)`` gate used with the block
axis as a ``dot_general`` batch dimension is ``"sio"``.

:func:`trace` learns every weight's layout from how a model function uses it, by reading the
function's jaxpr: the axes a ``dot_general`` (or ``conv_general_dilated``) contracts on the
weight are its input axes, the axes that are batch dimensions of that use, or that a ``scan``
slices, or that the model indexes with a constant, are stack axes, and the rest are output
axes, wherever each sits in the shape. Weights read by ``gather`` are embeddings.

>>> import jax, jax.numpy as jnp
>>> def attn(params, x):  # heads-first kernels, as Google's gemma library writes them
...     q = jnp.einsum("BTD,NDH->BTNH", x, params["q"])
...     return jnp.einsum("BTNH,NHD->BTD", q, params["o"])
>>> params = {"q": jnp.ones((2, 8, 4)), "o": jnp.ones((2, 4, 8))}
>>> layouts = trace(attn, params, jnp.ones((1, 3, 8)))
>>> layouts["q"].roles, layouts["o"].roles
('oio', 'iio')
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from lora_jax import paths as P
from lora_jax import tracing

STACK, IN, OUT = "s", "i", "o"

# Primitives that give a view of their operand with the same elements.
VIEW_PRIMS = ("convert_element_type", "reshape", "transpose", "copy", "copy_p", "squeeze",
              "reduce_precision")
CALL_PRIMS = ("pjit", "jit", "closed_call", "core_call")
REMAT_PRIMS = ("remat2", "checkpoint", "remat")


# ----------------------------------------------------------------------------------------
# Roles strings


def canonical(ndim: int, in_axes: int, stack_axes: int = 0) -> str:
    """The roles of a kernel laid out as ``(*stack, *in, *out)``.

    >>> canonical(3, 1, 1)
    'sio'
    """
    return STACK * stack_axes + IN * in_axes + OUT * (ndim - stack_axes - in_axes)


def check(roles: str, shape: Sequence[int], where: str) -> str:
    """Validates a roles string against a kernel shape; returns it.

    Raises:
      ValueError: wrong length, an unknown character, or no input or no output axis.
    """
    if not isinstance(roles, str) or set(roles) - {STACK, IN, OUT}:
        raise ValueError(f"{where}: roles must be a string of 's' (stack), 'i' (input) and 'o' "
                         f"(output), one per kernel axis; got {roles!r}")
    if len(roles) != len(shape):
        raise ValueError(f"{where}: roles {roles!r} has {len(roles)} characters but the kernel "
                         f"has shape {tuple(shape)} ({len(shape)} axes)")
    if IN not in roles or OUT not in roles:
        raise ValueError(f"{where}: roles {roles!r} needs at least one input ('i') and one "
                         "output ('o') axis")
    return roles


def split(roles: str, items: Sequence[Any]) -> tuple[tuple, tuple, tuple]:
    """``items`` (one per kernel axis) grouped as ``(stack, in, out)``, each in kernel order.

    >>> split("oio", ("N", "D", "H"))
    ((), ('D',), ('N', 'H'))
    """
    pick = lambda c: tuple(x for r, x in zip(roles, items) if r == c)  # noqa: E731
    return pick(STACK), pick(IN), pick(OUT)


def to_canonical(roles: str) -> tuple[int, ...]:
    """The kernel axes in ``(*stack, *in, *out)`` order: ``transpose(kernel, this)`` is the
    canonical kernel.

    >>> to_canonical("oio")
    (1, 0, 2)
    """
    s, i, o = split(roles, range(len(roles)))
    return s + i + o


def from_canonical(roles: str) -> tuple[int, ...]:
    """The inverse permutation of :func:`to_canonical`: ``transpose(canonical, this)`` is
    the kernel.

    >>> from_canonical("oio")
    (1, 0, 2)
    """
    return tuple(int(k) for k in np.argsort(to_canonical(roles)))


def block_order(roles: str) -> tuple[int, ...]:
    """The axis order in which a kernel is flattened for block quantization: stack, then
    output, then input axes, so that blocks run along the input axes (the blocking
    bitsandbytes applies to a PyTorch ``(out, in)`` weight).

    >>> block_order("io"), block_order("oio")
    ((1, 0), (0, 2, 1))
    """
    s, i, o = split(roles, range(len(roles)))
    return s + o + i


def from_names(path: str, shape: Sequence[int], stack_axes: int = 0,
               in_axes: int | None = None) -> str:
    """Roles guessed from a parameter's name and Flax's conventions (no model at hand).

    See :func:`lora_jax.paths.default_in_axes`; the stack axes lead.
    """
    if in_axes is None:
        in_axes = P.default_in_axes(path, shape, stack_axes)
    return canonical(len(shape), in_axes, stack_axes)


# ----------------------------------------------------------------------------------------
# What trace() returns


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
      uses: the primitive of every use, in program order (``"dot_general"``, ``"gather"``,
        ``"conv_general_dilated"``, or any other primitive that reads the weight).
    """

    path: str
    shape: tuple[int, ...]
    roles: str | None
    kind: str
    uses: tuple[str, ...]

    def __str__(self) -> str:
        return (f"{self.path}: {self.kind} {self.shape} roles={self.roles} "
                f"uses={', '.join(self.uses) or 'none'}")


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


# ----------------------------------------------------------------------------------------
# Following a weight through a jaxpr


@dataclasses.dataclass(frozen=True)
class View:
    """A view of a kernel in a jaxpr: which kernel axes each of its dims flattens.

    ``axes[d]`` lists the kernel axes flattened into view dim ``d`` (size-1 kernel axes may
    be absent); ``None`` once a reshape splits a kernel axis. ``fixed`` holds
    ``(kernel_axis, index)`` for axes indexed away by a constant slice or sliced by a scan.
    """

    axes: tuple | None
    fixed: tuple = ()

    @staticmethod
    def of(shape: Sequence[int]) -> View:
        return View(tuple((k,) for k in range(len(shape))))


def view_after(eqn, v: View, kernel_shape: Sequence[int]) -> View | None:
    """``v`` after a view-like primitive, or ``None`` if ``eqn`` is not a view of ``v``.

    Handles casts, copies, transposes, reshapes that only merge or split size-1 axes or
    merge whole kernel axes, squeezes, and ``slice`` taking one index of a kernel axis (the
    model indexing a fused or stacked kernel, ``w[0]``).
    """
    name = eqn.primitive.name
    out_shape = tuple(eqn.outvars[0].aval.shape)
    in_shape = tuple(eqn.invars[0].aval.shape)
    if name == "slice":
        return _slice_view(eqn, v, in_shape, kernel_shape)
    if name not in VIEW_PRIMS:
        return None
    if v.axes is None:
        return v
    if name == "transpose":
        return dataclasses.replace(v, axes=tuple(v.axes[p] for p in eqn.params["permutation"]))
    if name == "squeeze":
        dims = set(eqn.params["dimensions"])
        if any(kernel_shape[k] != 1 for d in dims for k in v.axes[d]):
            return dataclasses.replace(v, axes=None)
        return dataclasses.replace(v, axes=tuple(a for d, a in enumerate(v.axes) if d not in dims))
    if name == "reshape":
        return dataclasses.replace(v, axes=reshape_axes(v.axes, out_shape, kernel_shape))
    return v


def _slice_view(eqn, v: View, in_shape, kernel_shape) -> View | None:
    if v.axes is None:
        return None
    starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * len(starts)
    axes, fixed = list(v.axes), list(v.fixed)
    for d, (s, lim, st) in enumerate(zip(starts, limits, strides)):
        if s == 0 and lim == in_shape[d] and st == 1:
            continue
        atoms = [k for k in v.axes[d] if kernel_shape[k] != 1]
        if lim - s != 1 or len(atoms) != 1:
            return None  # a range of a kernel axis: not a view the adapter can follow
        fixed.append((atoms[0], int(s)))
        axes[d] = ()
    return View(tuple(axes), tuple(fixed))


def reshape_axes(axes: tuple, new_shape: Sequence[int], kernel_shape: Sequence[int]):
    """Kernel axes of each dim after a reshape, or None if it splits a kernel axis."""
    atoms = [k for dim in axes for k in dim if kernel_shape[k] != 1]
    out, i = [], 0
    for n in new_shape:
        group, size = [], 1
        while size < n and i < len(atoms):
            group.append(atoms[i])
            size *= kernel_shape[atoms[i]]
            i += 1
        if size != n:
            return None
        out.append(tuple(group))
    return tuple(out) if i == len(atoms) else None


def dot_roles(v: View, kernel_shape: Sequence[int], contract: Sequence[int],
              batch: Sequence[int]) -> str | None:
    """The roles a ``dot_general`` use gives a kernel, or None if the view lost track."""
    if v.axes is None:
        return None
    roles = [STACK] * len(kernel_shape)  # axes dropped as size 1 stay stack axes
    for k, _ in v.fixed:
        roles[k] = STACK
    for d, ks in enumerate(v.axes):
        for k in ks:
            roles[k] = IN if d in contract else STACK if d in batch else OUT
    return "".join(roles)


def conv_roles(eqn, v: View, kernel_shape) -> str | None:
    """A convolution contracts the kernel's input-feature and spatial axes."""
    if v.axes is None or eqn.params.get("feature_group_count", 1) != 1:
        return None
    out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    roles = [STACK] * len(kernel_shape)
    for d, ks in enumerate(v.axes):
        for k in ks:
            roles[k] = OUT if d == out_dim else IN
    return "".join(roles)


def gather_roles(eqn, v: View, kernel_shape) -> str | None:
    """A row lookup ``table[ids]``: the looked-up axes are the input, the rest the output."""
    if v.axes is None:
        return None
    dn = eqn.params["dimension_numbers"]
    if getattr(dn, "operand_batching_dims", ()):
        return None
    roles = [STACK] * len(kernel_shape)
    for d, ks in enumerate(v.axes):
        for k in ks:
            roles[k] = IN if d in dn.collapsed_slice_dims else OUT
    return "".join(roles)


class _Recorder:
    def __init__(self, shapes: dict[str, tuple]):
        self.shapes = shapes
        self.uses: dict[str, list[str]] = {p: [] for p in shapes}
        self.first: dict[str, tuple[str, str | None]] = {}

    def use(self, path: str, prim: str, kind: str | None = None, roles: str | None = None):
        self.uses[path].append(prim)
        if kind is not None and path not in self.first:
            self.first[path] = (kind, roles)


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
    if name == "dot_general" and len(tagged) == 1:
        path, v = ins[tagged[0]]
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        c, b = (lc, lb) if tagged[0] == 0 else (rc, rb)
        rec.use(path, name, "dense", dot_roles(v, rec.shapes[path], c, b))
        return none
    if name == "conv_general_dilated" and tagged == [1]:
        path, v = ins[1]
        rec.use(path, name, "dense", conv_roles(eqn, v, rec.shapes[path]))
        return none
    if name == "gather" and tagged == [0]:
        path, v = ins[0]
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
        atoms = None if v.axes is None else [k for k in v.axes[0] if shape[k] != 1]
        if atoms is None or len(atoms) != 1:
            rec.use(path, "scan (sliced across kernel axes)")
            body_in.append(None)
            continue
        body_in.append((path, View(v.axes[1:], v.fixed + ((atoms[0], None),))))
    _walk(rec, _sub(p["jaxpr"]), body_in)
    return [None] * len(eqn.outvars)


def trace(fn: Callable, params: Any, *args, **kwargs) -> Layouts:
    """The layout of every weight ``fn(params, *args, **kwargs)`` reads, learned from use.

    Traces abstractly (no FLOPs run). Every floating-point parameter with two or more axes
    is followed through casts, reshapes, transposes, constant indexing, calls, ``remat``,
    ``scan``, ``cond`` and ``while``; its first matmul (``dot_general``), convolution or row
    lookup (``gather``) decides its roles, see the module docstring.

    Args:
      fn: the model function, e.g. ``model.apply``.
      params: its parameter tree (arrays, ``jax.ShapeDtypeStruct`` or quantized leaves).
      *args, **kwargs: example arguments (only shapes and dtypes matter).

    Returns:
      :class:`Layouts` with an entry per float parameter of two or more axes that ``fn``
      reads.

    >>> import flax.linen as nn
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
        kind, roles = rec.first.get(path, ("other", None))
        if roles is not None and (IN not in roles or OUT not in roles or math.prod(shape) == 0):
            kind = "other"
        out[path] = WeightLayout(path=path, shape=shape, roles=roles,
                                 kind=kind if roles is not None else "other", uses=uses)
    return Layouts(out)
