"""The :class:`QuantizedArray` leaf: packed codes plus per-block scales, a base-leaf kind.

It implements :class:`lora_jax.protocols.BaseLeaf` (dequantize, requantize, unstack_leading,
storage_specs, major_axis, nbytes, streamed) and registers itself with
:func:`lora_jax.protocols.register_base_leaf`, so the rest of the library treats it as one
parameter without importing it. :data:`FORMATS` and :data:`STORAGES` are the values its
``format`` and ``storage`` fields take.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, SupportsInt

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lora_jax.anchors import zero_from
from lora_jax.protocols import register_base_leaf
from lora_jax.quant import kernels
from lora_jax.quant.bnb import DQ_BLOCK

if TYPE_CHECKING:
    from typing_extensions import Self

FORMATS = ("nf4", "fp4", "int4", "int8")
STORAGES = ("packed", "native")


@struct.dataclass
class QuantizedArray:
    """A block-quantized array: packed codes plus per-block absmax, a pytree leaf kind.

    Array fields are pytree children; the rest is static metadata (hashable), so a change of
    format or block size is a new trace.

    Attributes:
      codes: the flat codes, padded with the code of 0.0 to an even count for 4-bit formats.
        "packed" storage: uint8 with two codes per byte (element 2i in the high nibble).
        "native" storage: one code per element, ``jnp.uint4`` holding the NF4/FP4 table index,
        or ``jnp.int4`` holding the signed "int4" code (-7..7) itself, so that the stored
        integers are the weights up to the block scale and an int4 matmul can read them
        without a table. "int8": int8, one code per byte (its only storage, "packed").
      absmax: float32 absmax per block; with double quantization, its uint8 8-bit codes.
      absmax2: float32 absmax of each 256 (absmax - offset) values, or None.
      offset: float32 scalar mean of the absmax, or None.
      shape: the original shape.
      dtype_name: the original dtype's name.
      block_size: elements per block.
      format: "nf4", "fp4", "int4" or "int8".
      double_quant: whether ``absmax`` is itself quantized.
      storage: "packed" or "native" (see ``codes``).
      order: the axis order in which the array was flattened into blocks (``None``: row-major
        in its own order). :func:`quantize` flattens kernels as ``(*stack, *out, *in)`` so
        that blocks run along the input axes, as bitsandbytes' blocks run along the input
        axis of a PyTorch ``(out, in)`` weight.
    """

    codes: jax.Array
    absmax: jax.Array
    absmax2: jax.Array | None
    offset: jax.Array | None
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    dtype_name: str = struct.field(pytree_node=False)
    block_size: int = struct.field(pytree_node=False)
    format: str = struct.field(pytree_node=False)
    double_quant: bool = struct.field(pytree_node=False)
    storage: str = struct.field(pytree_node=False, default="packed")
    order: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)

    if TYPE_CHECKING:  # added by ``flax.struct.dataclass``
        def replace(self, **updates: Any) -> Self: ...

    @property
    def dtype(self) -> np.dtype:
        """The original (and default dequantized) dtype."""
        return jnp.dtype(self.dtype_name)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays (codes, scales, second-level scales, offset).

        Native 4-bit codes count half a byte each: XLA's packed layout of 4-bit types, which
        ``memory_analysis()`` of a compiled program counts. ``jax.Array.nbytes`` counts a byte
        per uint4/int4 element, and a resident XLA:CPU buffer does hold one byte per element.
        """
        arrays = (self.codes, self.absmax, self.absmax2, self.offset)
        return sum(-(-a.size * kernels.bits(a.dtype) // 8) for a in arrays if a is not None)

    @property
    def storage_order(self) -> tuple[int, ...] | None:
        """The axis order the values are stored in (``None``: the array's own)."""
        return self.order

    def dequantize(self, dtype: Any = None, *, after: jax.Array | None = None,
                   stored_order: bool = False) -> jax.Array:
        """The dense array, in ``dtype`` (default: the original dtype); jittable.

        Args:
          dtype: output dtype; values are computed in float32 and then cast, as bitsandbytes.
          after: an array (e.g. the layer's input) that the whole dequantization is made to
            depend on, so that XLA computes the dense weight only when it is about to be used
            instead of hoisting every layer's weight to the start of the program.
          stored_order: return it with its axes in :attr:`storage_order` (no transpose).

        Returns:
          An array of the original shape (or its axes in storage order).

        >>> from lora_jax.quant import quantize_array
        >>> q = quantize_array(jnp.linspace(-1.0, 1.0, 64), "nf4")
        >>> q.dequantize().shape, str(q.dequantize("bfloat16").dtype)
        ((64,), 'bfloat16')
        """
        out = jnp.dtype(self.dtype if dtype is None else dtype).name
        zero = jnp.zeros((), jnp.float32) if after is None else zero_from(after)
        flat_shape = self.shape if self.order is None else tuple(self.shape[k] for k in self.order)
        w = kernels.dequantize_blocks(
            self.codes, self.absmax, self.absmax2, self.offset, zero, shape=flat_shape,
            fmt=self.format, block_size=self.block_size, dtype=out, storage=self.storage)
        if self.order is None or stored_order:
            return w
        # A transpose that XLA folds into the consuming matmul's dimension numbers.
        return jnp.transpose(w, tuple(int(k) for k in np.argsort(self.order)))

    def requantize(self, x: jax.typing.ArrayLike, path: str = "<array>") -> QuantizedArray:
        """``x`` quantized with this array's format, block size, double quantization and
        storage."""
        from lora_jax.quant.tree import quantize_array  # imported here: tree imports this module

        return quantize_array(x, self.format, block_size=self.block_size,
                              double_quant=self.double_quant, storage=self.storage, path=path,
                              order=self.order)

    def with_storage(self, storage: str, path: str = "<array>") -> QuantizedArray:
        """The same codes in ``storage`` ("packed" or "native"): exact, jittable.

        >>> from lora_jax.quant import quantize_array
        >>> q = quantize_array(jnp.linspace(-1.0, 1.0, 64), "nf4")
        >>> n = q.with_storage("native")
        >>> str(n.codes.dtype), n.codes.shape, q.nbytes == n.nbytes
        ('uint4', (64,), True)
        >>> bool((n.dequantize() == q.dequantize()).all())
        True
        """
        check_storage(self.format, storage, path)
        if storage == self.storage:
            return self
        codes = kernels.store(kernels.nibbles(self.codes, self.format, self.storage),
                              self.format, storage)
        return self.replace(codes=codes, storage=storage)

    def unstack_leading(self) -> QuantizedArray | str:
        """The same data with the leading (layer) axis exposed on every stored array.

        ``lax.scan`` over the result hands each step a valid ``QuantizedArray`` of shape
        ``shape[1:]``, so stacked layers dequantize one layer at a time. Returns the reason
        instead when blocks would straddle layers: the per-layer size is not a multiple of
        the block size, of 2 for 4-bit packing, or of 256 blocks under double quantization,
        or the leading axis was not flattened first (see ``order``).
        """
        if len(self.shape) < 2:
            return "a 1-D array has no layer axis"
        if self.order is not None and self.order[0] != 0:
            return (f"blocks straddle layers: the array was flattened in axis order {self.order}"
                    "; quantize with layouts=lora_jax.trace(...) or stack_axes= so that the "
                    "layer axis comes first")
        n_layers, per = self.shape[0], math.prod(self.shape[1:])
        nb = per // self.block_size
        if per % self.block_size or (self.format != "int8" and per % 2):
            return (f"blocks straddle layers: a layer holds {per} values, not a multiple of "
                    f"block_size={self.block_size}")
        if self.double_quant and nb % DQ_BLOCK:
            return (f"blocks straddle layers: a layer holds {nb} blocks, not a multiple of the "
                    f"{DQ_BLOCK} that double quantization groups")
        return self.replace(
            codes=self.codes.reshape(n_layers, -1),
            absmax=self.absmax.reshape(n_layers, nb),
            absmax2=None if self.absmax2 is None else self.absmax2.reshape(
                n_layers, nb // DQ_BLOCK),
            offset=None if self.offset is None else jnp.broadcast_to(self.offset, (n_layers,)),
            shape=self.shape[1:],
            order=None if self.order is None else normal_order(
                tuple(k - 1 for k in self.order[1:])))

    @property
    def major_axis(self) -> int:
        """The logical axis flattened first: shards along it hold whole runs of blocks, so a
        shard dequantizes without communication."""
        return 0 if self.order is None else self.order[0]

    def storage_specs(self, spec: Any, axis_sizes: Mapping[str, int], path: str = "<array>"):
        """This array with a ``PartitionSpec`` per stored array, for the logical ``spec``.

        Codes and block scales are stored flat in block order; they shard over the same mesh
        axes as ``spec``, each shard holding whole blocks. Where ``spec`` shards only the
        :attr:`major_axis`, a shard of the codes is the codes of a shard of the weight;
        otherwise XLA reshuffles at the dequantization (the memory is still divided).
        Second-level scales shard when every shard holds whole groups of 256 blocks, else
        they are replicated (they are tiny).

        Raises:
          ValueError: a shard would split a quantization block.
        """
        from jax.sharding import PartitionSpec

        axes = tuple(a for e in spec if e is not None
                     for a in ((e,) if isinstance(e, str) else e))
        n = math.prod(axis_sizes[a] for a in axes)
        rep = PartitionSpec()
        if n == 1:
            flat = rep
        else:
            nb = self.absmax.shape[0]
            if self.size % self.block_size or nb % n:
                raise ValueError(
                    f"{path}: {self.format} weight of shape {self.shape} has {nb} blocks of "
                    f"{self.block_size}, which {n} shards (mesh axes {axes} of spec {spec}) "
                    "cannot split without splitting a block; use a spec with fewer shards, a "
                    "smaller block_size, or replicate this parameter")
            flat = PartitionSpec(axes if len(axes) > 1 else axes[0])
        dq = flat if (self.absmax2 is not None and n > 1
                      and self.absmax.shape[0] % (DQ_BLOCK * n) == 0) else rep
        return self.replace(codes=flat, absmax=flat,
                            absmax2=None if self.absmax2 is None else dq,
                            offset=None if self.offset is None else rep)

    def streamed(self, read: Any, *, path: str = "<array>",
                 shardings: QuantizedArray | None = None) -> QuantizedArray:
        """This abstract array quantized from a reader of the values in storage order, a chunk
        (or a local shard) at a time; see :func:`lora_jax.quant.on_load.quantize_streamed`."""
        from lora_jax.quant.on_load import quantize_streamed  # on_load imports this module

        return quantize_streamed(self, read, path=path, shardings=shardings)

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        native = ", native" if self.storage == "native" else ""
        order = "" if self.order is None else f", order={self.order}"
        return (f"QuantizedArray({self.format}, shape={self.shape}, dtype={self.dtype_name}, "
                f"block_size={self.block_size}{dq}{native}{order})")


register_base_leaf(QuantizedArray)


def normal_order(order: Sequence[SupportsInt] | None) -> tuple[int, ...] | None:
    """``None`` for the identity (row-major) order, else the order as a tuple of ints."""
    if order is None or tuple(order) == tuple(range(len(order))):
        return None
    return tuple(int(k) for k in order)


def check_storage(format: str, storage: str, where: str) -> None:
    """Raises unless ``storage`` is one of :data:`STORAGES` and fits ``format``."""
    if storage not in STORAGES:
        raise ValueError(f"{where}: unknown storage {storage!r}; expected 'packed' or 'native'")
    if storage == "native" and format == "int8":
        raise ValueError(f"{where}: storage='native' is for the 4-bit formats; int8 codes are "
                         "already one int8 each (use storage='packed')")


def is_quantized(x: Any) -> bool:
    """True for a :class:`QuantizedArray`.

    >>> from lora_jax.quant import quantize_array
    >>> is_quantized(quantize_array(jnp.ones((4, 16)))), is_quantized(jnp.ones(3))
    (True, False)
    """
    return isinstance(x, QuantizedArray)
