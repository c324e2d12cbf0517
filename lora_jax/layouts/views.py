"""Following a weight's kernel axes through views in a jaxpr, and the roles a use gives them.

A :class:`View` records which kernel axes each dim of a (cast, reshaped, transposed,
constant-indexed) view of a kernel flattens; ``dot_roles``/``conv_roles``/``gather_roles``
read the roles a matmul, convolution or row lookup gives the kernel's axes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from lora_jax.layouts.roles import IN, OUT, STACK

# Primitives that give a view of their operand with the same elements.
VIEW_PRIMS = ("convert_element_type", "reshape", "transpose", "copy", "copy_p", "squeeze",
              "reduce_precision")
CALL_PRIMS = ("pjit", "jit", "closed_call", "core_call")
REMAT_PRIMS = ("remat2", "checkpoint", "remat")


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


def ragged_roles(eqn, v: View, kernel_shape: Sequence[int]) -> str | None:
    """The roles a ``ragged_dot_general`` use gives its grouped operand (``rhs``): the group
    (expert) axis and batch dims are stack axes, contracted dims inputs, the rest outputs."""
    dn = eqn.params["ragged_dot_dimension_numbers"]
    (_, rc), (_, rb) = dn.dot_dimension_numbers
    return dot_roles(v, kernel_shape, rc, tuple(rb) + tuple(dn.rhs_group_dimensions))


def pick_view(eqn, v: View, kernel_shape: Sequence[int]) -> View | None:
    """``w[ids]`` picking whole sub-kernels (an expert's ``(D, F)`` matrix per token) off a
    stack axis: the view of the picked kernels, with the picked axes fixed at a dynamic
    index; ``None`` if the gather is a row lookup (one kernel axis left: an embedding) or
    slices across kernel axes.
    """
    if v.axes is None:
        return None
    dn = eqn.params["dimension_numbers"]
    if getattr(dn, "operand_batching_dims", ()):
        return None
    in_shape = tuple(eqn.invars[0].aval.shape)
    sizes = tuple(eqn.params["slice_sizes"])
    collapsed = tuple(dn.collapsed_slice_dims)
    kept = [d for d in range(len(in_shape)) if d not in collapsed]
    if any(sizes[d] != in_shape[d] for d in kept) or any(sizes[d] != 1 for d in collapsed):
        return None
    picked = [k for d in collapsed for k in v.axes[d] if kernel_shape[k] != 1]
    if any(len([k for k in v.axes[d] if kernel_shape[k] != 1]) > 1 for d in collapsed):
        return None
    if len([k for d in kept for k in v.axes[d] if kernel_shape[k] != 1]) < 2:
        return None  # a row lookup: an embedding
    out_ndim = len(eqn.outvars[0].aval.shape)
    axes: list = [()] * out_ndim  # the index dims hold no kernel axis
    for pos, d in zip(dn.offset_dims, kept):
        axes[pos] = v.axes[d]
    return View(tuple(axes), v.fixed + tuple((k, None) for k in picked))


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
