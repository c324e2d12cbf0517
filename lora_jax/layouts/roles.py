"""Roles strings: one of ``s`` (stack), ``i`` (input), ``o`` (output) per kernel axis.

>>> canonical(3, 1, 1), split("oio", ("N", "D", "H")), block_order("io")
('sio', ((), ('D',), ('N', 'H')), (1, 0))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lora_jax import paths as P

STACK, IN, OUT = "s", "i", "o"


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
