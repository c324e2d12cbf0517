"""Safetensors files read a slice at a time, with a count of the bytes read.

:class:`TensorFiles` parses the headers of one or more ``.safetensors`` files (a sharded
Hugging Face checkpoint) and reads any rectangular slice of a tensor with ``pread`` into a
numpy array, without memory-mapping: pages of a mapped file count towards the process' resident
memory, pages read with ``pread`` only towards the kernel's page cache, which it drops under
pressure. ``bf16`` tensors come back as ``ml_dtypes.bfloat16`` arrays (numpy has no bf16).
:attr:`TensorFiles.bytes_read` counts the tensor bytes read, so a sharded load can show that
each process read only its share. :func:`write` streams tensors into a file, one at a time.

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


class TensorFiles:
    """The tensors of one or more safetensors files, read by slices.

    Args:
      path: a ``.safetensors`` file, a folder of them, or a list of files.

    Attributes:
      files: the files, in order.
      bytes_read: tensor bytes read so far (thread-safe counter).

    Raises:
      ValueError: a file that is not safetensors, or a tensor name in two files.
    """

    def __init__(self, path: str | os.PathLike | Sequence[str]):
        self.files = (checkpoint_files(path) if isinstance(path, (str, os.PathLike))
                      else [os.fspath(p) for p in path])
        self.bytes_read = 0
        self._lock = threading.Lock()
        # name -> (file, dtype, shape, absolute byte offset)
        self._index: dict[str, tuple[str, np.dtype, tuple[int, ...], int]] = {}
        for file in self.files:
            with open(file, "rb") as f:
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                if n < 2 or n > os.path.getsize(file) - 8:
                    raise ValueError(f"{file} is not a safetensors file (bad header length)")
                try:
                    header = json.loads(f.read(n))
                except ValueError as e:
                    raise ValueError(f"{file}: unreadable safetensors header: {e}") from None
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in self._index:
                    raise ValueError(f"tensor {name!r} is in both {self._index[name][0]} and "
                                     f"{file}")
                if info["dtype"] not in DTYPES:
                    raise ValueError(f"{file}: tensor {name!r} has dtype {info['dtype']}, "
                                     f"expected one of {', '.join(DTYPES)}")
                dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
                start, stop = (int(o) for o in info["data_offsets"])
                if stop - start != math.prod(shape) * dtype.itemsize:
                    raise ValueError(f"{file}: tensor {name!r} of shape {shape} ({info['dtype']}) "
                                     f"has {stop - start} bytes of data (damaged header?)")
                self._index[name] = (file, dtype, shape, 8 + n + start)

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
    header: dict = {"__metadata__": dict(metadata or {"format": "np"})}
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


