"""Constants and numerics reproduced from bitsandbytes 0.50 and PyTorch, for byte-exact codes.

NF4 and FP4 follow bitsandbytes byte for byte on float32 input (``quantize_4bit`` of its
default backend, ``compress_statistics`` for double quantization):

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
inputs are cast to float32 first, as bitsandbytes does.

This file holds what those rules need: the code tables (:data:`CODES`), their bucketize bounds,
the 8-bit dynamic map and the thresholds of bitsandbytes' lookup grid (computed once, in
numpy), and ``torch.mean`` in PyTorch's float32 summation order (in ``jnp``). The kernels that
use them are in :mod:`lora_jax.quant.kernels`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt

_F32 = np.float32
DQ_BLOCK = 256  # bitsandbytes quantizes the absmax in blocks of 256

# bitsandbytes functional.get_4bit_type; index = stored 4-bit code. FP4's entry 8 is +0.0:
# bitsandbytes writes it as the Python int `-0`. "int4" and "int8" are this library's
# symmetric formats, on the same footing.
CODES = {
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


# ---------------------------------------------------------------------------------------------
# Code tables and the dynamic map (numpy, computed once).


def bounds(fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """Midpoints of the sorted code and the sort order (bnb ``_get_4bit_quantize_bounds``)."""
    code = CODES[fmt]
    order = np.argsort(code, kind="stable")  # FP4's two zeros keep index order: 0, then 8
    return (code[order[:-1]] + code[order[1:]]) / _F32(2), order.astype(np.uint8)


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace`` in float32 as PyTorch's CPU kernel computes it.

    The kernel is ``start + step * i`` for the first half and ``end - step * (steps - i - 1)``
    for the second; its AVX2 build contracts both to FMAs (one rounding), which float64 reproduces
    exactly here because the products and sums fit in 53 bits.
    """
    start32, end32 = _F32(start), _F32(end)
    step = np.float64((end32 - start32) / _F32(steps - 1))
    i = np.arange(steps)
    values = np.where(i < steps // 2, np.float64(start32) + step * i,
                      np.float64(end32) - step * (steps - 1 - i))
    return values.astype(_F32)


@functools.cache
def dynamic_map() -> np.ndarray:
    """The signed 8-bit dynamic map, as bnb ``create_dynamic_map(signed=True)`` builds it."""
    parts = [np.array([0.0, 1.0], _F32)]
    for i in range(7):  # 7 exponent levels; level i has 2**i fraction values per sign
        edges = torch_linspace(0.1, 1.0, 2**i + 1)
        means = (edges[:-1] + edges[1:]) / _F32(2)
        scale = _F32(10.0 ** (i - 6))
        parts += [scale * means, -scale * means]
    return np.sort(np.concatenate(parts))


def _to_ordered(v: npt.ArrayLike) -> np.ndarray:
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
def dynamic_thresholds() -> np.ndarray:
    """``T[k-1]`` = the smallest float32 that bnb's C++ CPU kernel maps to code >= k.

    That kernel rounds a scaled value to one of 65,536 grid points over [-1, 1] and looks the
    code up in a table built by walking the midpoints of the map (``midpoint < grid value``
    moves to the next code). Both steps are monotone, so the code of any float32 ``s`` is
    ``searchsorted(T, s, side="right")``: exact, and cheap to evaluate in XLA.
    """
    code = dynamic_map()
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
# PyTorch's float32 summation order (pure jnp, static shapes).


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


def torch_mean(x: jax.Array) -> jax.Array:
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
