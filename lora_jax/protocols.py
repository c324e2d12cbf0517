"""The two leaf protocols: what the library needs from a base weight and from an adapter.

Everything outside a leaf kind's own module talks to leaves through these members only; no
other module reads a leaf's fields by name or tests its class. A new quantized format is a
new :class:`BaseLeaf`; a new adapter method (DoRA, ...) is a new :class:`LowRankLeaf`.
Registering the class (:func:`register_base_leaf`; adapter leaves subclass
``lora_jax.leaves.LowRankBase``) is all the rest of the library needs.

Both kinds are ``flax.struct`` dataclasses: arrays are pytree children, everything else is
static (hashable) metadata, so they jit, shard and checkpoint like any pytree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import jax
import numpy as np


@runtime_checkable
class BaseLeaf(Protocol):
    """A frozen base weight stored as something other than a dense array (a quantized one).

    ``apply`` dequantizes it at each use (tied to the use's input with ``after``), ``merge``
    folds adapters into it (``requantize`` to store the result in the same format), a
    ``scan`` over stacked layers slices it one layer at a time (``unstack_leading``), and
    sharding asks it how its stored arrays shard (``storage_specs``).
    """

    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype: ...  # the logical (dequantized) dtype

    @property
    def size(self) -> int: ...

    @property
    def nbytes(self) -> int: ...  # bytes actually stored

    @property
    def storage_order(self) -> tuple[int, ...] | None: ...  # axis order of the stored values

    def dequantize(self, dtype: Any = None, *, after: jax.Array | None = None,
                   stored_order: bool = False) -> jax.Array:
        """The dense array; ``after``: an array the computation is made to depend on;
        ``stored_order``: axes in :attr:`storage_order` rather than the array's own."""
        ...

    def requantize(self, x: jax.typing.ArrayLike, path: str = "<array>") -> BaseLeaf:
        """``x`` stored in this leaf's format."""
        ...

    def unstack_leading(self) -> BaseLeaf | str:
        """One layer of a stacked weight (for ``scan``), or the reason it cannot be sliced."""
        ...

    def storage_specs(self, spec: Any, axis_sizes: Mapping[str, int], path: str) -> Any:
        """This leaf with a ``PartitionSpec`` for each stored array, for a logical ``spec``
        (``ValueError`` if the spec would split its storage units)."""
        ...

    @property
    def major_axis(self) -> int: ...  # the logical axis that shards without communication

    def streamed(self, read: Any, *, path: str = "<array>", shardings: Any = None) -> BaseLeaf:
        """This abstract leaf (arrays as ``ShapeDtypeStruct``) filled in from ``read(start,
        stop)``, the values in storage order, a part at a time (loading without the dense
        weight; ``shardings``: a ``NamedSharding`` per stored array, only local shards read)."""
        ...


@runtime_checkable
class LowRankLeaf(Protocol):
    """An adapter for one kernel: the update ``scale · A·B`` laid out in the kernel's axes.

    ``A`` is ``(*stack, *in, r)`` and ``B`` is ``(*stack, r, *out)``; ``layout`` (one of
    ``s``/``i``/``o`` per kernel axis) places those axes in the kernel.
    """

    kind: ClassVar[str]  # the method's name, for summaries ("LoRA", "AdaLoRA")
    peft_type: ClassVar[str]  # PEFT's ``peft_type`` for this kind ("LORA", "ADALORA")
    field_roles: ClassVar[Mapping[str, str]]  # array field -> "in" | "out" | "rank" | "unit"
    frozen_fields: ClassVar[tuple[str, ...]]  # array fields that never train (a stack's scales)
    stacked: ClassVar[bool]  # K adapters, one picked per example (apply needs adapter_ids=)
    peft_config: ClassVar[Mapping[str, Any]]  # PEFT config fields of the kind ({"use_dora": 1})
    in_axes: int
    stack_axes: int
    roles: str
    dropout: float

    def factors(self) -> tuple[jax.Array, jax.Array]:
        """``(A, B)`` such that the update is ``scale · A·B``."""
        ...

    @property
    def scale(self) -> float: ...

    @property
    def r(self) -> int: ...

    @property
    def layout(self) -> str: ...

    @property
    def stack_shape(self) -> tuple[int, ...]: ...

    @property
    def in_shape(self) -> tuple[int, ...]: ...

    @property
    def out_shape(self) -> tuple[int, ...]: ...

    @property
    def kernel_shape(self) -> tuple[int, ...]: ...

    def delta(self, dtype: Any = None) -> jax.Array:
        """The dense update in the kernel's shape and axis order."""
        ...

    def unstack_leading(self) -> LowRankLeaf:
        """This leaf's metadata for one index of the kernel's leading (stack) axis."""
        ...

    def hparams(self) -> dict[str, Any]:
        """The method's static hyperparameters (``alpha``, ``rslora``, ``target_r``, ...)."""
        ...

    def check(self, where: str) -> None:
        """Raises if the leaf is not self-consistent (shapes, dtypes, numbers)."""
        ...

    def merged(self, w: jax.Array, order: tuple[int, ...] | None = None) -> jax.Array:
        """The adapted kernel for the dense base ``w`` (axes in kernel order, or ``order``):
        ``w + scale·A·B``, or the kind's own (DoRA rescales it per output unit)."""
        ...

    def unmerged(self, w: jax.Array) -> jax.Array:
        """Inverse of :meth:`merged`, or ``ValueError`` where ``w`` alone does not give it."""
        ...

    def linear_part(self) -> LowRankLeaf:
        """The leaf of the plain update ``scale·A·B`` (itself unless it rescales outputs)."""
        ...

    def output_scale(self, w0: jax.Array) -> jax.Array | None:
        """``(*stack, *out)`` factors the linear part's output is multiplied by (DoRA's
        ``m/‖V‖``), or ``None``."""
        ...

    def peft_matrices(self, index: tuple[int, ...]) -> dict[str, np.ndarray]:
        """PEFT's tensors of one stack index, as matrices: ``lora_A`` ``(r, in)``,
        ``lora_B`` ``(out, r)`` and the kind's own (AdaLoRA's ``lora_E`` ``(r, 1)``)."""
        ...


# ---------------------------------------------------------------------------------------------
# The registry of base-leaf kinds: the core treats these as single parameters although they
# are pytree nodes, and never imports them by name.

_BASE_LEAF_TYPES: list[type] = []


def register_base_leaf(cls: type) -> type:
    """Registers a pytree-node class that implements :class:`BaseLeaf`; returns it."""
    if cls not in _BASE_LEAF_TYPES:
        _BASE_LEAF_TYPES.append(cls)
    return cls


def is_base_leaf(x: Any) -> bool:
    """True for an instance of a registered base-leaf kind (e.g. a ``QuantizedArray``)."""
    return isinstance(x, tuple(_BASE_LEAF_TYPES))


def dense(x: Any, dtype: Any = None, *, after: jax.Array | None = None) -> jax.Array:
    """A base parameter as a dense array: base leaves dequantize (tied to ``after``), arrays
    are cast to ``dtype`` if given."""
    if is_base_leaf(x):
        return x.dequantize(dtype, after=after)
    return x if dtype is None else x.astype(dtype)
