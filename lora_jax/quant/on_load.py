"""Quantizing a weight while it is read: a chunk of blocks at a time, only the local shards.

:func:`quantize_streamed` fills in a :class:`QuantizedArray` whose shapes are known (the
abstract leaf ``jax.eval_shape(quantize, ...)`` gives) from a reader of the weight's values
in storage order. It never holds the weight at full precision: it reads :data:`CHUNK`
elements, quantizes them without double quantization (blocks are independent), keeps the codes
and scales, and reads on. Double quantization needs the mean of *all* block scales of the
tensor, so it runs last, over the scales alone (1/64 of the float32 size at block 64); on a
mesh the scales of every shard are gathered for it first, so each process computes the same
offset as a single-process :func:`lora_jax.quantize`, bit for bit.

On a mesh (``shardings``: one ``NamedSharding`` per stored array, from
:func:`lora_jax.sharding.storage_specs`), codes and scales are sharded flat in block order,
so each device's shard is a run of whole blocks: the reader is asked for exactly those
elements, on the process whose device holds them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lora_jax.quant import kernels
from lora_jax.quant.array import QuantizedArray

# Elements quantized per kernel call (or one block, if larger): 4 MB of
# float32 at a time, and (padded) one compiled kernel shape for every chunk of every weight.
CHUNK = 1 << 20

Read = Callable[[int, int], np.ndarray]


def quantize_streamed(like: QuantizedArray, read: Read, *, path: str = "<array>",
                      shardings: QuantizedArray | None = None) -> QuantizedArray:
    """``like`` with its arrays computed from ``read``, the same as quantizing the whole weight.

    Args:
      like: the abstract leaf (its arrays ``jax.ShapeDtypeStruct``), e.g. a leaf of
        ``jax.eval_shape(lambda p: lora_jax.quantize(p, ...), abstract_params)``.
      read: ``read(start, stop)`` -> the float values ``[start, stop)`` of the weight
        flattened in its storage order (``weight.transpose(like.storage_order).ravel()``),
        already in the leaf's dtype (e.g. rounded to bf16 for a bf16 base).
      path: the parameter's name, for errors.
      shardings: ``like`` with a ``NamedSharding`` per stored array (``lora_jax.sharding.
        named(mesh, storage_specs(...))``), or None for arrays on the default device.

    Returns:
      The concrete :class:`QuantizedArray` (global arrays on the mesh when ``shardings``).

    Raises:
      ValueError: NaN or Inf among the values, naming ``path``. On a mesh, a failure on one
        process (NaN, a failed read) raises on every process, naming the process that failed.
    """
    n, bs = like.size, like.block_size
    nb = like.absmax.shape[0]
    if shardings is None:
        codes, absmax = _blocks(like, read, 0, n, path)
        fields: dict[str, Any] = {"codes": jnp.asarray(codes)}
        if like.absmax2 is None:
            fields["absmax"] = jnp.asarray(absmax)
        else:
            fields["absmax"], fields["absmax2"], fields["offset"] = kernels.quantize_absmax(
                jnp.asarray(absmax))
        return like.replace(**fields)

    # One entry per distinct run of blocks this process' devices hold.
    runs: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    per_block = like.codes.shape[0] / nb  # codes per block: a whole number when sharded

    def run_of(index) -> tuple[int, int]:
        b0, b1, _ = index[0].indices(nb)
        if (b0, b1) not in runs:
            runs[(b0, b1)] = _blocks(like, read, b0 * bs, min(b1 * bs, n), path)
        return b0, b1

    def codes_of(index):
        c0, c1, _ = index[0].indices(like.codes.shape[0])
        b0, b1 = round(c0 / per_block), round(c1 / per_block)
        return runs[run_of((slice(b0, b1),))][0]

    def absmax_of(index):
        return runs[run_of(index)][1]

    # ``shardings`` holds a NamedSharding where ``like`` holds an array (see Args)
    sh: Any = shardings
    # first-level scales in float32 (under double quantization ``like.absmax`` is their codes)
    scales = jax.ShapeDtypeStruct(like.absmax.shape, np.float32)

    def local() -> tuple[jax.Array, jax.Array]:
        return _assemble(like.codes, sh.codes, codes_of), _assemble(scales, sh.absmax, absmax_of)

    # A NaN or a failed read on one process fails every process here, before the gather of
    # the scales below, which would otherwise wait for it forever.
    if jax.process_count() == 1:  # nothing to agree on (and orbax stays unimported)
        codes, absmax = local()
    else:
        from lora_jax.checkpoint.collective import run_everywhere

        codes, absmax = run_everywhere(f"quantizing {path} while loading", local)
    if like.absmax2 is None:
        return like.replace(codes=codes, absmax=absmax)
    # The offset is the mean of every block's scale: gather them all, then quantize them.
    full = _replicated(absmax)
    q, absmax2, offset = (np.asarray(a) for a in kernels.quantize_absmax(jnp.asarray(full)))
    return like.replace(
        codes=codes,
        absmax=_assemble(like.absmax, sh.absmax, lambda idx: q[idx]),
        absmax2=_assemble(like.absmax2, sh.absmax2, lambda idx: absmax2[idx]),
        offset=_assemble(like.offset, sh.offset, lambda idx: offset[idx]))


def _blocks(like: QuantizedArray, read: Read, start: int, stop: int,
            path: str) -> tuple[np.ndarray, np.ndarray]:
    """Codes and (single-level) scales of the elements ``[start, stop)``, ``start`` on a block
    boundary, a chunk at a time."""
    bs = like.block_size
    chunk = max(CHUNK, bs)
    codes, absmax = [], []
    for s in range(start, stop, chunk):
        e = min(s + chunk, stop)
        x = np.asarray(read(s, e), np.float32).reshape(-1)
        if x.shape[0] != e - s:
            raise ValueError(f"{path}: the reader gave {x.shape[0]} values for [{s}, {e})")
        m = e - s
        if m < chunk and m % bs == 0:  # whole blocks: pad to the one compiled shape
            x = np.pad(x, (0, chunk - m))
        c, a, _, _, bad = kernels.quantize_blocks(
            x, fmt=like.format, block_size=bs, double_quant=False, storage=like.storage)
        if int(bad):
            raise ValueError(f"{path}: cannot quantize an array with {int(bad)} NaN or Inf "
                             f"value(s) (among elements {s}..{e} in storage order)")
        c, a = np.asarray(c), np.asarray(a)
        if x.shape[0] != m:  # drop the padding's codes and blocks
            c, a = c[: c.shape[0] * m // x.shape[0]], a[: math.ceil(m / bs)]
        codes.append(c)
        absmax.append(a)
        del x
    return np.concatenate(codes), np.concatenate(absmax)


def _assemble(like: Any, sharding: NamedSharding, piece: Callable[[Any], np.ndarray]):
    """A global array of ``like``'s shape on ``sharding`` from each local device's piece."""
    shape = tuple(like.shape)
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        x = np.asarray(piece(index), like.dtype)
        arrays.append(jax.device_put(x.reshape(_shard_shape(shape, index)), device))
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _shard_shape(shape, index) -> tuple[int, ...]:
    return tuple(len(range(*s.indices(d))) for s, d in zip(index, shape))


def _replicated(x: jax.Array) -> np.ndarray:
    """All of a (possibly multi-process) global array, on every process."""
    if not x.is_fully_replicated:
        sharding = x.sharding
        assert isinstance(sharding, NamedSharding)
        rep = NamedSharding(sharding.mesh, PartitionSpec())
        x = jax.jit(lambda a: a, out_shardings=rep)(x)
    return np.asarray(x.addressable_data(0))
