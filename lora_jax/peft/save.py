"""Writing an adapter tree as a PEFT folder: :func:`save`.

Each adapter leaf gives PEFT's matrices per stack index (``leaf.peft_matrices``); this file
shapes them for the module's torch layer, names them, and derives the config (the most common
rank and alpha, with per-module patterns for the rest).
"""

from __future__ import annotations

import collections
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from safetensors import numpy as st

from lora_jax import layouts
from lora_jax import lora as L
from lora_jax.peft import experts
from lora_jax.peft.config import CONFIG_NAME, PREFIX, WEIGHTS_NAME, check_config, patterns
from lora_jax.peft.modules import Target, supported, target
from lora_jax.peft.names import NameMap, map_parts, resolve

PyTree = Any
# The AdaLoRA schedule fields of the config: PEFT needs them, the tree does not hold them.
_ADALORA_DEFAULTS = dict(tinit=0, tfinal=0, deltaT=1, beta1=0.85, beta2=0.85, orth_reg_weight=0.5,
                         total_step=1)  # PEFT refuses total_step=None; override via extra_config
# Config fields the tree determines, which extra_config may not set.
_SAVE_PROTECTED = ("peft_type", "r", "lora_alpha", "target_modules", "rank_pattern", "use_dora",
                   "alpha_pattern", "use_rslora", "init_r", "target_r")


def _num(x: float) -> float | int:
    x = float(x)
    return int(x) if x.is_integer() else x


def _most_common(values: Sequence[Any]) -> Any:
    return collections.Counter(values).most_common(1)[0][0]  # ties: the first seen


def _module_tensors(t: Target, leaf: L.LowRankLeaf, idx, sl, dtype) -> dict[str, np.ndarray]:
    """PEFT's tensors for one module: the leaf's matrices at ``idx``, shaped for the kind of
    layer (``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)`` for a Linear; conv and embedding
    variants), ``lora_B`` sliced to the module's part of a fused kernel."""
    cast = lambda x: np.ascontiguousarray(np.asarray(x, dtype or x.dtype))  # noqa: E731
    m = leaf.peft_matrices(idx)
    a, b = m.pop("lora_A"), m.pop("lora_B")  # (r, n_in), (n_out, r)
    if m and t.layer != "linear":
        raise NotImplementedError(f"{t.path!r}: PEFT's {leaf.peft_type} adapts Linear layers only")
    if m and sl is not None and leaf.peft_type == "LORA":
        raise NotImplementedError(f"{t.path!r}: a {leaf.kind} adapter of a fused kernel")
    if t.layer == "conv":  # (r, cin, *spatial) from the kernel's (*spatial, cin) input axes
        spatial = t.core[: t.in_axes - 1]
        r = a.shape[0]
        ta = a.reshape((r,) + spatial + (t.core[t.in_axes - 1],))
        ta = ta.transpose((0, len(spatial) + 1) + tuple(range(1, len(spatial) + 1)))
        return {"lora_A.weight": cast(ta),
                "lora_B.weight": cast(b.reshape(b.shape + (1,) * len(spatial)))}
    b = b if sl is None else b[sl]
    if t.layer == "embedding":
        return {"lora_embedding_A": cast(a), "lora_embedding_B": cast(b)}
    if leaf.peft_type == "ADALORA":  # PEFT's AdaLoRA names its parameters without ".weight"
        return {"lora_A": cast(a), "lora_B": cast(b), **{k: cast(v) for k, v in m.items()}}
    return {"lora_A.weight": cast(a), "lora_B.weight": cast(b),
            **{k: cast(v) for k, v in m.items()}}


def _fold_scales(tensors: dict[str, np.ndarray], scales: Mapping[str, float],
                 common: float) -> None:
    """Multiplies each module's ``lora_B`` by ``scale / common``, so that the one scale
    ``common`` gives every module its own update."""
    for name, scale in scales.items():
        key = next(k for k in (f"{PREFIX}{name}.lora_B.weight", f"{PREFIX}{name}.lora_embedding_B")
                   if k in tensors)
        if scale != common:
            b = tensors[key]
            tensors[key] = np.ascontiguousarray(
                (b.astype(np.float64) * (scale / common)).astype(b.dtype))


def save(
    directory: str | os.PathLike,
    lora: PyTree,
    *,
    name_map: NameMap = None,
    dtype=None,
    extra_config: Mapping[str, Any] | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    for_servers: bool = False,
) -> dict[str, Any]:
    """Writes ``lora`` as a PEFT adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors``) that ``PeftModel.from_pretrained`` loads.

    LoRA trees become ``peft_type="LORA"``: the most common rank and alpha are ``r`` and
    ``lora_alpha``, the others go to ``rank_pattern``/``alpha_pattern`` (full module names).
    AdaLoRA trees become ``"ADALORA"`` with every module at its full ``init_r`` (pruned triplets
    have zero ``lora_E``, which PEFT's forward treats the same) and PEFT's scaling
    ``lora_alpha / (init_r + 1e-5)``.

    Args:
      directory: output directory (created if needed).
      lora: a LoRA tree of :class:`lora_jax.LoraWeight` or of
        :class:`lora_jax.adalora.AdaLoraWeight` leaves.
      name_map: Flax path -> torch module name (see :mod:`lora_jax.peft`).
      dtype: dtype of the saved tensors; default: the factors' own dtype.
      extra_config: more ``adapter_config.json`` fields (``task_type``,
        ``base_model_name_or_path``, AdaLoRA's ``total_step``/``tinit``/``tfinal``, ...);
        fields that the tree determines (``r``, ``lora_alpha``, ``target_modules``, ...) may not
        be set here.
      base_model_name_or_path: the base model's Hugging Face id or folder, written to the
        config (llama.cpp's ``convert_lora_to_gguf.py`` reads the base config from it).
      task_type: PEFT's ``task_type`` (``"CAUSAL_LM"`` for a language model); default None, or
        ``"CAUSAL_LM"`` with ``for_servers``.
      for_servers: write a folder that vLLM and SGLang load with the same outputs as PEFT.
        They apply one scale, ``lora_alpha / r`` of the config, to every module and ignore
        ``alpha_pattern`` (SGLang ignores ``use_rslora`` too, and both refuse DoRA): each
        module's own scale is folded into its ``lora_B``, ``use_rslora`` is false, and
        modules of another rank get the ``alpha_pattern`` entry that gives PEFT the same
        scale. LoRA leaves only.

    Returns:
      The config written.

    Raises:
      ValueError: a path the map does not name, two paths with one module name, per-module
        ``rslora`` values that differ (PEFT has one ``use_rslora``), AdaLoRA modules with
        different ``init_r``/alpha/``target_r`` (PEFT has one of each), or a protected field in
        ``extra_config``, a DoRA or AdaLoRA tree with ``for_servers``. NotImplementedError:
        an AdaLoRA conv/embedding, a fused conv.
    """
    lmap = L.leaves(lora)
    if not lmap:
        raise ValueError("save: the LoRA tree has no adapter leaves")
    peft_types = {x.peft_type for x in lmap.values()}
    if peft_types not in ({"LORA"}, {"ADALORA"}):
        raise TypeError(f"save: expected only LoRA or only AdaLoRA leaves, got "
                        f"{sorted({type(x).__name__ for x in lmap.values()})}")
    ada = peft_types == {"ADALORA"}
    if for_servers:
        kinds = sorted({x.kind for x in lmap.values() if x.peft_type != "LORA" or x.peft_config})
        if kinds:
            raise ValueError(f"save: for_servers writes plain LoRA (vLLM and SGLang load no "
                             f"other kind), but the tree holds {kinds} adapters")
        task_type = "CAUSAL_LM" if task_type is None else task_type
    scales: dict[str, float] = {}
    fn = resolve(name_map)
    expert_part = experts.save_part(lmap, name_map, dtype)  # PEFT's target_parameters
    tensors: dict[str, np.ndarray] = dict(expert_part.tensors)
    ranks, alphas, rslora, dropout = {}, {}, {}, {}
    for path, leaf in lmap.items():
        if path in expert_part.paths:
            continue
        parts = map_parts(fn, path)
        if parts is None:
            raise ValueError(f"save: name_map gives no PyTorch module name for {path!r}")
        if leaf.layout != layouts.canonical(len(leaf.layout), leaf.in_axes, leaf.stack_axes):
            raise ValueError(
                f"save: {path!r} has a kernel laid out as roles {leaf.roles!r}; PEFT's format "
                "stores (out, in) matrices of kernels laid out as (*stack, *in, *out), and "
                "this kernel's PyTorch counterpart is unknown")
        t = supported(target(path, leaf.kernel_shape, leaf.in_axes, parts, leaf.stack_axes))
        for idx, name, sl in t.modules:
            if name in ranks:
                raise ValueError(f"save: {path!r} and another path both map to module {name!r}")
            for k, v in _module_tensors(t, leaf, idx, sl, dtype).items():
                tensors[f"{PREFIX}{name}.{k}"] = v
            hp = leaf.hparams()
            ranks[name], alphas[name] = leaf.r, float(hp["alpha"])
            scales[name] = float(leaf.scale)
            rslora[name], dropout[name] = hp.get("rslora", False), leaf.dropout
    kinds = {json.dumps(x.peft_config, sort_keys=True) for x in lmap.values()}
    if len(kinds) > 1:
        raise ValueError(f"save: PEFT has one config for all modules, but the tree mixes "
                         f"{sorted({x.kind for x in lmap.values()})} adapters")
    if len(set(dropout.values())) > 1:
        warnings.warn(f"save: PEFT has one lora_dropout; the modules have {set(dropout.values())},"
                      " writing the most common", stacklevel=2)
    names = sorted(ranks)
    experts.warn_converted_names(names, name_map)
    ranks.update(expert_part.ranks)
    alphas.update(expert_part.alphas)
    rslora.update(expert_part.rslora)
    cfg: dict[str, Any] = dict(
        task_type=task_type, base_model_name_or_path=base_model_name_or_path, inference_mode=True,
        target_modules=names, bias="none",
        lora_dropout=_most_common(list(dropout.values())) if dropout else 0.0,
        fan_in_fan_out=False, init_lora_weights=True, use_dora=False, modules_to_save=None,
        layers_to_transform=None, layers_pattern=None,
    )
    if expert_part.target_parameters:
        if cfg["lora_dropout"]:
            raise ValueError("save: PEFT refuses lora_dropout with target_parameters (the "
                             "expert adapters); the other adapters have dropout "
                             f"{cfg['lora_dropout']}")
        cfg["target_parameters"] = expert_part.target_parameters
    cfg.update(next(iter(lmap.values())).peft_config)  # DoRA: use_dora=True
    bases = {getattr(x, "residual_init", "") for x in lmap.values()}
    if len(bases) > 1:
        raise ValueError(f"save: PEFT has one init_lora_weights for all modules, but the adapters "
                         f"start from different bases {sorted(bases)} ('' = the model's own)")
    if bases & {"pissa", "olora"}:  # PEFT's loader rebuilds that residual base from the model
        cfg["init_lora_weights"] = bases.pop()
    if ada:
        for what, vals in (("init_r", ranks), ("lora_alpha", alphas),
                           ("target_r", {p: x.hparams()["target_r"] for p, x in lmap.items()})):
            if len(set(vals.values())) > 1:
                raise ValueError(f"save: PEFT's AdaLoRA has one {what} for all modules, got "
                                 f"{dict(vals)}")
        leaf = next(iter(lmap.values()))
        cfg.update(peft_type="ADALORA", r=8, init_r=leaf.r, target_r=leaf.hparams()["target_r"],
                   lora_alpha=_num(leaf.hparams()["alpha"]), rank_pattern=None, alpha_pattern={},
                   use_rslora=False, **_ADALORA_DEFAULTS)
    elif for_servers:
        r, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
        _fold_scales(tensors, scales, alpha / r)
        cfg.update(peft_type="LORA", r=r, lora_alpha=_num(alpha),
                   rank_pattern=patterns(ranks, r),
                   alpha_pattern={k: _num(v) for k, v in patterns(
                       {n: alpha * rank / r for n, rank in ranks.items()}, alpha).items()},
                   use_rslora=False)
    else:
        if len(set(rslora.values())) > 1:
            on = sorted(n for n, v in rslora.items() if v)
            raise ValueError(f"save: PEFT has one use_rslora for all modules, but only {on} use "
                             "rsLoRA; use the same rslora everywhere")
        r, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
        cfg.update(peft_type="LORA", r=r, lora_alpha=_num(alpha),
                   rank_pattern=patterns(ranks, r),
                   alpha_pattern={k: _num(v) for k, v in patterns(alphas, alpha).items()},
                   use_rslora=bool(_most_common(list(rslora.values()))))
    for k, v in (extra_config or {}).items():
        if k in _SAVE_PROTECTED:
            raise ValueError(f"save: extra_config may not set {k!r}; the LoRA tree determines it")
        cfg[k] = v
    check_config(cfg, "save")
    os.makedirs(directory, exist_ok=True)
    st.save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    return cfg
