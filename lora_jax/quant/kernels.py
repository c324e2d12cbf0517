"""The jitted block-quantization kernels: scaling, codes, double quantization, packing.

Pure ``jnp`` on static shapes. :func:`quantize_blocks` turns a flat float32 tensor into codes
and per-block scales (optionally double quantized); :func:`dequantize_blocks` inverts it.
4-bit codes are stored "packed" (two per uint8, bitsandbytes' layout) or "native" (one per
element of a 4-bit XLA type); :func:`store` and :func:`nibbles` convert between the uint8 table
index of each code and its stored form. The bitsandbytes rules these kernels follow, and the
tables they read, are in :mod:`lora_jax.quant.bnb`.
"""

from __future__ import annotations

import functools
import math
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.quant import bnb

_F32 = np.float32
# Above 2**126 a float32's reciprocal is subnormal, which XLA flushes to zero: such scales are
# first multiplied by 2**-64 (exact), as are the values they divide.
_BIG = _F32(2.0**126)
_SHRINK = _F32(2.0**-64)
_NATIVE = {"int4": jnp.int4}  # other 4-bit formats: jnp.uint4 (an index into the code table)


def bits(dtype) -> int:
    """Bits per element of a stored array: 4 for ``uint4``/``int4``, else 8 per byte."""
    dtype = jnp.dtype(dtype)
    return 4 if dtype in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)) else 8 * dtype.itemsize


# ---------------------------------------------------------------------------------------------
# Block scaling and double quantization.


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


def dynamic_codes(scaled: jax.Array) -> jax.Array:
    """8-bit dynamic code of each scaled value: how many thresholds are <= it."""
    thresholds = jnp.asarray(bnb.dynamic_thresholds())  # 255 = 2**8 - 1 sorted values
    idx = jnp.zeros(scaled.shape, jnp.int32)
    for step in (128, 64, 32, 16, 8, 4, 2, 1):  # branchless binary search
        idx = jnp.where(thresholds[idx + step - 1] <= scaled, idx + step, idx)
    return idx


def _quantize_absmax(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Double quantization: 8-bit dynamic codes of absmax - mean, per 256 values."""
    offset = bnb.torch_mean(absmax)
    # A sum of scales near float32's maximum overflows: then the same sums of the scales times
    # 2**-64 (exact while nothing overflows), times 2**64, clipped to the largest float32.
    offset = jax.lax.cond(
        jnp.isinf(offset),
        lambda: jnp.minimum(bnb.torch_mean(absmax * _SHRINK) / _SHRINK, np.finfo(_F32).max),
        lambda: offset)
    nb = absmax.shape[0]
    groups = -(-nb // bnb.DQ_BLOCK)
    v = jnp.pad(absmax - offset, (0, groups * bnb.DQ_BLOCK - nb)).reshape(groups, bnb.DQ_BLOCK)
    absmax2 = jnp.max(jnp.abs(v), axis=1)
    inv, shrink = _reciprocal(absmax2)
    codes = dynamic_codes((v * shrink[:, None]) * inv[:, None])
    codes = jnp.where(absmax2[:, None] > 0, codes, 0)  # the C++ kernel writes 0 for a zero block
    return codes.reshape(-1)[:nb].astype(jnp.uint8), absmax2, offset


def block_absmax(absmax, absmax2, offset):
    """The float32 absmax of every block: ``absmax`` itself, or decoded from its 8-bit codes
    (``absmax2``, ``offset``) under double quantization."""
    if absmax2 is None:
        return absmax
    nb = absmax.shape[0]
    groups = absmax2.shape[0]
    codes = jnp.pad(absmax, (0, groups * bnb.DQ_BLOCK - nb)).reshape(groups, bnb.DQ_BLOCK)
    scaled = (jnp.asarray(bnb.dynamic_map())[codes] * absmax2[:, None]).reshape(-1)[:nb]
    # bnb rounds the product before adding the offset, but XLA fuses `a * b + c` into one FMA
    # (one rounding). An integer xor between the two, with a mask that is 0 unless the offset is
    # NaN (then the result is NaN anyway), is opaque to the compiler and keeps both roundings.
    mask = jnp.isnan(offset).astype(jnp.uint32)
    raw = jax.lax.bitcast_convert_type(scaled, jnp.uint32) ^ mask
    # Scales near float32's maximum can round past it: clip rather than give inf (and NaN).
    return jnp.minimum(jax.lax.bitcast_convert_type(raw, jnp.float32) + offset,
                       np.finfo(_F32).max)


# ---------------------------------------------------------------------------------------------
# Storage of 4-bit codes.


def store(nibbles: jax.Array, fmt: str, storage: str) -> jax.Array:
    """4-bit codes (uint8 table indices, an even count) in ``storage``."""
    if storage == "packed":
        return (nibbles[0::2] << 4) | nibbles[1::2]
    if fmt in _NATIVE:  # int4: the signed code, index - 8
        return (nibbles.astype(jnp.int8) - 8).astype(_NATIVE[fmt])
    return nibbles.astype(jnp.uint4)


def nibbles(codes: jax.Array, fmt: str, storage: str) -> jax.Array:
    """The uint8 table index of every stored 4-bit code (inverse of :func:`store`)."""
    if storage == "packed":
        # Each byte broadcast to its two elements, then shifted: one elementwise loop that
        # XLA fuses into the consumer (a stack of the two nibbles does not fuse as well).
        pair = jnp.broadcast_to(codes[:, None], (codes.shape[0], 2))
        shift = jnp.array([4, 0], codes.dtype)
        return ((pair >> shift) & 15).reshape(-1)
    if fmt in _NATIVE:
        return (codes.astype(jnp.int8) + 8).astype(jnp.uint8)
    return codes.astype(jnp.uint8)


# ---------------------------------------------------------------------------------------------
# The kernels.


@functools.partial(jax.jit, static_argnames=("fmt", "block_size", "double_quant", "storage"))
def quantize_blocks(x, *, fmt, block_size, double_quant, storage):
    """``(codes, absmax, absmax2, offset, bad)`` of ``x`` flattened row-major; ``bad`` counts
    its NaN/Inf values, ``absmax2``/``offset`` are ``None`` without double quantization."""
    flat = jnp.ravel(x).astype(jnp.float32)
    bad = jnp.sum(~jnp.isfinite(flat), dtype=jnp.int32)
    absmax, scaled = _scale_blocks(flat, block_size)
    if fmt == "int8":
        codes = jnp.round(scaled * _F32(127)).astype(jnp.int8)
    else:
        midpoints, order = bnb.bounds(fmt)
        if scaled.shape[0] % 2:
            scaled = jnp.pad(scaled, (0, 1))
        # bucketize, right=False; an array, not sum()'s start 0: there are 15 midpoints
        pos = cast(jax.Array, sum((scaled > m).astype(jnp.uint8) for m in midpoints))
        q = pos if np.array_equal(order, np.arange(16)) else jnp.asarray(order)[pos]
        codes = store(q, fmt, storage)
    if not double_quant:
        return codes, absmax, None, None, bad
    return codes, *_quantize_absmax(absmax), bad


@jax.jit
def quantize_absmax(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(codes, absmax2, offset)``: double quantization of all the block scales of a tensor,
    for scales computed apart (by :func:`quantize_blocks` without ``double_quant``, a chunk or
    a shard at a time); the same values as ``quantize_blocks(..., double_quant=True)``."""
    return _quantize_absmax(absmax)


@functools.partial(jax.jit, static_argnames=("shape", "fmt", "block_size", "dtype", "storage"))
def dequantize_blocks(codes, absmax, absmax2, offset, zero, *, shape, fmt, block_size, dtype,
                      storage):
    """The dense array of ``shape`` (row-major) in ``dtype``; ``zero`` is an exact 0 that the
    result is made to depend on (see :func:`lora_jax.anchors.zero_from`)."""
    n = math.prod(shape)
    scale = block_absmax(absmax, absmax2, offset)
    # ``zero`` (an exact 0) ties the codes and the code table, hence every intermediate of
    # the size of the array, to the caller's anchor, so none of it is computed early.
    table = jnp.asarray(bnb.CODES[fmt]) + zero
    codes = codes + zero.astype(codes.dtype)
    if fmt == "int8":
        values = table[codes.astype(jnp.int32) + 128]
    else:
        values = table[nibbles(codes, fmt, storage)]
    padded = scale.shape[0] * block_size
    values = jnp.pad(values[:padded], (0, max(0, padded - values.shape[0])))
    out = (values.reshape(-1, block_size) * scale[:, None]).reshape(-1)[:n]
    return out.reshape(shape).astype(dtype)
