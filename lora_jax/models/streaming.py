"""Loading a parameter tree a tensor at a time: quantized while read, placed on a mesh while read.

:func:`load` builds the tree a loader describes (abstract shapes plus one :class:`Source` per
parameter) without ever holding the whole model at full precision: each tensor is read,
converted (or quantized, in chunks of blocks), placed, and dropped before the next one. Peak
memory is the result plus about one tensor. With a mesh, each process reads only the slices its
own devices hold (dense slices as the sharding cuts them, quantized weights as runs of whole
blocks) and assembles global arrays from them (``jax.make_array_from_single_device_arrays``).

The result is the same as loading densely and then calling :func:`lora_jax.quantize` (codes and
scales bit for bit) and ``jax.device_put`` onto the shardings.

>>> import jax, jax.numpy as jnp
>>> w = np.arange(128.0, dtype=np.float32).reshape(64, 2)
>>> abstract = {"dense": {"kernel": jax.ShapeDtypeStruct((2, 64), jnp.float32)}}
>>> tree = load(abstract, {"dense/kernel": Transposed(Array(w), (1, 0))}, quantize="nf4")
>>> tree["dense"]["kernel"]
QuantizedArray(nf4, shape=(2, 64), dtype=float32, block_size=64, double_quant, order=(1, 0))
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import paths as P
from lora_jax import protocols
from lora_jax.models.tensor_files import TensorFiles

Index = Sequence[slice]


class Source(Protocol):
    """One parameter's values, readable by slices (in the parameter's own axis order)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def read(self, index: Index) -> np.ndarray:
        """``param[index]`` (one slice per axis, step 1), any float dtype."""
        ...


@dataclasses.dataclass(frozen=True)
class FileTensor:
    """Tensor ``name`` of a :class:`TensorFiles`, read slice by slice from disk."""

    files: TensorFiles
    name: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.files.shape(self.name)

    def read(self, index: Index) -> np.ndarray:
        return self.files.read(self.name, index)


@dataclasses.dataclass(frozen=True)
class Array:
    """An array in memory (or memory-mapped)."""

    value: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    def read(self, index: Index) -> np.ndarray:
        return self.value[tuple(index)]


@dataclasses.dataclass(frozen=True)
class Computed:
    """A tensor computed whole by ``fn`` when first read (a GGUF block format), then sliced;
    kept until :meth:`release` (which :func:`load` calls once the parameter is placed)."""

    shape: tuple[int, ...]
    fn: Callable[[], np.ndarray]
    _cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def read(self, index: Index) -> np.ndarray:
        if "value" not in self._cache:
            self._cache["value"] = self.fn()
        return self._cache["value"][tuple(index)]

    def release(self) -> None:
        self._cache.clear()


@dataclasses.dataclass(frozen=True)
class Transposed:
    """``source.transpose(perm)``: a parameter stored with its axes permuted (a PyTorch
    ``(out, in)`` weight is a Flax ``(in, out)`` kernel with ``perm=(1, 0)``)."""

    source: Source
    perm: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape[p] for p in self.perm)

    def release(self) -> None:
        _release(self.source)

    def read(self, index: Index) -> np.ndarray:
        inner: list[slice] = [slice(None)] * len(self.perm)
        for k, p in enumerate(self.perm):
            inner[p] = index[k]
        return self.source.read(inner).transpose(self.perm)


def load(abstract: Any, sources: Mapping[str, Source], *, quantize: str | Mapping | None = None,
         mesh: jax.sharding.Mesh | None = None,
         specs: Any | Callable[[Any], Any] = None) -> Any:
    """The tree ``abstract`` describes, read from ``sources`` a tensor at a time.

    Args:
      abstract: a tree of ``jax.ShapeDtypeStruct`` (dtypes: the parameters' dtypes).
      sources: ``{path: Source}`` for every leaf (paths '/'-joined, as
        :func:`lora_jax.quantize` names them).
      quantize: None, a format ("nf4", "fp4", "int4", "int8"), or a dict of
        :func:`lora_jax.quantize` arguments with ``"format"``: the leaves ``quantize`` would
        select are quantized as it would quantize them.
      mesh: place the tree on this mesh (each process reads only what its devices hold).
      specs: base specs for ``mesh`` (``{path: PartitionSpec}`` or a tree, for the logical
        shapes; missing entries replicate), or a function of the abstract base tree (dense or
        quantized leaves) returning them, e.g. ``lambda b: lora_jax.sharding.fsdp(b, mesh)``.

    Returns:
      The tree, with ``QuantizedArray`` leaves where quantized; on ``mesh`` when given.

    Raises:
      ValueError: a leaf without a source, a source of the wrong shape, NaN/Inf in a weight
        to quantize, or specs that do not fit (all naming the parameter path). With a mesh
        over several processes, a failure on one (NaN, a truncated or missing file) raises on
        every process, naming the process and the cause, instead of leaving the others
        waiting at the next collective.
    """
    target = abstract
    if quantize is not None:
        from lora_jax.quant import tree as qtree

        opts: dict[str, Any] = ({"format": quantize} if isinstance(quantize, str)
                                else dict(quantize))
        if "format" not in opts:
            raise ValueError(f"load: quantize={quantize!r} needs a 'format'")
        target = jax.eval_shape(lambda p: qtree.quantize(p, **opts), abstract)
    shardings = None
    if mesh is not None:
        from lora_jax import sharding as S

        base_specs = specs(target) if callable(specs) else ({} if specs is None else specs)
        shardings = S.named(mesh, S.storage_specs(target, base_specs, mesh))
    elif specs is not None:
        raise ValueError("load: specs= needs mesh=")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target, is_leaf=protocols.is_base_leaf)
    per_leaf = ([None] * len(leaves) if shardings is None else
                treedef.flatten_up_to(shardings))
    paths = [P.path_str(kp) for kp, _ in leaves]

    def check_sources() -> None:
        missing = [p for p in paths if p not in sources]
        if missing:
            raise ValueError(f"load: no source for {missing[:4]} (sources name e.g. "
                             f"{list(sources)[:4]})")
        for path, (_, like) in zip(paths, leaves):
            if tuple(sources[path].shape) != tuple(like.shape):
                raise ValueError(f"{path}: the checkpoint holds shape "
                                 f"{tuple(sources[path].shape)}, expected {tuple(like.shape)}")

    together = _together if mesh is not None else (lambda what, fn: fn())
    together("load", check_sources)
    out = []
    for path, (_, like), sharding in zip(paths, leaves, per_leaf):
        source = sources[path]

        def one(source=source, like=like, sharding=sharding, path=path):
            if protocols.is_base_leaf(like):
                return like.streamed(_storage_reader(source, like.storage_order, like.dtype),
                                     path=path, shardings=sharding)
            return _dense(source, like, sharding)

        out.append(together(f"load of {path}", one))
        _release(source)
        _trim_heap()
    return jax.tree_util.tree_unflatten(treedef, out)


def open_files(path: Any) -> TensorFiles:
    """``TensorFiles(path)`` (a folder, a file or a list of files), opened on every process:
    a missing, damaged or truncated file seen by one process raises on all of them (naming
    the process), so none goes on to wait at a collective the failed one never reaches."""
    return _together(f"opening {path!r}", lambda: TensorFiles(path))


def _together(what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, its failure on any process raised on every process (naming the process)
    before the next collective: on a pod, the others would otherwise wait for it forever."""
    if jax.process_count() == 1:  # nothing to agree on (and orbax stays unimported)
        return fn()
    from lora_jax.checkpoint.collective import run_everywhere

    return run_everywhere(what, fn)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def _trim_heap() -> None:
    """Hands freed heap memory back to the OS. glibc keeps the pages of freed chunks, and
    between the long-lived arrays of loaded tensors they stay fragmented: without this the
    peak grows by about half the size of the loaded model (measured; see the tests)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _release(source: Source) -> None:
    release = getattr(source, "release", None)
    if release is not None:
        release()


def _dense(source: Source, like: Any, sharding: Any) -> jax.Array:
    full = tuple(slice(None) for _ in like.shape)
    if sharding is None:
        return jnp.asarray(np.asarray(source.read(full), like.dtype))
    shape = tuple(like.shape)
    pieces: dict[tuple, np.ndarray] = {}
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = tuple(s.indices(d)[:2] for s, d in zip(index, shape))
        if key not in pieces:  # devices holding the same slice share one read
            pieces[key] = np.asarray(source.read(index), like.dtype)
        arrays.append(jax.device_put(pieces[key], device))
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _storage_reader(source: Source, order: tuple[int, ...] | None, dtype: Any):
    """``read(start, stop)`` over ``param.transpose(order).ravel()``, in ``dtype``: reads the
    rows (along the storage's leading axis) that hold the range, no more."""
    shape = tuple(source.shape)
    order = tuple(range(len(shape))) if order is None else tuple(order)
    stored = tuple(shape[k] for k in order)
    row = math.prod(stored[1:])

    def read(start: int, stop: int) -> np.ndarray:
        i0, i1 = start // row, -(-stop // row)
        index = [slice(None)] * len(shape)
        index[order[0]] = slice(i0, i1)
        x = source.read(index).transpose(order).reshape(-1)
        return np.asarray(x[start - i0 * row: stop - i0 * row], dtype)

    return read
