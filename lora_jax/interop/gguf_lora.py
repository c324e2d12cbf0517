"""llama.cpp LoRA adapters as GGUF files: :func:`save` and :func:`load`.

The layout is the one llama.cpp's ``convert_lora_to_gguf.py`` writes and ``llama-adapter.cpp``
reads (``llama-cli --lora``, ``llama-server --lora``, ``llama-export-lora``):

* metadata ``general.architecture = "llama"``, ``general.type = "adapter"``,
  ``adapter.type = "lora"``, ``adapter.lora.alpha`` (one float for the whole file);
* per adapted weight ``<base tensor>.lora_a`` and ``<base tensor>.lora_b``, e.g.
  ``blk.0.attn_q.weight.lora_a``. In numpy order (GGUF lists dimensions reversed)
  ``lora_a`` is ``(r, in)`` and ``lora_b`` is ``(out, r)``, PEFT's ``lora_A``/``lora_B``;
* llama.cpp scales each pair by ``alpha / r`` (``r`` = rows of ``lora_a``), or by 1 when
  ``alpha`` is 0 or absent;
* the rows of ``attn_q``/``attn_k`` are in llama.cpp's rotary order
  (:func:`lora_jax.models.gguf.permute_qk`), so ``lora_b``'s rows are permuted like the
  weight's.

An adapter whose scale is not ``alpha / r`` for the file's ``alpha`` (another alpha, rsLoRA)
has the ratio folded into ``lora_b``, so the update ``scale·A·B`` is what llama.cpp applies.

Flax paths are those of :class:`lora_jax.models.llama.Llama` (``layers_3/self_attn/q_proj``,
``mlp/down_proj``, ``lm_head``); adapters on the embedding are not written (llama.cpp reads
``token_embd``'s ``lora_a`` transposed, a layout this module does not produce).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax import layouts, paths
from lora_jax import leaves as lora_leaves
from lora_jax.leaves import LoraWeight
from lora_jax.models import gguf as gguf_model
from lora_jax.models.llama import LlamaConfig

PyTree = Any

ARCHITECTURE = "llama"
# Flax module under ``layers_{i}`` -> llama.cpp tensor under ``blk.{i}``
BLOCK_TENSORS = {
    "self_attn/q_proj": "attn_q",
    "self_attn/k_proj": "attn_k",
    "self_attn/v_proj": "attn_v",
    "self_attn/o_proj": "attn_output",
    "mlp/gate_proj": "ffn_gate",
    "mlp/up_proj": "ffn_up",
    "mlp/down_proj": "ffn_down",
}
_SUPPORTED_DTYPES = ("float32", "float16")


def tensor_names(cfg: LlamaConfig) -> dict[str, str]:
    """``{Flax kernel path (without "params/"): GGUF base tensor name}`` for a Llama of ``cfg``."""
    names = {}
    for i in range(cfg.layers):
        for module, tensor in BLOCK_TENSORS.items():
            names[f"layers_{i}/{module}/kernel"] = f"blk.{i}.{tensor}.weight"
    if not cfg.tied:
        names["lm_head/kernel"] = "output.weight"
    return names


def _qk_heads(tensor: str, cfg: LlamaConfig) -> int | None:
    """The head count whose rows llama.cpp permutes in ``tensor``, or None."""
    if tensor.endswith(".attn_q.weight"):
        return cfg.heads
    if tensor.endswith(".attn_k.weight"):
        return cfg.kv_heads
    return None


def _strip(path: str) -> tuple[str, str]:
    """``("params/", rest)`` for a path under Linen's ``params`` collection, else ``("", path)``."""
    return ("params/", path[len("params/"):]) if path.startswith("params/") else ("", path)


def save(path: str | os.PathLike, lora: PyTree, cfg: LlamaConfig, *, alpha: float | None = None,
         dtype: Any = np.float32, name: str | None = None) -> dict[str, np.ndarray]:
    """Writes ``lora`` (a LoRA tree of a :class:`~lora_jax.models.llama.Llama`) as a llama.cpp
    GGUF LoRA adapter.

    Args:
      path: the ``.gguf`` file to write.
      lora: LoRA tree with :class:`lora_jax.LoraWeight` leaves on Llama kernels.
      cfg: the model's config (layer count, head counts for the q/k row order, tied head).
      alpha: the file's ``adapter.lora.alpha``; default: the adapters' most common alpha.
        Adapters whose ``scale`` differs from ``alpha / r`` get the ratio folded into
        ``lora_b``.
      dtype: ``float32`` (default) or ``float16`` tensors.
      name: optional ``general.name``.

    Returns:
      ``{tensor name: array}`` as written (numpy order: ``lora_a`` ``(r, in)``, ``lora_b``
      ``(out, r)``).

    Raises:
      ValueError: an empty tree, a path that is not a Llama kernel of ``cfg`` (the embedding
        included), a kernel layout other than ``(in, out)``, a non-positive ``alpha``, an
        unsupported ``dtype``. TypeError: an adapter kind other than LoRA (DoRA, AdaLoRA).
    """
    import gguf

    dtype = np.dtype(dtype)
    if dtype.name not in _SUPPORTED_DTYPES:
        raise ValueError(f"gguf_lora.save: dtype must be one of {_SUPPORTED_DTYPES}, got "
                         f"{dtype.name}")
    lmap = lora_leaves.leaves(lora)
    if not lmap:
        raise ValueError("gguf_lora.save: the LoRA tree has no adapter leaves")
    names = tensor_names(cfg)
    for p, leaf in lmap.items():
        if type(leaf) is not LoraWeight:
            raise TypeError(f"gguf_lora.save: {p!r} is a {leaf.kind} adapter "
                            f"({type(leaf).__name__}); llama.cpp's LoRA is plain LoRA")
        rest = _strip(p)[1]
        if rest not in names:
            hint = (" (adapters on the embedding are not supported)" if "embed" in rest else
                    "; expected a Llama kernel such as 'layers_0/self_attn/q_proj/kernel'"
                    + ("" if cfg.tied else " or 'lm_head/kernel'"))
            raise ValueError(f"gguf_lora.save: {p!r} is not a kernel of a {cfg.layers}-layer "
                             f"Llama{hint}")
        if leaf.stack_axes or leaf.in_axes != 1 or leaf.layout != layouts.canonical(2, 1, 0):
            raise ValueError(f"gguf_lora.save: {p!r} has layout {leaf.layout!r} with "
                             f"{leaf.stack_axes} stack axes; expected a 2-D (in, out) kernel")
    if alpha is None:
        alpha = collections.Counter(float(x.hparams()["alpha"]) for x in lmap.values()
                                    ).most_common(1)[0][0]
    alpha = float(alpha)
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"gguf_lora.save: alpha must be a positive number, got {alpha}")

    out: dict[str, np.ndarray] = {}
    for p, leaf in sorted(lmap.items()):
        tensor = names[_strip(p)[1]]
        a, b = (np.asarray(x, np.float64) for x in leaf.factors())  # (in, r), (r, out)
        r = a.shape[-1]
        fold = float(leaf.scale) / (alpha / r)
        lora_a, lora_b = a.T, b.T  # (r, in), (out, r)
        if fold != 1.0:
            lora_b = lora_b * fold
        heads = _qk_heads(tensor, cfg)
        if heads is not None:
            lora_b = gguf_model.permute_qk(lora_b, heads)
        out[tensor + ".lora_a"] = np.ascontiguousarray(lora_a, dtype)
        out[tensor + ".lora_b"] = np.ascontiguousarray(lora_b, dtype)

    writer = gguf.GGUFWriter(os.fspath(path), ARCHITECTURE)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    if name is not None:
        writer.add_name(name)
    for tensor_name, x in out.items():
        writer.add_tensor(tensor_name, x)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def load(path: str | os.PathLike, base: PyTree, cfg: LlamaConfig) -> dict:
    """Reads a llama.cpp GGUF LoRA adapter as a LoRA tree for ``base``.

    Each pair becomes a :class:`lora_jax.LoraWeight` with the file's ``alpha`` (``alpha = r``,
    scale 1, when the file's alpha is 0 or absent, as llama.cpp does), ``lora_b``'s q/k rows
    put back in Hugging Face order.

    Args:
      path: the adapter file.
      base: the model's variables (``{"params": ...}``, e.g. from
        :func:`lora_jax.models.gguf.load_llama`) or its params; the tree's paths follow it.
      cfg: the model's config.

    Returns:
      A nested-dict LoRA tree with a leaf at each adapted kernel.

    Raises:
      ValueError: not a LoRA adapter for a llama model (``general.type``, ``adapter.type``,
        ``general.architecture``), a tensor that is neither ``.lora_a`` nor ``.lora_b``, a
        half without its other half, a rank mismatch between ``lora_a`` and ``lora_b``, a
        tensor whose base weight the model lacks, shapes that do not fit the base weight.
        Each message names the file and the tensor.
    """
    f = gguf_model.read(path)
    where = f.path
    meta = f.metadata
    for key, want in (("general.architecture", ARCHITECTURE), ("general.type", "adapter"),
                      ("adapter.type", "lora")):
        if meta.get(key) != want:
            raise ValueError(f"{where}: {key} is {meta.get(key)!r}, expected {want!r} (a llama "
                             "LoRA adapter as convert_lora_to_gguf.py writes it)")
    file_alpha = float(meta.get("adapter.lora.alpha") or 0.0)

    flat = dict(paths.flatten(base))
    prefix = "params/" if any(k.startswith("params/") for k in flat) else ""
    by_tensor = {t: p for p, t in tensor_names(cfg).items()}
    halves: dict[str, dict[str, str]] = {}
    for tensor in f.tensors:
        stem, dot, half = tensor.rpartition(".")
        if not dot or half not in ("lora_a", "lora_b"):
            raise ValueError(f"{where}: tensor {tensor!r} is neither a '.lora_a' nor a "
                             "'.lora_b' tensor; only LoRA pairs are supported")
        halves.setdefault(stem, {})[half] = tensor

    items: dict[str, LoraWeight] = {}
    for stem, pair in sorted(halves.items()):
        for half in ("lora_a", "lora_b"):
            if half not in pair:
                other = next(iter(pair.values()))
                raise ValueError(f"{where}: tensor {other!r} has no matching "
                                 f"'{stem}.{half}'")
        rest = by_tensor.get(stem)
        if rest is None or prefix + rest not in flat:
            raise ValueError(f"{where}: tensor {pair['lora_a']!r} adapts {stem!r}, which the "
                             f"base model (a {cfg.layers}-layer Llama, tied head "
                             f"{cfg.tied}) lacks")
        kernel_shape = tuple(flat[prefix + rest].shape)
        lora_a, lora_b = f.tensor(pair["lora_a"]), f.tensor(pair["lora_b"])
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] != lora_b.shape[1]:
            raise ValueError(f"{where}: {pair['lora_a']!r} has shape {lora_a.shape} and "
                             f"{pair['lora_b']!r} {lora_b.shape} (numpy order); expected "
                             "(r, in) and (out, r) with the same rank r")
        if (lora_a.shape[1], lora_b.shape[0]) != kernel_shape:
            raise ValueError(f"{where}: {pair['lora_a']!r} {lora_a.shape} and "
                             f"{pair['lora_b']!r} {lora_b.shape} do not fit the base weight "
                             f"{prefix + rest!r} of shape {kernel_shape} (in, out)")
        heads = _qk_heads(stem, cfg)
        if heads is not None:
            lora_b = gguf_model.unpermute_qk(lora_b, heads)
        r = lora_a.shape[0]
        items[prefix + rest] = LoraWeight(a=jnp.asarray(lora_a.T, jnp.float32),
                                          b=jnp.asarray(lora_b.T, jnp.float32),
                                          alpha=file_alpha if file_alpha else float(r))
    if not items:
        raise ValueError(f"{where}: the file holds no LoRA tensors")
    return lora_leaves.from_leaves(items)


def merged_tensors(path: str | os.PathLike) -> Mapping[str, np.ndarray]:
    """``{base tensor name: alpha/r · lora_b @ lora_a}`` in llama.cpp's own row order and
    numpy layout ``(out, in)``: the update llama.cpp adds to each base tensor (a reference
    for tests and for checking a file without llama.cpp)."""
    f = gguf_model.read(path)
    alpha = float(f.metadata.get("adapter.lora.alpha") or 0.0)
    out = {}
    for tensor in f.tensors:
        if tensor.endswith(".lora_a"):
            stem = tensor[: -len(".lora_a")]
            a = f.tensor(tensor).astype(np.float64)
            b = f.tensor(stem + ".lora_b").astype(np.float64)
            out[stem] = (alpha / a.shape[0] if alpha else 1.0) * (b @ a)
    return out
