"""PEFT's ``target_parameters`` adapters: LoRA on stacked 3-D expert parameters.

PEFT (``tuners/lora/layer.py`` ``ParamWrapper``) adapts an ``nn.Parameter`` of shape
``(E, out, in)`` (the layout of transformers' fused experts, e.g. Qwen3-MoE's
``mlp.experts.gate_up_proj`` (E, 2f, d) and ``mlp.experts.down_proj`` (E, d, f)) with one
LoRA per expert, stored in two matrices of the module holding the parameter:

* ``lora_A.weight`` ``(r·E, in)``: expert e's ``A_e`` (r, in) is rows ``e·r .. e·r + r``;
* ``lora_B.weight`` ``(out, r·E)``: ``B_e`` (out, r) is columns ``k·E + e`` (k = 0..r-1);
* expert e's update is ``scaling · B_e @ A_e`` with ``scaling = lora_alpha / r`` (or
  ``/ sqrt(r)`` with ``use_rslora``); ``r``/``lora_alpha`` follow ``rank_pattern``/
  ``alpha_pattern`` matched against the parameter's full name
  (``model.layers.0.mlp.experts.gate_up_proj``).

The Flax kernel of that parameter is ``(E, in, out)`` (each expert's slice transposed), so the
adapter leaf is a :class:`lora_jax.LoraWeight` with one stack axis: ``a (E, in, r) = A_e.T``
per expert, ``b (E, r, out) = B_e.T``.

Several targeted parameters of one module nest: PEFT wraps them in the order the module
registers its parameters, each new wrapper around the previous one, so the last one's tensors
are named ``<module>.lora_A.weight`` and each earlier one gets one more ``.base_layer`` per
wrapper around it (Qwen3-MoE with both targeted: ``gate_up_proj`` is
``<module>.base_layer.lora_A.weight``, ``down_proj`` is ``<module>.lora_A.weight``).

Adapters written for older transformers, whose experts were Linear modules
(``<module>.{j}.gate_proj`` ...), load too (see :func:`take`); :func:`lora_jax.peft.save`
writes the ``target_parameters`` form.

An *expert map* says which Flax paths are such parameters: ``{regex: (module name, parameter
name)}`` plus the module's parameter order; :data:`EXPERT_MAPS` has one per built-in name map
that has experts (``"qwen3_moe"``, for :class:`lora_jax.models.moe.MoeModel`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax import lora as L
from lora_jax import paths
from lora_jax.peft.config import PREFIX, pattern_key
from lora_jax.peft.names import NameMap, few


@dataclasses.dataclass(frozen=True)
class ExpertMap:
    """Flax expert kernels -> PEFT parameter names.

    Attributes:
      paths: ``{regex over Flax paths: (module name template, parameter name)}`` (the
        template expanded with the match's groups).
      order: the module's parameters in PyTorch registration order (the nesting order).
      per_expert: ``{parameter: its per-expert Linear modules, in output order}``: the
        layout of older transformers (``<module>.{j}.gate_proj`` ...), whose PEFT adapters
        :func:`take` reads too.
    """

    paths: Mapping[str, tuple[str, str]]
    order: tuple[str, ...]
    per_expert: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def lookup(self, path: str) -> tuple[str, str] | None:
        for pat, (module, param) in self.paths.items():
            m = re.fullmatch(pat, path)
            if m:
                return m.expand(module), m.expand(param)
        return None


EXPERT_MAPS: dict[str, ExpertMap] = {
    "qwen3_moe": ExpertMap(
        {r"params/layers_(\d+)/mlp/experts/(gate_up_proj|down_proj)/kernel":
            (r"model.layers.\1.mlp.experts", r"\2")},
        ("gate_up_proj", "down_proj"),
        {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}),
}


def expert_map(name_map: NameMap) -> ExpertMap | None:
    """The expert map that goes with a built-in ``name_map`` (None if it has none)."""
    return EXPERT_MAPS.get(name_map) if isinstance(name_map, str) else None


def _selects(targets: list[str], key: str) -> bool:
    """PEFT's match of a parameter's full name against ``target_parameters``
    (``BaseTuner._inject_parameters``: equal, or a dotted suffix)."""
    return key in targets or any(key.endswith(f".{t}") for t in targets)


def _prefixes(params_of_module: list[str], order: tuple[str, ...]) -> dict[str, str]:
    """``{parameter: PEFT key prefix part}``: ``.base_layer`` once per wrapper around it."""
    ranked = sorted(params_of_module, key=order.index)
    n = len(ranked)
    return {p: ".base_layer" * (n - 1 - i) for i, p in enumerate(ranked)}


def take(cfg: Mapping[str, Any], tensors: dict[str, np.ndarray], params: Any,
         name_map: NameMap, dtype: Any) -> dict[str, L.LoraWeight]:
    """The expert adapters of a PEFT folder (``target_parameters``, or per-expert modules of
    older transformers): removes their tensors from ``tensors`` and returns
    ``{Flax path: LoraWeight}``.

    Raises:
      ValueError: no expert map for ``name_map``, a ``target_parameters`` entry that names no
        parameter of the model (PEFT would fail too), a targeted parameter without tensors, a
        tensor of the wrong shape (named, with the expected shape), options PEFT's
        ``ParamWrapper`` refuses (dropout, DoRA).
    """
    out = _take_per_expert(cfg, tensors, params, name_map, dtype)
    targets = cfg.get("target_parameters") or []
    if not targets:
        return out
    where = "load"
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise TypeError(f"{where}: target_parameters must be a list of parameter names, got "
                        f"{targets!r:.80}")
    emap = expert_map(name_map)
    if emap is None:
        raise ValueError(f"{where}: the adapter targets parameters {targets} "
                         "(target_parameters), which needs the expert map of a built-in "
                         f"name_map; name_map={name_map!r} has none (EXPERT_MAPS has "
                         f"{sorted(EXPERT_MAPS)})")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{where}: target_parameters with peft_type {cfg.get('peft_type')!r}; "
                         "PEFT adapts parameters with LORA only")
    if cfg.get("lora_dropout") or cfg.get("use_dora"):
        raise ValueError(f"{where}: PEFT's target_parameters adapters (ParamWrapper) refuse "
                         "lora_dropout and use_dora; this config sets them")
    found: dict[str, tuple[str, str, tuple[int, ...]]] = {}  # path -> (module, param, shape)
    for path, x in paths.flatten(params):
        hit = emap.lookup(path)
        if hit is not None:
            found[path] = (*hit, tuple(x.shape))
    keys = {f"{m}.{p}" for m, p, _ in found.values()}
    for t in targets:
        if not any(_selects([t], k) for k in keys):
            raise ValueError(f"{where}: target_parameters entry {t!r} names no parameter of the "
                             f"model; its expert parameters are e.g. {few(sorted(keys))}")
    per_module: dict[str, list[str]] = {}
    for m, p, _ in found.values():
        if _selects(targets, f"{m}.{p}"):
            per_module.setdefault(m, []).append(p)
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora"))
    for path, (module, param, shape) in found.items():
        if param not in per_module.get(module, []):
            continue
        if path in out:
            raise ValueError(f"{where}: {module}.{param} has both per-expert module tensors and "
                             "target_parameters tensors")
        prefix = PREFIX + module + _prefixes(per_module[module], emap.order)[param]
        key = f"{module}.{param}"
        r = int(rp.get(pattern_key(list(rp), key), cfg.get("r", 8)))
        alpha = float(ap.get(pattern_key(list(ap), key), cfg.get("lora_alpha", 8)))
        n_exp, n_in, n_out = shape
        want = {"lora_A.weight": (r * n_exp, n_in), "lora_B.weight": (n_out, r * n_exp)}
        got = {}
        for name, expected in want.items():
            k = f"{prefix}.{name}"
            if k not in tensors:
                raise ValueError(f"{where}: target_parameters selects {key!r} but the adapter "
                                 f"has no tensor {k!r}")
            x = tensors.pop(k)
            if tuple(x.shape) != expected:
                raise ValueError(f"{where}: tensor {k!r} has shape {tuple(x.shape)}, expected "
                                 f"{expected} (r={r}, {n_exp} experts, parameter {key!r} of "
                                 f"(experts, out, in) = {(n_exp, n_out, n_in)})")
            got[name] = np.asarray(x, np.float32)
        a = got["lora_A.weight"].reshape(n_exp, r, n_in).transpose(0, 2, 1)
        b = got["lora_B.weight"].reshape(n_out, r, n_exp).transpose(2, 1, 0)
        out[path] = L.LoraWeight(a=jnp.asarray(a, dtype), b=jnp.asarray(b, dtype), alpha=alpha,
                                 rslora=rslora, in_axes=1, stack_axes=1, dropout=0.0)
    return out


def _take_per_expert(cfg: Mapping[str, Any], tensors: dict[str, np.ndarray], params: Any,
                     name_map: NameMap, dtype: Any) -> dict[str, L.LoraWeight]:
    """Adapters of per-expert Linear modules (``<module>.{j}.gate_proj`` ..., transformers 4's
    layout) as leaves of the stacked kernels; removes their tensors from ``tensors``.

    Expert j's modules of one kernel (gate and up for ``gate_up_proj``) stack their ranks:
    ``a_j = [A_gate.T, A_up.T]`` and a block-diagonal ``b_j`` holding ``scale · B.T`` of each
    in its output columns (leaf ``alpha = rank``, so the leaf's scale is 1); a module absent
    from the adapter (up_proj not targeted) adds no rank, its output columns stay zero.
    """
    emap = expert_map(name_map)
    if emap is None or not emap.per_expert:
        return {}
    from lora_jax.peft.config import is_targeted

    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora"))
    out: dict[str, L.LoraWeight] = {}
    for path, x in paths.flatten(params):
        hit = emap.lookup(path)
        if hit is None or hit[1] not in emap.per_expert:
            continue
        module, param = hit
        n_exp, n_in, n_out = tuple(x.shape)
        subs = emap.per_expert[param]
        width = n_out // len(subs)
        names = {(j, sub): f"{module}.{j}.{sub}" for j in range(n_exp) for sub in subs}
        present = {k: n for k, n in names.items() if f"{PREFIX}{n}.lora_A.weight" in tensors}
        if not present:
            continue
        if cfg.get("use_dora") or cfg.get("peft_type") != "LORA":
            raise ValueError(f"load: per-expert adapters of {module} are read as plain LoRA only")
        blocks: dict[tuple[int, str], tuple[np.ndarray, np.ndarray, float]] = {}
        for (j, sub), name in names.items():
            key_a, key_b = f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"
            if (j, sub) not in present:
                if any(s == sub for _, s in present) or is_targeted(cfg, name):
                    raise ValueError(f"load: the adapter has per-expert tensors of {module} "
                                     f"but no {key_a!r}")
                continue
            if not is_targeted(cfg, name):
                raise ValueError(f"load: tensors for {name!r}, which the config's "
                                 f"target_modules {cfg.get('target_modules')!r} do not select "
                                 "(PEFT would ignore them)")
            if key_b not in tensors:
                raise ValueError(f"load: {key_a!r} without {key_b!r}")
            r = int(rp.get(pattern_key(list(rp), name), cfg.get("r", 8)))
            alpha = float(ap.get(pattern_key(list(ap), name), cfg.get("lora_alpha", 8)))
            a, b = tensors.pop(key_a), tensors.pop(key_b)
            for k, got, want in ((key_a, a, (r, n_in)), (key_b, b, (width, r))):
                if tuple(got.shape) != want:
                    raise ValueError(f"load: tensor {k!r} has shape {tuple(got.shape)}, "
                                     f"expected {want} (r={r})")
            scale = alpha / (r ** 0.5 if rslora else r)
            blocks[(j, sub)] = (np.asarray(a, np.float64), np.asarray(b, np.float64), scale)
        ranks = {sub: {blocks[(j, s)][0].shape[0] for (j, s) in blocks if s == sub}
                 for sub in subs}
        if any(len(v) > 1 for v in ranks.values()):
            raise NotImplementedError(f"load: experts of {module} with different ranks per "
                                      f"expert {ranks}; one leaf holds one rank")
        rank_of = {sub: next(iter(v)) for sub, v in ranks.items() if v}
        total = sum(rank_of.values())
        a_all = np.zeros((n_exp, n_in, total))
        b_all = np.zeros((n_exp, total, n_out))
        for j in range(n_exp):
            row = 0
            for k, sub in enumerate(subs):
                if sub not in rank_of:
                    continue
                a, b, scale = blocks[(j, sub)]
                r = rank_of[sub]
                a_all[j, :, row: row + r] = a.T
                b_all[j, row: row + r, k * width: (k + 1) * width] = b.T * scale
                row += r
        out[path] = L.LoraWeight(a=jnp.asarray(a_all, dtype), b=jnp.asarray(b_all, dtype),
                                 alpha=float(total), rslora=False, in_axes=1, stack_axes=1,
                                 dropout=float(cfg.get("lora_dropout") or 0.0))
    return out


def warn_converted_names(module_names: list[str], name_map: NameMap) -> None:
    """Warns when PEFT would misread ``target_modules``: for MoE model types, PEFT 0.21 under
    transformers 5 (``utils/transformers_weight_conversion.py``) turns every entry named like
    a per-expert module of older transformers (``gate_proj``, ``up_proj``, ``down_proj``) into
    expert ``target_parameters`` and drops it from ``target_modules``, so the adapters of
    dense MLP layers (``mlp_only_layers``, ``decoder_sparse_step``) of such a model would be
    ignored when PEFT loads the folder (their tensors left unused)."""
    emap = expert_map(name_map)
    if emap is None or not emap.per_expert:
        return
    fused = {m for mods in emap.per_expert.values() for m in mods}
    hit = [n for n in module_names if n.rsplit(".", 1)[-1] in fused]
    if hit:
        import warnings

        warnings.warn(f"save: PEFT 0.21 with transformers 5 reads target_modules {few(hit)} as "
                      "expert parameters and ignores these dense-MLP adapters when it loads "
                      "this folder (lora_jax.peft.load reads them correctly)", stacklevel=3)


@dataclasses.dataclass
class SavedExperts:
    """The expert part of a PEFT folder being written."""

    paths: set[str]
    tensors: dict[str, np.ndarray]
    ranks: dict[str, int]
    alphas: dict[str, float]
    rslora: dict[str, bool]
    target_parameters: list[str]


def save_part(lmap: Mapping[str, L.LowRankLeaf], name_map: NameMap, dtype: Any) -> SavedExperts:
    """PEFT's tensors and config entries for the leaves of ``lmap`` that the expert map of
    ``name_map`` names (the others are left to the module path of :func:`lora_jax.peft.save`).

    Raises:
      ValueError: an expert leaf that is not a plain LoRA with one stack axis and a
        ``(E, in, out)`` kernel, or that has dropout (PEFT's ParamWrapper refuses it).
    """
    emap = expert_map(name_map)
    part = SavedExperts(set(), {}, {}, {}, {}, [])
    if emap is None:
        return part
    found = {p: emap.lookup(p) for p in lmap}
    found = {p: v for p, v in found.items() if v is not None}
    per_module: dict[str, list[str]] = {}
    for module, param in found.values():
        per_module.setdefault(module, []).append(param)
    for path, (module, param) in found.items():
        leaf = lmap[path]
        if leaf.peft_type != "LORA" or leaf.peft_config:
            raise ValueError(f"save: {path!r} is a {leaf.kind} adapter; PEFT adapts expert "
                             "parameters (target_parameters) with plain LoRA only")
        if (leaf.stack_axes, leaf.in_axes, leaf.layout, len(leaf.kernel_shape)) != (1, 1, "sio", 3):
            raise ValueError(f"save: {path!r} must be laid out as (experts, in, out) with one "
                             f"stack axis (stack_axes=1, in_axes=1) to be saved as PEFT's "
                             f"{module}.{param}; it has roles {leaf.layout!r}")
        if leaf.dropout:
            raise ValueError(f"save: {path!r} has dropout {leaf.dropout}; PEFT's "
                             "target_parameters adapters refuse lora_dropout")
        n_exp = leaf.kernel_shape[0]
        mats = [leaf.peft_matrices((e,)) for e in range(n_exp)]
        cast = lambda x: np.ascontiguousarray(np.asarray(x, dtype or x.dtype))  # noqa: E731
        lora_a = np.concatenate([m["lora_A"] for m in mats])  # row e·r + k
        lora_b = np.stack([m["lora_B"] for m in mats], axis=-1)  # (out, r, E): column k·E + e
        prefix = PREFIX + module + _prefixes(per_module[module], emap.order)[param]
        part.tensors[f"{prefix}.lora_A.weight"] = cast(lora_a)
        part.tensors[f"{prefix}.lora_B.weight"] = cast(lora_b.reshape(lora_b.shape[0], -1))
        key = f"{module}.{param}"
        hp = leaf.hparams()
        part.ranks[key], part.alphas[key] = leaf.r, float(hp["alpha"])
        part.rslora[key] = bool(hp.get("rslora", False))
        part.paths.add(path)
        part.target_parameters.append(key)
    part.target_parameters.sort()
    return part

