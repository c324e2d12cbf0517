"""Adapter leaves: the base class every low-rank kind shares, and :class:`LoraWeight`.

A LoRA tree mirrors the parameter tree, holding an adapter leaf at every targeted path and
nothing elsewhere. A kernel's axes are its stack, input and output axes (its *roles*, see
:mod:`lora_jax.layouts`: learned from the model by :func:`lora_jax.trace`, or from names).
Each leaf stores the factors with those axes in the kernel's own order within each group:

* ``a``: ``(*stack, *in_dims, r)``  (PEFT's ``lora_A.weight`` transposed)
* ``b``: ``(*stack, r, *out_dims)`` (PEFT's ``lora_B.weight`` transposed)

so that ``kernel + scale * tensordot(a, b, 1)``, laid out in the kernel's axis order, is the
adapted kernel, with ``scale = alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA).

:class:`LowRankLeaf` implements :class:`lora_jax.protocols.LowRankLeaf` from a kind's
``factors()``, ``scale`` and ``hparams()``: a new adapter method subclasses it.

>>> import jax.numpy as jnp
>>> w = LoraWeight(a=jnp.ones((4, 2)), b=jnp.ones((2, 3)), alpha=4.0)
>>> w.kernel_shape, w.scale, w.layout
((4, 3), 2.0, 'io')
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lora_jax import layouts as Lay
from lora_jax import paths as P
from lora_jax import validation as V

if TYPE_CHECKING:
    from typing_extensions import Self

PyTree = Any


class LowRankLeaf:
    """What the library needs from an adapter leaf (LoRA, AdaLoRA, ...).

    A subclass is a ``flax.struct.dataclass`` whose array fields all carry the stack axes
    first, and which provides:

    * ``factors() -> (A, B)`` with ``A: (*stack, *in_dims, r)`` and ``B: (*stack, r, *out_dims)``
      such that the weight update is ``scale * tensordot(A, B, 1)`` (batched over stack axes),
      laid out in the kernel's axes by :attr:`layout`;
    * static ``in_axes``, ``stack_axes`` (how many input and stack axes), ``roles`` (the
      kernel's layout, see :mod:`lora_jax.layouts`; ``""`` for the canonical
      ``(*stack, *in, *out)``), ``dropout``, and a ``scale`` property.
    """

    in_axes: int
    stack_axes: int
    roles: str
    dropout: float
    kind: ClassVar[str] = "LoRA"  # name shown by summary()
    peft_type: ClassVar[str] = "LORA"
    field_roles: ClassVar[dict[str, str]] = {}  # array field -> "in" | "out" | "rank" | "unit"
    frozen_fields: ClassVar[tuple[str, ...]] = ()  # array fields that never train
    stacked: ClassVar[bool] = False  # a stack of adapters (lora_jax.multi)
    peft_config: ClassVar[dict[str, Any]] = {}  # PEFT config fields of the kind ({"use_dora": ...})

    if TYPE_CHECKING:  # what ``flax.struct.dataclass`` adds to every subclass
        __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

        def replace(self, **updates: Any) -> Self: ...

    def hparams(self) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def check(self, where: str) -> None:
        """Raises if the leaf is not self-consistent: array fields, axis counts, the factors'
        chain, the roles string and every numeric hyperparameter."""
        V.leaf_arrays(self, where)
        sa = V.integer(self.stack_axes, f"{where}: stack_axes", low=0)
        ia = V.integer(self.in_axes, f"{where}: in_axes", low=1)
        for name, value in self.hparams().items():
            if not isinstance(value, bool):  # flags aside, hyperparameters are finite numbers
                V.number(value, f"{where}: {name}")
        V.dropout(self.dropout, f"{where}: dropout")
        a, b = jax.eval_shape(lambda leaf: leaf.factors(), self)
        V.factor_chain(where, tuple(a.shape), tuple(b.shape), sa, ia)
        try:
            _ = self.layout  # the roles string fits the factors' stack/in/out axis counts
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def peft_matrices(self, index: tuple[int, ...]) -> dict[str, np.ndarray]:
        """The update's factors at one stack index as PEFT's matrices: ``lora_A`` ``(r, in)``
        and ``lora_B`` ``(out, r)`` with the input and output axes flattened."""
        a, b = (np.asarray(x[index]) for x in self.factors())
        r = a.shape[-1]
        return {"lora_A": a.reshape(-1, r).T, "lora_B": b.reshape(r, -1).T}

    def factors(self) -> tuple[jax.Array, jax.Array]:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def scale(self) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def r(self) -> int:
        return self.factors()[0].shape[-1]

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.factors()[0].shape[: self.stack_axes])

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.factors()[0].shape[self.stack_axes : -1])

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.factors()[1].shape[self.stack_axes + 1 :])

    @property
    def layout(self) -> str:
        """One role per kernel axis: ``"s"`` stack, ``"i"`` input, ``"o"`` output."""
        n = self.stack_axes + self.in_axes + len(self.out_shape)
        if not self.roles:
            return Lay.canonical(n, self.in_axes, self.stack_axes)
        r = self.roles
        if len(r) != n or r.count(Lay.STACK) != self.stack_axes or r.count(Lay.IN) != self.in_axes:
            raise ValueError(f"adapter roles {r!r} do not fit factors with {self.stack_axes} "
                             f"stack, {self.in_axes} input and {len(self.out_shape)} output axes")
        return r

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        s, i, o = iter(self.stack_shape), iter(self.in_shape), iter(self.out_shape)
        pick = {Lay.STACK: s, Lay.IN: i, Lay.OUT: o}
        return tuple(next(pick[c]) for c in self.layout)

    def delta(self, dtype=None, order: tuple[int, ...] | None = None) -> jax.Array:
        """The dense weight update ``scale * A @ B`` in the kernel's shape and axis order.

        ``order``: the kernel's axes in this order instead (``transpose(delta, order)``). The
        quantization order ``(*stack, *out, *in)`` is computed as ``Bᵀ·Aᵀ``, with no
        transpose of a kernel-sized array.
        """
        a, b = self.factors()
        s, layout = self.stack_shape, self.layout
        a2 = a.reshape(s + (math.prod(self.in_shape), a.shape[-1]))
        b2 = b.reshape(s + (b.shape[self.stack_axes], math.prod(self.out_shape)))
        if order is not None and tuple(order) == Lay.block_order(layout):
            d = jnp.matmul(jnp.swapaxes(b2, -1, -2), jnp.swapaxes(a2, -1, -2))
            d = (self.scale * d).reshape(s + self.out_shape + self.in_shape)
            return d if dtype is None else d.astype(dtype)
        d = (self.scale * jnp.matmul(a2, b2)).reshape(s + self.in_shape + self.out_shape)
        canonical = Lay.to_canonical(layout)  # d's axes, as kernel axes
        want = tuple(range(len(layout))) if order is None else tuple(order)
        if want != canonical:
            d = jnp.transpose(d, [canonical.index(k) for k in want])
        return d if dtype is None else d.astype(dtype)

    def merged(self, w: jax.Array, order: tuple[int, ...] | None = None) -> jax.Array:
        """The adapted kernel for a dense base ``w`` (in the kernel's axis order, or in
        ``order``), at least float32: ``w + scale·A·B`` here; DoRA rescales it."""
        return w.astype(jnp.promote_types(w.dtype, jnp.float32)) + self.delta(order=order)

    def unmerged(self, w: jax.Array) -> jax.Array:
        """Inverse of :meth:`merged` (kernel order), at least float32."""
        return w.astype(jnp.promote_types(w.dtype, jnp.float32)) - self.delta()

    def linear_part(self) -> LowRankLeaf:
        """The leaf whose update is this one's ``scale·A·B``: itself, unless the kind also
        rescales the output (DoRA), which :meth:`output_scale` then gives."""
        return self

    def output_scale(self, w0: jax.Array) -> jax.Array | None:
        """Per output unit ``(*stack, *out)``, the factor the output of the linear update's
        matmul is multiplied by, for the dense base ``w0``; ``None`` for plain LoRA."""
        return None

    def unstack_leading(self):
        """This adapter's metadata for one index of the kernel's first axis (a stack axis):
        the adapter of one layer inside a ``scan``, whose arrays the scan slices. Reads no
        array shapes, so it applies to the sliced leaf too."""
        if (self.roles and self.roles[0] != Lay.STACK) or (not self.roles and self.stack_axes < 1):
            raise ValueError(f"the kernel's first axis is not a stack axis (roles {self.roles!r}, "
                             f"{self.stack_axes} stack axes)")
        return self.replace(stack_axes=self.stack_axes - 1, roles=self.roles[1:])


class AlphaScaled:
    """``factors``, ``scale`` and ``hparams`` of a leaf with fields ``a``, ``b``, ``alpha`` and
    ``rslora``: the update is ``alpha/r · A·B`` (``alpha/√r`` with rsLoRA). LoRA and DoRA
    share them; put it before :class:`LowRankLeaf` in the bases."""

    if TYPE_CHECKING:  # the fields of the dataclass it is mixed into
        a: jax.Array
        b: jax.Array
        alpha: float
        rslora: bool

    def factors(self) -> tuple[jax.Array, jax.Array]:
        return self.a, self.b

    @property
    def scale(self) -> float:
        r = self.a.shape[-1]
        return self.alpha / math.sqrt(r) if self.rslora else self.alpha / r

    def hparams(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "rslora": self.rslora}


@struct.dataclass
class LoraWeight(AlphaScaled, LowRankLeaf):
    """A LoRA adapter for one kernel: ``delta = scale * tensordot(a, b, 1)``.

    Attributes:
      a: ``(*stack, *in_dims, r)`` factor.
      b: ``(*stack, r, *out_dims)`` factor (zeros at init).
      alpha: LoRA alpha (static).
      rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r`` (static).
      in_axes: how many kernel axes are the input (static).
      stack_axes: how many kernel axes are stack axes, e.g. from ``nn.scan`` (static).
      dropout: dropout rate on the LoRA input path, as PEFT's ``lora_dropout`` (static).
      roles: the kernel's layout, one of ``"s"``/``"i"``/``"o"`` per kernel axis (static; see
        :mod:`lora_jax.layouts`); ``""`` means ``(*stack, *in, *out)``.
      residual_init: the init scheme that changed the base (``"pissa"``, ``"olora"``,
        ``"loftq"``; static): the adapter is only right on that residual base. ``""``: on
        the model's own base (see :mod:`lora_jax.init_schemes`).
    """

    a: jax.Array
    b: jax.Array
    alpha: float = struct.field(pytree_node=False, default=1.0)
    rslora: bool = struct.field(pytree_node=False, default=False)
    in_axes: int = struct.field(pytree_node=False, default=1)
    stack_axes: int = struct.field(pytree_node=False, default=0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    roles: str = struct.field(pytree_node=False, default="")
    residual_init: str = struct.field(pytree_node=False, default="")

    field_roles: ClassVar[dict[str, str]] = {"a": "in", "b": "out"}



def is_lowrank(x: Any) -> bool:
    """True for an adapter leaf (LoRA, AdaLoRA, ...)."""
    return isinstance(x, LowRankLeaf)


def leaves(lora: PyTree) -> dict[str, LowRankLeaf]:
    """``{path: adapter leaf}`` of a LoRA tree."""
    out = {}
    for path, x in P.flatten(lora, is_leaf=is_lowrank):
        if x is None:
            continue
        if not is_lowrank(x):
            raise TypeError(
                f"LoRA tree entry {path!r} is a {type(x).__name__}, expected an adapter leaf "
                "such as lora_jax.LoraWeight"
            )
        out[path] = x
    return out


def from_leaves(items: Mapping[str, Any]) -> dict:
    """Builds a nested-dict LoRA tree from ``{path: leaf}``."""
    tree: dict = {}
    for path, x in items.items():
        node = tree
        keys = path.split("/")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = x
    return tree
