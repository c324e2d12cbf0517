"""Safetensors files read a slice at a time, with a count of the bytes read.

:class:`TensorFiles` parses the headers of one or more ``.safetensors`` files (a sharded
Hugging Face checkpoint) and reads any rectangular slice of a tensor with ``pread`` into a
numpy array, without memory-mapping: pages of a mapped file count towards the process' resident
memory, pages read with ``pread`` only towards the kernel's page cache, which it drops under
pressure. ``bf16`` tensors come back as ``ml_dtypes.bfloat16`` arrays (numpy has no bf16).
:attr:`TensorFiles.bytes_read` counts the tensor bytes read, so a sharded load can show that
each process read only its share. :func:`write` streams tensors into a file, one at a time.
:func:`read_header` checks each header by the rules of the ``safetensors`` library (offsets
that tile the data, known dtypes, sizes, unique names, bounded length and nesting).

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
>>> write(path, {"w": np.arange(12, dtype=np.float32).reshape(3, 4)})
>>> files = TensorFiles(path)
>>> files.shape("w"), files.read("w", (slice(1, 3), slice(0, 2))).tolist()
((3, 4), [[4.0, 5.0], [8.0, 9.0]])
>>> files.bytes_read      # 2 runs of 2 float32
16
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import cast

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
          "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
          "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
          "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_READ = 1 << 30  # Linux returns at most ~2 GiB per read call


def checkpoint_files(path: str | os.PathLike) -> list[str]:
    """The ``.safetensors`` files of a checkpoint: ``path`` itself, or a folder's, sorted."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no .safetensors files in this folder")
        return files
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safetensors file or folder at {path}")
    return [os.fspath(path)]


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit
MAX_HEADER_DEPTH = 64  # a valid header nests 3 deep ({name: {"shape": [...]}})


def read_header(file: str) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
    """``{name: (dtype, shape, absolute byte offset)}`` of one safetensors file, in header order.

    The header is checked by the rules of the ``safetensors`` library, so that a file it
    refuses is refused here too: the length is at most 100 MB and fits the file; the header
    is a JSON object (nested at most :data:`MAX_HEADER_DEPTH` deep, no name given twice);
    ``__metadata__`` maps strings to strings; each tensor has a known ``dtype``, a ``shape`` of
    non-negative integers and ``data_offsets`` ``[begin, end]`` with ``end - begin`` its byte
    count; sorted by offset, the tensors tile the data from byte 0 to the end of the file.

    Raises:
      ValueError: naming the file, the tensor and what was expected.
    """
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{file} is not a safetensors file: {size} bytes, less than the "
                             "8-byte header length")
        n = struct.unpack("<Q", head)[0]
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"{file} is not a safetensors file: its header length is {n} bytes,"
                             f" more than the limit of {MAX_HEADER_BYTES}")
        if n < 2 or n > size - 8:
            raise ValueError(f"{file} is not a safetensors file: its header length is {n} bytes,"
                             f" expected 2 to {size - 8} (the file has {size} bytes)")
        raw = f.read(n)
    header = _parse_header(raw, file)
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(
            isinstance(v, str) for v in meta.values())):
        raise ValueError(f"{file}: the header's __metadata__ must map strings to strings, got "
                         f"{meta!r:.80}")
    out: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
    spans = []  # (begin, end, name)
    for name, info in header.items():
        dtype, shape, (begin, end) = _tensor_info(name, info, file)
        nbytes = math.prod(shape) * dtype.itemsize
        if end < begin:
            raise ValueError(f"{file}: tensor {name!r} has data_offsets [{begin}, {end}], whose "
                             "end is before its begin")
        if end - begin != nbytes:
            raise ValueError(f"{file}: tensor {name!r} of shape {shape} ({info['dtype']}) needs "
                             f"{nbytes} bytes but its data_offsets [{begin}, {end}] hold "
                             f"{end - begin} (damaged header?)")
        spans.append((begin, end, name))
        out[name] = (dtype, shape, 8 + n + begin)
    pos, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin != pos:
            what = (f"overlaps tensor {previous!r}, which ends at byte {pos}" if begin < pos
                    else f"leaves bytes {pos} to {begin} unused" + (
                        f" after tensor {previous!r}" if previous else ""))
            raise ValueError(f"{file}: tensor {name!r} has data_offsets [{begin}, {end}], which "
                             f"{what}; expected it to begin at byte {pos}")
        pos, previous = end, name
    data = size - 8 - n
    if pos != data:
        what = "is truncated" if pos > data else f"has {data - pos} extra bytes"
        raise ValueError(f"{file} {what}: its header's tensors end at byte {pos} of the data, "
                         f"which holds {data} bytes after the {n}-byte header")
    return out


def _parse_header(raw: bytes, file: str) -> dict:
    """The header's JSON object; refuses deep nesting before the parser recurses into it."""
    deepest = _nesting_depth(raw)
    if deepest > MAX_HEADER_DEPTH:
        raise ValueError(f"{file}: the safetensors header nests {deepest} deep, more than "
                         f"{MAX_HEADER_DEPTH} (a valid header nests 3 deep)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: the safetensors header is not UTF-8 text: {e}") from None
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise ValueError(f"{file}: the safetensors header names {e.args[0]!r} twice (a tensor "
                         "or field given twice)") from None
    except ValueError as e:
        raise ValueError(f"{file}: unreadable safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: the safetensors header must be a JSON object "
                         f"{{name: {{dtype, shape, data_offsets}}}}, got a JSON "
                         f"{type(header).__name__}")
    return header


def _nesting_depth(raw: bytes) -> int:
    """How deep the JSON text ``raw`` nests ``{}``/``[]``, brackets inside strings aside."""
    # Escaped backslashes, then escaped quotes, go first; then a quote toggles "in a string".
    # (UTF-8 never has these ASCII bytes inside a multi-byte character.)
    codes = np.frombuffer(raw.replace(b"\\\\", b"").replace(b'\\"', b""), np.uint8)
    outside = np.cumsum(codes == ord('"')) % 2 == 0
    steps = (((codes == ord("{")) | (codes == ord("["))).astype(np.int64)
             - ((codes == ord("}")) | (codes == ord("]"))))
    return int(np.cumsum(steps * outside).max(initial=0))


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list) -> dict:
    """``json.loads``' ``object_pairs_hook``: a dict, refusing a key given twice."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def _naturals(value, where: str, key: str, length: int | None = None) -> tuple[int, ...]:
    """``value``, a list of non-negative ints (of ``length`` if given), as a tuple."""
    if not (isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)
            and (length is None or len(value) == length)):
        expected = f"{length} non-negative integers [begin, end]" if length else \
            "a list of non-negative integers"
        raise ValueError(f"{where}: {key} must be {expected}, got {value!r:.80}")
    return tuple(value)


def _tensor_info(name: str, info, file: str) -> tuple[np.dtype, tuple[int, ...], tuple[int, ...]]:
    """The dtype, shape and data offsets of one header entry, their types checked."""
    where = f"{file}: tensor {name!r}"
    if not isinstance(info, dict):
        raise ValueError(f"{where}: expected an object {{dtype, shape, data_offsets}}, got "
                         f"{info!r:.80}")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise ValueError(f"{where} has no {', '.join(missing)}")
    dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise ValueError(f"{where} has dtype {info['dtype']!r:.40}, expected one of "
                         f"{', '.join(DTYPES)}")
    return (dtype, _naturals(info["shape"], where, "shape"),
            _naturals(info["data_offsets"], where, "data_offsets", 2))


class TensorFiles:
    """The tensors of one or more safetensors files, read by slices.

    Args:
      path: a ``.safetensors`` file, a folder of them, or a list of files.

    Attributes:
      files: the files, in order.
      bytes_read: tensor bytes read so far (thread-safe counter).

    Raises:
      ValueError: a file that is not safetensors (see :func:`read_header`), or a tensor name
        in two files.
    """

    def __init__(self, path: str | os.PathLike | Sequence[str]):
        self.files = (checkpoint_files(path) if isinstance(path, (str, os.PathLike))
                      else [os.fspath(p) for p in path])
        self.bytes_read = 0
        self._lock = threading.Lock()
        # name -> (file, dtype, shape, absolute byte offset)
        self._index: dict[str, tuple[str, np.dtype, tuple[int, ...], int]] = {}
        for file in self.files:
            for name, (dtype, shape, offset) in read_header(file).items():
                if name in self._index:
                    raise ValueError(f"tensor {name!r} is in both {self._index[name][0]} and "
                                     f"{file}")
                self._index[name] = (file, dtype, shape, offset)

    def keys(self) -> list[str]:
        """Tensor names, in file order."""
        return list(self._index)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def file(self, name: str) -> str:
        return self._entry(name)[0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[2]

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name)[1]

    def _entry(self, name: str):
        if name not in self._index:
            raise KeyError(f"no tensor {name!r} in {self.files}")
        return self._index[name]

    def read(self, name: str, index: Sequence[slice] | None = None) -> np.ndarray:
        """``tensor[index]`` (slices with step 1; None: all of it), reading only those bytes.

        The axes after the last one ``index`` cuts are contiguous on disk: one read per run.
        """
        file, dtype, shape, offset = self._entry(name)
        if not shape:  # a scalar
            return self._read_scalar(file, dtype, offset)
        idx = [range(*s.indices(d)) for s, d in zip(index or (), shape)]
        idx += [range(d) for d in shape[len(idx):]]
        if any(r.step != 1 for r in idx):
            raise ValueError(f"{name}: slices with a step are not supported ({index})")
        out = np.empty(tuple(len(r) for r in idx), dtype)
        if out.size == 0:
            return out
        cut = max([k for k, (r, d) in enumerate(zip(idx, shape)) if len(r) != d], default=0)
        run = math.prod(out.shape[cut:])  # elements per contiguous run
        strides = [math.prod(shape[k + 1:]) for k in range(len(shape))]
        flat = out.reshape(-1, run).view(np.uint8)
        with open(file, "rb", buffering=0) as f:
            fd = f.fileno()
            for i, outer in enumerate(itertools.product(*idx[:cut])):
                start = sum(j * s for j, s in zip(outer, strides)) + idx[cut].start * strides[cut]
                _pread_into(fd, memoryview(flat[i]), offset + start * dtype.itemsize, file)
        with self._lock:
            self.bytes_read += out.nbytes
        return out

    def _read_scalar(self, file: str, dtype: np.dtype, offset: int) -> np.ndarray:
        out = np.empty((), dtype)
        with open(file, "rb", buffering=0) as f:
            _pread_into(f.fileno(), memoryview(out.reshape(1, 1).view(np.uint8)[0]), offset, file)
        with self._lock:
            self.bytes_read += out.nbytes
        return out


def _pread_into(fd: int, buf: memoryview, offset: int, file: str) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:done + _MAX_READ]], offset + done)
        if n <= 0:
            raise ValueError(f"{file} is truncated: {len(buf) - done} bytes missing at "
                             f"offset {offset + done}")
        done += n


def write(path: str | os.PathLike,
          tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
          shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]] | None = None,
          metadata: Mapping[str, str] | None = None) -> None:
    """Writes a safetensors file, one tensor at a time.

    Args:
      path: the file.
      tensors: name -> array, or an iterable of ``(name, array)`` pairs (a generator keeps
        one tensor in memory at a time; then ``shapes`` must announce them, in order).
      shapes: name -> (shape, dtype) of every tensor, for the header, when ``tensors`` is
        a generator.
      metadata: the header's ``__metadata__`` (string values).
    """
    items = cast("Iterable[tuple[str, np.ndarray]]",
                 list(tensors.items()) if isinstance(tensors, Mapping) else tensors)
    if shapes is None:
        items = list(items)
        shapes = {k: (v.shape, v.dtype) for k, v in items}
    meta = dict(metadata or {"format": "np"})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TypeError(f"write {os.fspath(path)}: metadata must map strings to strings (as "
                        f"safetensors requires), got {meta!r:.80}")
    header: dict = {"__metadata__": meta}
    pos = 0
    for name, (shape, dtype) in shapes.items():
        dtype = np.dtype(dtype)
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape),
                        "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    order = iter(k for k in shapes)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, x in items:
            want = next(order, None)
            if name != want or tuple(x.shape) != tuple(shapes[name][0]):
                raise ValueError(f"write: got tensor {name!r} {tuple(x.shape)}, expected "
                                 f"{want!r} as announced in shapes")
            f.write(np.ascontiguousarray(x, shapes[name][1]).tobytes())


