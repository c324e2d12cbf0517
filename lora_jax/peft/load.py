"""Reading a PEFT folder into an adapter tree for a Flax model: :func:`load`.

The folder is checked first (config options and values, tensor names, dtypes and finiteness,
which modules the config targets, and that every module has a Flax parameter); then each
parameter's modules become one adapter leaf (:mod:`lora_jax.peft.build`).
"""

from __future__ import annotations

import collections
import os
import warnings
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import numpy as st

from lora_jax import lora as L
from lora_jax import validation as V
from lora_jax.peft import experts
from lora_jax.peft.build import adalora_masks, load_adalora, load_lora
from lora_jax.peft.config import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    check_config,
    check_values,
    is_targeted,
    read_config,
)
from lora_jax.peft.modules import suggest_map, supported, targets_of
from lora_jax.peft.names import NameMap, few

PyTree = Any

_ROLES = {"LORA": {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "A",
                   "lora_embedding_B": "B", "lora_magnitude_vector": "M"},
          "ADALORA": {"lora_A": "A", "lora_B": "B", "lora_E": "E"}}


_NAMES = {"A": "lora_A", "B": "lora_B", "E": "lora_E",
          "M": "lora_magnitude_vector (the config has use_dora)"}


def _split_keys(tensors, peft_type, dora=False) -> dict[str, dict[str, tuple[str, np.ndarray]]]:
    """``{module: {"A" | "B" | "E": (tensor key, tensor)}}``; every module needs all of its
    kind's tensors."""
    roles = _ROLES[peft_type]
    out: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    for key, v in tensors.items():
        suffix = next((s for s in roles if key.endswith("." + s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise ValueError(f"load: unsupported tensor {key!r} in a {peft_type} adapter; expected "
                             f"'{PREFIX}<module>.<{'|'.join(roles)}>'")
        out.setdefault(key[len(PREFIX): -len(suffix) - 1], {})[roles[suffix]] = (key, v)
    for name, d in out.items():
        need = {"A", "B"} | ({"E"} if peft_type == "ADALORA" else set()) | (
            {"M"} if dora else set())
        if set(d) != need:
            raise ValueError(f"load: module {name!r} has tensors {sorted(k for k, _ in d.values())}"
                             f", missing {sorted(_NAMES[x] for x in need - set(d))}")
    return out


def load(
    directory: str | os.PathLike,
    params: PyTree,
    *,
    name_map: NameMap = None,
    dtype=jnp.float32,
    in_axes: int | Mapping[str, int] | None = None,
    stack_axes: int | Mapping[str, int] | None = None,
) -> dict:
    """Reads a PEFT adapter directory into a LoRA tree for ``params``.

    Scaling follows PEFT exactly: per module, ``r``/``lora_alpha`` from ``rank_pattern``/
    ``alpha_pattern`` (PEFT's ``get_pattern_key`` suffix match), ``alpha / r`` or
    ``alpha / sqrt(r)`` with ``use_rslora``; AdaLoRA ``lora_alpha / (init_r + 1e-5)``, with
    pruned ranks (AdaLoRA's ``rank_pattern`` masks) restored as zero ``lora_E`` entries. Fused
    kernels (a list entry in the map) concatenate their modules' ``lora_B`` along the output;
    when the modules' ``lora_A`` differ, their ranks are stacked (a block-diagonal ``b`` with
    each module's scale folded in, ``alpha = r``), which gives the same outputs. Layers of a
    stacked (``nn.scan``) kernel that the adapter lacks get zero factors.

    Args:
      directory: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
      params: the Flax model's parameters (shapes only are used).
      name_map: Flax path -> torch module name, as in :func:`lora_jax.peft.save`.
      dtype: dtype of the factors.
      in_axes, stack_axes: as in :func:`lora_jax.init` (defaults: Flax conventions; stack axes
        from the ``{i}`` placeholders of the module names).

    Returns:
      A LoRA tree of :class:`lora_jax.LoraWeight` (or :class:`lora_jax.adalora.AdaLoraWeight`).

    Raises:
      ValueError: unsupported ``peft_type`` or options (LoRA bias, modules_to_save, ...; see
        :data:`lora_jax.peft.config.FIELDS`), a key that is not a field of PEFT's config class,
        an unknown module (the message lists the known ones), a tensor of the wrong shape
        (named, with expected and actual shapes), a rank that disagrees with the config, a
        targeted module without tensors. NotImplementedError: ranks or alphas that differ
        across the layers of one stacked kernel, AdaLoRA fused modules with different factors.
    """
    V.params_tree(params, "peft.load")
    in_axes = V.axes_arg(in_axes, "peft.load: in_axes", low=1)
    stack_axes = V.axes_arg(stack_axes, "peft.load: stack_axes", low=0)
    cfg = read_config(directory)
    where = f"load: {os.path.join(os.fspath(directory), CONFIG_NAME)}"
    peft_type = check_config(cfg, where)
    check_values(cfg, peft_type, where)
    ada = peft_type == "ADALORA"
    tensors = _read_tensors(directory)
    expert_leaves = experts.take(cfg, tensors, params, name_map, dtype)  # target_parameters
    mods = _split_keys(tensors, peft_type, bool(cfg.get("use_dora")))
    if not mods and not expert_leaves:
        raise ValueError(f"load: {WEIGHTS_NAME} in {os.fspath(directory)!r} has no adapter tensors")
    targets = targets_of(params, name_map, in_axes, stack_axes)
    where = {m[1]: (t, m) for t in targets.values() for m in t.modules}
    if len(where) != sum(len(t.modules) for t in targets.values()):
        dup = collections.Counter(m[1] for t in targets.values() for m in t.modules)
        raise ValueError(f"load: several parameters map to the modules "
                         f"{few([n for n, c in dup.items() if c > 1])}")
    unknown = sorted(set(mods) - set(where))
    if unknown:
        raise ValueError(f"load: the adapter has {len(unknown)} module(s) that the Flax "
                         f"parameters do not have under this name_map, e.g. {few(unknown)}; "
                         f"the parameters' modules are e.g. {few(list(where))}"
                         + suggest_map(unknown, params, name_map))
    untargeted = sorted(n for n in mods if not is_targeted(cfg, n))
    if untargeted:
        raise ValueError(f"load: tensors for {few(untargeted)}, which the config's "
                         f"target_modules {cfg.get('target_modules')!r} do not select (PEFT "
                         "would ignore them)")
    if cfg.get("target_modules") != "all-linear":  # PEFT resolves that one against the torch model
        lacking = sorted(n for n in where if n not in mods and is_targeted(cfg, n))
        if lacking:
            raise ValueError(f"load: target_modules selects {few(lacking)} but the adapter has "
                             "no tensors for them")
    masks: dict[str, np.ndarray] = {}  # AdaLoRA's pruned ranks
    if ada:
        if cfg.get("alpha_pattern") or cfg.get("use_rslora"):
            warnings.warn("load: PEFT's AdaLoRA ignores alpha_pattern and use_rslora; so does "
                          "this load", stacklevel=2)
        masks = adalora_masks(cfg.get("rank_pattern"), int(cfg.get("init_r", 12)))
    dropout = float(cfg.get("lora_dropout") or 0.0)
    out: dict[str, L.LowRankLeaf] = {}
    for path, t in targets.items():
        present = [m for m in t.modules if m[1] in mods]
        if not present:
            continue
        supported(t)
        per_index: dict[tuple[int, ...], list] = collections.defaultdict(list)
        for idx, name, sl in t.modules:
            per_index[idx].append((name, sl))
        if ada:
            out[path] = load_adalora(t, per_index, mods, masks, cfg, dtype, dropout)
        else:
            out[path] = load_lora(t, per_index, mods, cfg, dtype, dropout)
    out.update(expert_leaves)
    from lora_jax.init_schemes import peft_residual_init  # PiSSA/OLoRA: their own base only

    residual = peft_residual_init(cfg.get("init_lora_weights", True))
    if residual and not ada:
        out = {p: x.replace(residual_init=residual) for p, x in out.items()}
    tree = L.from_leaves(out)
    L.check_fits(params, tree, where="peft.load")
    return tree


def _read_tensors(directory) -> dict[str, np.ndarray]:
    """``adapter_model.safetensors`` of a PEFT folder; errors name the file."""
    path = os.path.join(os.fspath(directory), WEIGHTS_NAME)
    if not os.path.isfile(path):
        bin_ = os.path.isfile(os.path.join(os.fspath(directory), "adapter_model.bin"))
        raise FileNotFoundError(
            f"load: {os.fspath(directory)} has no {WEIGHTS_NAME}"
            + ("; it has adapter_model.bin, a pickle, which lora_jax does not read: convert it "
               "to safetensors (PeftModel.save_pretrained(..., safe_serialization=True))"
               if bin_ else ""))
    try:
        tensors = st.load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise ValueError(f"load: {path} cannot be read as safetensors (truncated or damaged?): "
                         f"{e}") from None
    for key, x in tensors.items():
        if not np.issubdtype(x.dtype, np.floating) and x.dtype.name != "bfloat16":
            raise ValueError(f"load: tensor {key!r} in {path} has dtype {x.dtype}, expected "
                             "floating-point LoRA factors")
        if not np.isfinite(np.asarray(x, np.float32)).all():
            raise ValueError(f"load: tensor {key!r} in {path} holds NaN or Inf values")
    return tensors
