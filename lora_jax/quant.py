"""Quantized base weights for QLoRA: NF4, FP4, int4 and int8 block quantization.

A :class:`QuantizedArray` is a pytree leaf holding packed codes and per-block scales. NF4 and
FP4 follow bitsandbytes 0.50 byte for byte on float32 input (``quantize_4bit`` of its default
backend, ``compress_statistics`` for double quantization):

- blocks of ``block_size`` over the row-major flattened tensor, ``absmax`` per block in fp32;
- ``scaled = clamp(x * (1 / absmax), -1, 1)`` (a multiplication by the reciprocal), except in a
  last partial block, which divides by its absmax (clamped to 1e-38);
- the code index is ``bucketize`` over the midpoints of the sorted code (a value exactly on a
  midpoint takes the lower code); element 2i goes to the high nibble, an odd count is padded
  with the code of 0.0;
- double quantization: ``offset = mean(absmax)`` summed in PyTorch's float32 order (its AVX2
  CPU kernel), ``absmax - offset`` quantized in blocks of 256 to the signed 8-bit dynamic map
  through the 65,536-entry lookup grid of bitsandbytes' C++ CPU ``quantize_blockwise``.

Known limits of the match: PyTorch splits sums of 32,768 values or more across threads, so for
tensors of 2M+ elements (block 64) the offset's last bit, and rarely an absmax code, depend on
PyTorch's thread count; XLA flushes subnormal floats to zero, so blocks whose absmax is
subnormal (below 1.2e-38) quantize to zero, and blocks whose absmax is above 2**126 (whose
reciprocal would be subnormal) are scaled by 2**-64 first, which keeps values up to float32's
maximum finite and accurate where bitsandbytes rounds a subnormal reciprocal. bf16/f16/f64
inputs are cast to float32 first, as bitsandbytes does. "int4" (codes -7..7, stored as nibble
code + 8, value ``code / 7 * absmax``) and "int8" (codes -127..127, one signed byte each, value
``code / 127 * absmax``) are this library's symmetric formats, scaled like the 4-bit codes and
optionally double quantized too.

Storage of the 4-bit codes: "packed" (default) is the bitsandbytes byte layout above, two codes
per uint8; "native" keeps one code per element of a 4-bit XLA type (``jnp.uint4``, or
``jnp.int4`` for "int4"), which backends that pack sub-byte types store two per byte. Both
dequantize to the same bits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lora_jax import layouts as _lay
from lora_jax import paths as _paths
from lora_jax.anchors import zero_from
from lora_jax.protocols import register_base_leaf
from lora_jax import validation as V

FORMATS = ("nf4", "fp4", "int4", "int8")
STORAGES = ("packed", "native")
_F32 = np.float32
_DQ_BLOCK = 256  # bitsandbytes quantizes the absmax in blocks of 256
# Above 2**126 a float32's reciprocal is subnormal, which XLA flushes to zero: such scales are
# first multiplied by 2**-64 (exact), as are the values they divide.
_BIG = _F32(2.0**126)
_SHRINK = _F32(2.0**-64)

# bitsandbytes functional.get_4bit_type; index = stored 4-bit code. FP4's entry 8 is +0.0:
# bitsandbytes writes it as the Python int `-0`.
_CODES = {
    "nf4": np.array(
        [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
         -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
         0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
         0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], _F32),
    "fp4": np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], _F32)
    / _F32(12),
    "int4": np.arange(-8, 8, dtype=_F32) / _F32(7),  # code 0 (-8/7) is never produced
    "int8": np.arange(-128, 128, dtype=_F32) / _F32(127),  # indexed by code + 128
}


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
        return sum(-(-a.size * _bits(a.dtype) // 8) for a in arrays if a is not None)

    def dequantize(self, dtype: Any = None, *, after: jax.Array | None = None) -> jax.Array:
        """The dense array, in ``dtype`` (default: the original dtype); jittable.

        Args:
          dtype: output dtype; values are computed in float32 and then cast, as bitsandbytes.
          after: an array (e.g. the layer's input) that the whole dequantization is made to
            depend on, so that XLA computes the dense weight only when it is about to be used
            instead of hoisting every layer's weight to the start of the program.

        Returns:
          An array of the original shape.

        >>> q = quantize_array(jnp.linspace(-1.0, 1.0, 64), "nf4")
        >>> q.dequantize().shape, str(q.dequantize("bfloat16").dtype)
        ((64,), 'bfloat16')
        """
        out = jnp.dtype(self.dtype if dtype is None else dtype).name
        zero = jnp.zeros((), jnp.float32) if after is None else zero_from(after)
        flat_shape = self.shape if self.order is None else tuple(self.shape[k] for k in self.order)
        w = _dequantize(self.codes, self.absmax, self.absmax2, self.offset, zero,
                        shape=flat_shape, fmt=self.format, block_size=self.block_size,
                        dtype=out, storage=self.storage)
        # A transpose that XLA folds into the consuming matmul's dimension numbers.
        return w if self.order is None else jnp.transpose(w, np.argsort(self.order))

    def requantize(self, x: jax.typing.ArrayLike, path: str = "<array>") -> QuantizedArray:
        """``x`` quantized with this array's format, block size, double quantization and
        storage."""
        return quantize_array(x, self.format, block_size=self.block_size,
                              double_quant=self.double_quant, storage=self.storage, path=path,
                              order=self.order)

    def with_storage(self, storage: str, path: str = "<array>") -> QuantizedArray:
        """The same codes in ``storage`` ("packed" or "native"): exact, jittable.

        >>> q = quantize_array(jnp.linspace(-1.0, 1.0, 64), "nf4")
        >>> n = q.with_storage("native")
        >>> str(n.codes.dtype), n.codes.shape, q.nbytes == n.nbytes
        ('uint4', (64,), True)
        >>> bool((n.dequantize() == q.dequantize()).all())
        True
        """
        _check_storage(self.format, storage, path)
        if storage == self.storage:
            return self
        codes = _store(_nibbles(self.codes, self.format, self.storage), self.format, storage)
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
        if self.double_quant and nb % _DQ_BLOCK:
            return (f"blocks straddle layers: a layer holds {nb} blocks, not a multiple of the "
                    f"{_DQ_BLOCK} that double quantization groups")
        return self.replace(
            codes=self.codes.reshape(n_layers, -1),
            absmax=self.absmax.reshape(n_layers, nb),
            absmax2=None if self.absmax2 is None else self.absmax2.reshape(
                n_layers, nb // _DQ_BLOCK),
            offset=None if self.offset is None else jnp.broadcast_to(self.offset, (n_layers,)),
            shape=self.shape[1:],
            order=None if self.order is None else _normal_order(tuple(k - 1 for k in self.order[1:])))

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
                      and self.absmax.shape[0] % (_DQ_BLOCK * n) == 0) else rep
        return self.replace(codes=flat, absmax=flat,
                            absmax2=None if self.absmax2 is None else dq,
                            offset=None if self.offset is None else rep)

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        native = ", native" if self.storage == "native" else ""
        order = "" if self.order is None else f", order={self.order}"
        return (f"QuantizedArray({self.format}, shape={self.shape}, dtype={self.dtype_name}, "
                f"block_size={self.block_size}{dq}{native}{order})")


def _normal_order(order: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """``None`` for the identity (row-major) order."""
    if order is None or tuple(order) == tuple(range(len(order))):
        return None
    return tuple(int(k) for k in order)


register_base_leaf(QuantizedArray)


def is_quantized(x: Any) -> bool:
    """True for a :class:`QuantizedArray`.

    >>> is_quantized(quantize_array(jnp.ones((4, 16)))), is_quantized(jnp.ones(3))
    (True, False)
    """
    return isinstance(x, QuantizedArray)


# ---------------------------------------------------------------------------------------------
# Constants reproduced from bitsandbytes / PyTorch (computed once, in numpy).


def _bounds(fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """Midpoints of the sorted code and the sort order (bnb ``_get_4bit_quantize_bounds``)."""
    code = _CODES[fmt]
    order = np.argsort(code, kind="stable")  # FP4's two zeros keep index order: 0, then 8
    return (code[order[:-1]] + code[order[1:]]) / _F32(2), order.astype(np.uint8)


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace`` in float32 as PyTorch's CPU kernel computes it.

    The kernel is ``start + step * i`` for the first half and ``end - step * (steps - i - 1)``
    for the second; its AVX2 build contracts both to FMAs (one rounding), which float64 reproduces
    exactly here because the products and sums fit in 53 bits.
    """
    start, end = _F32(start), _F32(end)
    step = np.float64((end - start) / _F32(steps - 1))
    i = np.arange(steps)
    values = np.where(i < steps // 2, np.float64(start) + step * i,
                      np.float64(end) - step * (steps - 1 - i))
    return values.astype(_F32)


@functools.cache
def _dynamic_map() -> np.ndarray:
    """The signed 8-bit dynamic map, as bnb ``create_dynamic_map(signed=True)`` builds it."""
    parts = [np.array([0.0, 1.0], _F32)]
    for i in range(7):  # 7 exponent levels; level i has 2**i fraction values per sign
        bounds = _torch_linspace(0.1, 1.0, 2**i + 1)
        means = (bounds[:-1] + bounds[1:]) / _F32(2)
        scale = _F32(10.0 ** (i - 6))
        parts += [scale * means, -scale * means]
    return np.sort(np.concatenate(parts))


def _to_ordered(v: np.ndarray) -> np.ndarray:
    bits = np.asarray(v, _F32).view(np.int32).astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def _from_ordered(o: np.ndarray) -> np.ndarray:
    bits = np.where(o < 0, (-o) | 0x80000000, o)
    return bits.astype(np.uint32).view(_F32)


def _grid_index(v: np.ndarray) -> np.ndarray:
    """bnb C++ ``norm_to_lut_index``: (v + 1) * 0.5 * 65535 + 0.5, truncated.

    Computed here with the last multiply-add as one FMA; without the FMA the 255 thresholds
    below come out the same.
    """
    t = (np.clip(v, _F32(-1), _F32(1)) + _F32(1)) * _F32(0.5)
    return (t.astype(np.float64) * 65535.0 + 0.5).astype(_F32).astype(np.int64)


@functools.cache
def _dynamic_thresholds() -> np.ndarray:
    """``T[k-1]`` = the smallest float32 that bnb's C++ CPU kernel maps to code >= k.

    That kernel rounds a scaled value to one of 65,536 grid points over [-1, 1] and looks the
    code up in a table built by walking the midpoints of the map (``midpoint < grid value``
    moves to the next code). Both steps are monotone, so the code of any float32 ``s`` is
    ``searchsorted(T, s, side="right")``: exact, and cheap to evaluate in XLA.
    """
    code = _dynamic_map()
    midpoints = _F32(0.5) * (code[:-1] + code[1:])
    grid = _F32(-1) + (_F32(2) * np.arange(65536, dtype=_F32)) / _F32(65535)
    table = np.searchsorted(midpoints, grid, side="left")
    first = np.searchsorted(table, np.arange(1, 256), side="left")  # first grid point of code k
    lo = np.full(255, _to_ordered(_F32(-1)))
    hi = np.full(255, _to_ordered(_F32(1)))
    while np.any(lo < hi):  # bisection over the float32 values in [-1, 1]
        mid = lo + (hi - lo) // 2
        ok = _grid_index(_from_ordered(mid)) >= first
        hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid + 1)
    return _from_ordered(lo)


# ---------------------------------------------------------------------------------------------
# Kernels (pure jnp, static shapes).


def _seqsum(a: jax.Array) -> jax.Array:
    """Left-to-right float32 sum over axis 0 (XLA keeps the order of explicit adds)."""
    if a.shape[0] == 0:
        return jnp.zeros(a.shape[1:], a.dtype)
    if a.shape[0] <= 64:
        return functools.reduce(lambda s, r: s + r, [a[i] for i in range(1, a.shape[0])], a[0])
    return jax.lax.scan(lambda s, r: (s + r, None), a[0], a[1:])[0]


def _row_sum(x: jax.Array) -> jax.Array:
    """ATen ``row_sum`` (SumKernel.cpp) over the rows of ``x``: 4 interleaved cascaded sums."""
    size, lanes = x.shape
    n_ilp = size // 4
    acc = x[: n_ilp * 4].reshape(n_ilp, 4 * lanes)
    # multi_row_sum: chunks of `step` rows are summed, chunk sums in groups of `step`, and so on
    # for 4 levels; what is left at each level is added at the end, lowest level first.
    power = max(4, (1 if n_ilp <= 2 else (n_ilp - 1).bit_length()) // 4)
    step, leftovers = 1 << power, []
    for _ in range(3):
        m = acc.shape[0] // step
        leftovers.append(_seqsum(acc[m * step:]))
        acc = _seqsum(jnp.moveaxis(acc[: m * step].reshape(m, step, 4 * lanes), 1, 0))
    partial = _seqsum(jnp.stack(leftovers + [_seqsum(acc)])).reshape(4, lanes)
    first = _seqsum(jnp.concatenate([partial[:1], x[n_ilp * 4:]]))
    return _seqsum(jnp.concatenate([first[None], partial[1:]]))


def _torch_mean(x: jax.Array) -> jax.Array:
    """``torch.mean`` of a 1-D float32 array, in the summation order of PyTorch's AVX2 kernel."""
    n = x.shape[0]
    if n >= 8:  # vectorized_inner_sum: 8-lane vectors through row_sum, then the tail, then lanes
        n_vec = n // 8
        lanes = _row_sum(x[: n_vec * 8].reshape(n_vec, 8))
        total = _seqsum(jnp.concatenate([jnp.zeros(1, x.dtype), x[n_vec * 8:], lanes]))
    else:
        total = _row_sum(x[:, None])[0]
    # XLA compiles a division by a constant to a multiplication by its reciprocal: hide n.
    return total / jnp.where(jnp.isnan(total), _F32(1), _F32(n))


def _scale_blocks(flat: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """Per-block absmax and clamp(x / absmax, -1, 1) the way bitsandbytes 0.50 computes them."""
    n = flat.shape[0]
    full = n // block_size
    blocks = flat[: full * block_size].reshape(full, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    inv, shrink = _reciprocal(absmax)
    scaled = ((blocks * shrink[:, None]) * inv[:, None]).reshape(-1)
    if n % block_size:  # bnb: the partial block divides by its absmax, clamped to 1e-38
        tail = flat[full * block_size:]
        tail_max = jnp.max(jnp.abs(tail))
        tail_max = jnp.where(tail_max < np.finfo(_F32).tiny, _F32(1e-38), tail_max)
        tail_scaled = jnp.where(tail_max >= np.finfo(_F32).tiny, tail / tail_max, 0)
        absmax = jnp.concatenate([absmax, tail_max[None]])
        scaled = jnp.concatenate([scaled, tail_scaled])
    return absmax, jnp.clip(scaled, -1, 1)


def _reciprocal(absmax: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(1 / (absmax * shrink), shrink)``: shrink is 1 (bit-exact bnb) except for scales
    above 2**126, up to float32's maximum, whose reciprocal XLA would flush to zero."""
    shrink = jnp.where(absmax > _BIG, _SHRINK, _F32(1))
    return jnp.where(absmax > 0, 1 / (absmax * shrink), 0), shrink


def _dynamic_codes(scaled: jax.Array) -> jax.Array:
    """8-bit dynamic code of each scaled value: how many thresholds are <= it."""
    thresholds = jnp.asarray(_dynamic_thresholds())  # 255 = 2**8 - 1 sorted values
    idx = jnp.zeros(scaled.shape, jnp.int32)
    for step in (128, 64, 32, 16, 8, 4, 2, 1):  # branchless binary search
        idx = jnp.where(thresholds[idx + step - 1] <= scaled, idx + step, idx)
    return idx


def _quantize_absmax(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Double quantization: 8-bit dynamic codes of absmax - mean, per 256 values."""
    offset = _torch_mean(absmax)
    # A sum of scales near float32's maximum overflows: then the same sums of the scales times
    # 2**-64 (exact while nothing overflows), times 2**64, clipped to the largest float32.
    offset = jax.lax.cond(
        jnp.isinf(offset),
        lambda: jnp.minimum(_torch_mean(absmax * _SHRINK) / _SHRINK, np.finfo(_F32).max),
        lambda: offset)
    nb = absmax.shape[0]
    groups = -(-nb // _DQ_BLOCK)
    v = jnp.pad(absmax - offset, (0, groups * _DQ_BLOCK - nb)).reshape(groups, _DQ_BLOCK)
    absmax2 = jnp.max(jnp.abs(v), axis=1)
    inv, shrink = _reciprocal(absmax2)
    codes = _dynamic_codes((v * shrink[:, None]) * inv[:, None])
    codes = jnp.where(absmax2[:, None] > 0, codes, 0)  # the C++ kernel writes 0 for a zero block
    return codes.reshape(-1)[:nb].astype(jnp.uint8), absmax2, offset


_NATIVE = {"int4": jnp.int4}  # other 4-bit formats: jnp.uint4 (an index into the code table)


def _bits(dtype) -> int:
    dtype = jnp.dtype(dtype)
    return 4 if dtype in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)) else 8 * dtype.itemsize


def _store(nibbles: jax.Array, fmt: str, storage: str) -> jax.Array:
    """4-bit codes (uint8 table indices, an even count) in ``storage``."""
    if storage == "packed":
        return (nibbles[0::2] << 4) | nibbles[1::2]
    if fmt in _NATIVE:  # int4: the signed code, index - 8
        return (nibbles.astype(jnp.int8) - 8).astype(_NATIVE[fmt])
    return nibbles.astype(jnp.uint4)


def _nibbles(codes: jax.Array, fmt: str, storage: str) -> jax.Array:
    """The uint8 table index of every stored 4-bit code (inverse of :func:`_store`)."""
    if storage == "packed":
        # Each byte broadcast to its two elements, then shifted: one elementwise loop that
        # XLA fuses into the consumer (a stack of the two nibbles does not fuse as well).
        pair = jnp.broadcast_to(codes[:, None], (codes.shape[0], 2))
        shift = jnp.array([4, 0], codes.dtype)
        return ((pair >> shift) & 15).reshape(-1)
    if fmt in _NATIVE:
        return (codes.astype(jnp.int8) + 8).astype(jnp.uint8)
    return codes.astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("fmt", "block_size", "double_quant", "storage"))
def _quantize(x, *, fmt, block_size, double_quant, storage):
    flat = jnp.ravel(x).astype(jnp.float32)
    bad = jnp.sum(~jnp.isfinite(flat), dtype=jnp.int32)
    absmax, scaled = _scale_blocks(flat, block_size)
    if fmt == "int8":
        codes = jnp.round(scaled * _F32(127)).astype(jnp.int8)
    else:
        midpoints, order = _bounds(fmt)
        if scaled.shape[0] % 2:
            scaled = jnp.pad(scaled, (0, 1))
        pos = sum((scaled > m).astype(jnp.uint8) for m in midpoints)  # bucketize, right=False
        q = pos if np.array_equal(order, np.arange(16)) else jnp.asarray(order)[pos]
        codes = _store(q, fmt, storage)
    if not double_quant:
        return codes, absmax, None, None, bad
    return codes, *_quantize_absmax(absmax), bad


def _block_absmax(absmax, absmax2, offset):
    if absmax2 is None:
        return absmax
    nb = absmax.shape[0]
    groups = absmax2.shape[0]
    codes = jnp.pad(absmax, (0, groups * _DQ_BLOCK - nb)).reshape(groups, _DQ_BLOCK)
    scaled = (jnp.asarray(_dynamic_map())[codes] * absmax2[:, None]).reshape(-1)[:nb]
    # bnb rounds the product before adding the offset, but XLA fuses `a * b + c` into one FMA
    # (one rounding). An integer xor between the two, with a mask that is 0 unless the offset is
    # NaN (then the result is NaN anyway), is opaque to the compiler and keeps both roundings.
    mask = jnp.isnan(offset).astype(jnp.uint32)
    bits = jax.lax.bitcast_convert_type(scaled, jnp.uint32) ^ mask
    # Scales near float32's maximum can round past it: clip rather than give inf (and NaN).
    return jnp.minimum(jax.lax.bitcast_convert_type(bits, jnp.float32) + offset,
                       np.finfo(_F32).max)


@functools.partial(jax.jit, static_argnames=("shape", "fmt", "block_size", "dtype", "storage"))
def _dequantize(codes, absmax, absmax2, offset, zero, *, shape, fmt, block_size, dtype,
                storage):
    n = math.prod(shape)
    scale = _block_absmax(absmax, absmax2, offset)
    # ``zero`` (an exact 0) ties the codes and the code table, hence every intermediate of
    # the size of the array, to the caller's anchor, so none of it is computed early.
    table = jnp.asarray(_CODES[fmt]) + zero
    codes = codes + zero.astype(codes.dtype)
    if fmt == "int8":
        values = table[codes.astype(jnp.int32) + 128]
    else:
        values = table[_nibbles(codes, fmt, storage)]
    padded = scale.shape[0] * block_size
    values = jnp.pad(values[:padded], (0, max(0, padded - values.shape[0])))
    out = (values.reshape(-1, block_size) * scale[:, None]).reshape(-1)[:n]
    return out.reshape(shape).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Public API.


def _check_config(format: str, block_size: int, where: str, storage: str = "packed") -> int:
    if format not in FORMATS:
        raise ValueError(
            f"{where}: unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    ok = isinstance(block_size, (int, np.integer)) and not isinstance(block_size, bool)
    if not ok or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"{where}: block_size must be a power of two >= 16, got {block_size!r}")
    _check_storage(format, storage, where)
    return int(block_size)


def _check_storage(format: str, storage: str, where: str) -> None:
    if storage not in STORAGES:
        raise ValueError(f"{where}: unknown storage {storage!r}; expected 'packed' or 'native'")
    if storage == "native" and format == "int8":
        raise ValueError(f"{where}: storage='native' is for the 4-bit formats; int8 codes are "
                         "already one int8 each (use storage='packed')")


def quantize_array(
    x: jax.typing.ArrayLike,
    format: str = "nf4",
    *,
    block_size: int = 64,
    double_quant: bool = False,
    storage: str = "packed",
    path: str = "<array>",
    order: Sequence[int] | None = None,
) -> QuantizedArray:
    """Block-quantizes one floating-point array (jittable; shapes and options are static).

    Args:
      x: a bf16, f16, f32 or f64 array of any shape.
      format: "nf4", "fp4" (both as bitsandbytes 0.50), "int4" or "int8".
      block_size: elements per absmax block, a power of two >= 16.
      double_quant: also quantize the absmax (8-bit dynamic codes per 256 blocks).
      storage: "packed" (two 4-bit codes per uint8, bitsandbytes' layout) or "native" (one
        ``jnp.uint4``/``jnp.int4`` element per code, see :class:`QuantizedArray`); the values
        are the same. "int8" has only "packed".
      path: the parameter's name, used in error messages.
      order: flatten ``x`` in this axis order (``x.transpose(order)``, row-major) before
        blocking; ``None`` for ``x``'s own order. ``dequantize`` undoes it.

    Returns:
      A :class:`QuantizedArray`.

    Raises:
      ValueError: unknown format or storage, "native" with "int8", bad block size, empty
        ``x``, or NaN/Inf in ``x``. NaN/Inf are detected only outside ``jax.jit``; under a
        trace they silently give NaN blocks.
      TypeError: ``x`` has an integer or boolean dtype.

    >>> q = quantize_array(jnp.arange(128.0).reshape(2, 64), "nf4")
    >>> q.codes.shape, q.absmax.tolist()
    ((64,), [63.0, 127.0])
    >>> n = quantize_array(jnp.arange(128.0).reshape(2, 64), "nf4", storage="native")
    >>> str(n.codes.dtype), n.codes.shape, n.nbytes
    ('uint4', (128,), 72)
    """
    block_size = _check_config(format, block_size, path, storage)
    if not hasattr(x, "dtype"):
        try:
            x = jnp.asarray(x)
        except (TypeError, ValueError):
            raise TypeError(f"{path}: cannot quantize a {type(x).__name__}; expected a "
                            "floating-point array") from None
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{path}: cannot quantize an array of dtype {x.dtype}; "
                        "expected a floating-point array (bf16, f16, f32 or f64)")
    if math.prod(x.shape) == 0:
        raise ValueError(f"{path}: cannot quantize an empty array of shape {tuple(x.shape)}")
    double_quant = bool(double_quant)
    if order is not None:
        if sorted(order) != list(range(len(x.shape))):
            raise ValueError(f"{path}: order {tuple(order)} is not a permutation of the axes of "
                             f"shape {tuple(x.shape)}")
        order = _normal_order(tuple(order))
    xt = jnp.asarray(x) if order is None else jnp.transpose(jnp.asarray(x), order)
    codes, absmax, absmax2, offset, bad = _quantize(
        xt, fmt=format, block_size=block_size, double_quant=double_quant, storage=storage)
    if not isinstance(bad, jax.core.Tracer) and int(bad):  # a traced input can't be checked
        wide = " (or values beyond float32's range, which the formats compute in)" if \
            jnp.dtype(x.dtype).itemsize > 4 else ""
        raise ValueError(f"{path}: cannot quantize an array with {int(bad)} NaN or Inf "
                         f"value(s){wide}")
    return QuantizedArray(codes, absmax, absmax2, offset, shape=tuple(int(d) for d in x.shape),
                          dtype_name=jnp.dtype(x.dtype).name, block_size=block_size,
                          format=format, double_quant=double_quant, storage=storage, order=order)


BLOCKS = ("input", "row-major")


def quantize(
    params: Any,
    format: str = "nf4",
    *,
    block_size: int = 64,
    double_quant: bool = True,
    targets: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    min_size: int = 0,
    storage: str = "packed",
    layouts: Mapping[str, Any] | None = None,
    blocks: str = "input",
    in_axes: int | Mapping[str, int] | None = None,
    stack_axes: int | Mapping[str, int] | None = None,
) -> Any:
    """Replaces selected leaves of a parameter tree by :class:`QuantizedArray` leaves.

    Paths are '/'-joined keys (``"params/Dense_0/kernel"``), matched with ``re.fullmatch``.
    Targets follow the rule of :func:`lora_jax.init`: with ``layouts``, every weight the
    model reads with a matmul; without, every float weight named ``kernel``, ``w`` or
    ``weight`` with two or more axes.

    Args:
      params: a pytree of arrays (Linen variables, an NNX ``State``, nested dicts...).
      format: "nf4", "fp4", "int4" or "int8".
      block_size: elements per absmax block, a power of two >= 16.
      double_quant: quantize the absmax too (QLoRA's default, ~4.127 bits per NF4 parameter).
      targets: a regex or list of regexes/paths choosing the floating-point leaves to quantize.
      exclude: a regex or list of them; matching leaves stay dense.
      min_size: leaves with fewer elements stay dense.
      storage: "packed" or "native" 4-bit codes (see :func:`quantize_array`).
      layouts: from :func:`lora_jax.trace`: targets and each kernel's input/output/stack axes.
      blocks: ``"input"`` (default): blocks run along each kernel's input axes, flattened as
        ``(*stack, *out, *in)``: for a Dense ``(in, out)`` kernel that is the blocking
        bitsandbytes applies to the PyTorch ``(out, in)`` weight, so the same model gets the
        same codes here and there. ``"row-major"``: the kernel flattened in its own order
        (blocks along the last axis; this library's layout before 0.2).
      in_axes, stack_axes: the layout of kernels ``layouts`` does not cover, as in
        :func:`lora_jax.init` (``nn.scan`` kernels need ``stack_axes=1`` without
        ``layouts``, so that each layer's blocks stay within the layer).

    Returns:
      A tree of the same structure; leaves already quantized are kept as they are.

    Raises:
      ValueError: a targets pattern matches no floating-point leaf, the selection quantizes
        nothing, or a bad format/block size/storage/blocks.

    >>> params = {"Dense_0": {"kernel": jnp.ones((64, 8)), "bias": jnp.ones(8)}}
    >>> q = quantize(params, "nf4")
    >>> is_quantized(q["Dense_0"]["kernel"]), is_quantized(q["Dense_0"]["bias"])
    (True, False)
    >>> q["Dense_0"]["kernel"].order    # blocks along the 64 inputs, as bitsandbytes
    (1, 0)
    """
    block_size = _check_config(format, block_size, "quantize", storage)
    if blocks not in BLOCKS:
        raise ValueError(f"quantize: blocks must be one of {BLOCKS}, got {blocks!r}")
    V.patterns(targets, "quantize: targets")
    V.patterns(exclude, "quantize: exclude")
    min_size = V.integer(min_size, "quantize: min_size", low=0)
    targets, exclude = _paths.as_patterns(targets), _paths.as_patterns(exclude)
    dense = None if layouts is None else {p for p, w in layouts.items() if w.kind == "dense"}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)
    used, out, seen, n_quantized = set(), [], [], 0
    for keypath, leaf in leaves:
        path = _paths.path_str(keypath)
        dtype = getattr(leaf, "dtype", None)
        if is_quantized(leaf):
            n_quantized += 1
        if is_quantized(leaf) or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            out.append(leaf)
            continue
        seen.append(path)
        if targets:
            hits = {p for p in targets if _paths.matches(path, (p,))}
            used |= hits
            selected = bool(hits)
        elif dense is not None:
            selected = path in dense
        else:
            selected = _paths.is_default_target(path, leaf)
        selected = selected and not _paths.matches(path, exclude)
        if selected and math.prod(leaf.shape) >= min_size:
            order = None
            if blocks == "input" and len(leaf.shape) >= 2:
                traced = None if layouts is None else layouts.get(path)
                sa = _paths.setting_for(stack_axes, path, None, None)
                ia = _paths.setting_for(in_axes, path, None, None)
                if traced is not None and traced.roles is not None and sa is None and ia is None:
                    roles = traced.roles
                else:
                    roles = _lay.from_names(path, leaf.shape, sa or 0, ia)
                order = _lay.block_order(roles)
            leaf = quantize_array(leaf, format, block_size=block_size, double_quant=double_quant,
                                  storage=storage, path=path, order=order)
            n_quantized += 1
        out.append(leaf)
    for p in targets:
        if p not in used:
            raise ValueError(f"quantize: targets pattern {p!r} matches no floating-point leaf; "
                             f"paths look like {seen[:4]}")
    if not n_quantized:
        rule = ("targets=" + repr(list(targets)) if targets else
                "the weights the traced function reads with a matmul" if dense is not None else
                "float weights named " + "/".join(_paths.KERNEL_NAMES) + " with >= 2 axes")
        raise ValueError(
            f"quantize selected nothing to quantize (rule: {rule}, exclude={list(exclude)}, "
            f"min_size={min_size}) among the {len(seen)} floating-point leaves "
            f"{seen[:6]}{' ...' if len(seen) > 6 else ''}; pass targets= (regexes over these "
            "paths) or layouts=lora_jax.trace(fn, params, *args)")
    return jax.tree_util.tree_unflatten(treedef, out)


def dequantize_tree(tree: Any, dtype: Any = None) -> Any:
    """Replaces every :class:`QuantizedArray` leaf by its dense array; other leaves unchanged.

    Args:
      tree: a pytree, possibly with quantized leaves.
      dtype: dtype of the dequantized leaves (default: each leaf's original dtype).

    Returns:
      A tree of plain arrays.

    >>> dense = dequantize_tree(quantize({"kernel": jnp.ones((16, 4))}))
    >>> dense["kernel"].shape
    (16, 4)
    """
    return jax.tree_util.tree_map(
        lambda x: x.dequantize(dtype) if is_quantized(x) else x, tree, is_leaf=is_quantized)


def quantized_bytes(tree: Any) -> dict[str, Any]:
    """Storage of the quantized leaves of a tree, measured from their arrays.

    Native 4-bit codes count 4 bits each (see :attr:`QuantizedArray.nbytes`), so both storages
    of the same format give the same figures.

    Returns:
      ``{"leaves": {path: bytes}, "total": bytes, "params": elements, "dense_bytes": bytes in
      the original dtypes, "bits_per_param": 8 * total / params}``, over quantized leaves only.

    >>> stats = quantized_bytes(quantize({"kernel": jnp.ones((1024, 1024))}))
    >>> round(stats["bits_per_param"], 3)
    4.127
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)
    per_leaf = {_paths.path_str(k): x.nbytes for k, x in leaves if is_quantized(x)}
    quantized = [x for _, x in leaves if is_quantized(x)]
    total = sum(per_leaf.values())
    params = sum(x.size for x in quantized)
    return {
        "leaves": per_leaf,
        "total": total,
        "params": params,
        "dense_bytes": sum(x.size * x.dtype.itemsize for x in quantized),
        "bits_per_param": 8 * total / params if params else 0.0,
    }
