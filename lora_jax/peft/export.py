"""Exporting merged weights in PyTorch's layout: :func:`save_merged`.

Writes ``merge(params, lora)`` as a safetensors file, or as a folder that ``transformers``
loads (``model.safetensors`` + ``config.json``), with the module names of a name map.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import numpy as st

from lora_jax import lora as L
from lora_jax import paths, protocols
from lora_jax.peft.modules import supported, target, tile
from lora_jax.peft.names import (
    LEAF_TO_TORCH,
    PLACEHOLDERS,
    NameMap,
    map_parts,
    resolve,
    stack_axes_of,
)

PyTree = Any


def save_merged(
    path: str | os.PathLike,
    params: PyTree,
    lora: PyTree | None = None,
    *,
    name_map: NameMap = None,
    dtype=None,
    in_axes: int | Mapping[str, int] | None = None,
    strict: bool = True,
    config: Any = None,
) -> dict[str, np.ndarray]:
    """Writes ``merge(params, lora)`` as a PyTorch-layout safetensors checkpoint.

    With ``config``, ``path`` is a folder that ``transformers``' ``from_pretrained`` loads:
    ``model.safetensors`` and ``config.json`` (for :class:`lora_jax.models.llama.Llama`, pass
    its ``LlamaConfig`` with ``name_map="llama"``; or a Hugging Face config dict).

    Kernels become ``<module>.weight`` ``(out, in)`` (multi-axis kernels flattened row-major;
    conv kernels ``(cout, cin, *spatial)``), biases ``<module>.bias``, norm scales and
    embeddings ``<module>.weight`` as they are. A parameter whose leaf name is not one of
    kernel/bias/scale/embedding is written under the name the map returns for it. Stacked
    (``{i}``) parameters are split per layer; fused entries split kernels and biases.

    Args:
      path: the ``.safetensors`` file to write.
      params: base parameters (quantized leaves are dequantized).
      lora: a LoRA tree to merge first, or None.
      name_map: as in :func:`lora_jax.peft.save`.
      dtype: dtype of the written tensors; default: each parameter's own.
      in_axes: input axes of kernels without an adapter (adapted ones use the adapter's).
      strict: raise for a parameter the map does not name (else skip it).
      config: a Hugging Face config dict, or an object with ``to_hf()`` (``LlamaConfig``):
        write a model folder instead of one file.

    Returns:
      ``{tensor name: array}`` as written.
    """
    hf_config = None
    if config is not None:
        hf_config = config.to_hf() if hasattr(config, "to_hf") else dict(config)
        if not isinstance(hf_config, dict):
            raise TypeError(f"save_merged: config must be a dict or have to_hf(), got "
                            f"{type(config).__name__}")
    merged = L.merge(params, lora) if lora is not None else paths.map_with_path(
        lambda _, x: protocols.dense(x), params)
    lmap = L.leaves(lora) if lora is not None else {}
    fn = resolve(name_map)
    out: dict[str, np.ndarray] = {}
    for p, x in paths.flatten(merged):
        parts = map_parts(fn, p)
        if parts is None:
            if strict:
                raise ValueError(f"save_merged: name_map gives no name for {p!r}")
            continue
        leaf_name = p.rsplit("/", 1)[-1]
        x = np.asarray(x, dtype or x.dtype)
        sa = stack_axes_of(parts, p)
        ia = lmap[p].in_axes if p in lmap else paths.setting_for(in_axes, p, None, None)
        if leaf_name in ("kernel", "embedding") and x.ndim - sa >= 2:
            t = supported(target(p, x.shape, ia, parts, sa))
            for idx, name, sl in t.modules:
                w = x[idx]
                if t.layer == "conv":
                    w = w.transpose((w.ndim - 1, w.ndim - 2) + tuple(range(w.ndim - 2)))
                elif t.layer == "linear":
                    w = w.reshape(t.n_in, t.n_out).T
                    w = w if sl is None else w[sl]
                _put(out, f"{name}.weight", w)
            continue
        fused = len(parts) > 1 or parts[0].out is not None
        if fused and leaf_name != "bias":
            raise NotImplementedError(f"save_merged: fused entry for {p!r}: only kernels and "
                                      "biases can be split")
        for idx in np.ndindex(*x.shape[:sa]):
            fmt = dict(zip(PLACEHOLDERS, idx))
            w = x[idx]
            tiles = tile(parts, w.size, p) if fused else [(parts[0].template, None)]
            for tmpl, sl in tiles:
                name = tmpl.format(**fmt)
                if leaf_name in LEAF_TO_TORCH:
                    name = f"{name}.{LEAF_TO_TORCH[leaf_name]}"
                v = w.reshape(-1) if leaf_name == "bias" else w
                _put(out, name, v if sl is None else v[sl])
    if hf_config is None:
        st.save_file(out, os.fspath(path), metadata={"format": "pt"})
        return out
    folder = os.fspath(path)
    os.makedirs(folder, exist_ok=True)
    if dtype is not None:
        hf_config["torch_dtype"] = jnp.dtype(dtype).name
    st.save_file(out, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    return out


def _put(out: dict, name: str, v: np.ndarray) -> None:
    if name in out:
        raise ValueError(f"save_merged: two parameters map to the tensor {name!r}")
    out[name] = np.ascontiguousarray(v)
