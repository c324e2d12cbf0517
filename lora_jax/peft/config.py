"""PEFT's ``adapter_config.json``: reading it, the options this package supports, and PEFT's
rules for which modules a config targets and what rank and alpha each gets.

The rules follow PEFT's own code (cited per function), so that a folder means the same here as
in ``PeftModel.from_pretrained``.

Every field of PEFT 0.21.2's ``LoraConfig`` and ``AdaLoraConfig`` is in :data:`FIELDS`, with
what :func:`lora_jax.peft.load` does with it:

* ``honoured``: read, and applied as PEFT applies it (``r``, ``lora_alpha``, ``target_modules``,
  ``rank_pattern``, ``use_rslora``, ``use_dora``, AdaLoRA's ``init_r``, ...);
* ``default only``: accepted at PEFT's default (or off: null, false, empty), refused otherwise,
  because a plain LoRA/AdaLoRA forward would not reproduce the adapter (``lora_bias``,
  ``modules_to_save``, ``use_qalora``, ...);
* ``ignored``: PEFT documents it as not changing the adapter's math (``inference_mode``,
  ``revision``, ``task_type``, initialisation settings, AdaLoRA's training schedule, ...).

A key that is not a field of the config's class (``LoraConfig`` or ``AdaLoraConfig``) may be
a newer PEFT's option that changes the math: it is refused unless its value is off (null,
false, empty, or the other class's default), which only warns.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from lora_jax import validation as V

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel's prefix of every adapter tensor key

HONOURED, DEFAULT_ONLY, IGNORED = "honoured", "default only", "ignored"
_ALL, _LORA, _ADA = ("LORA", "ADALORA"), ("LORA",), ("ADALORA",)

# Every field of PEFT 0.21.2's LoraConfig and AdaLoraConfig (peft/config.py, peft/tuners/lora/
# config.py, peft/tuners/adalora/config.py): field -> (what load does, PEFT's default, the
# config types that have it, why).
FIELDS: dict[str, tuple[str, Any, tuple[str, ...], str]] = {
    # PeftConfig
    "peft_type": (HONOURED, None, _ALL, "LORA or ADALORA; others refused"),
    "task_type": (IGNORED, None, _ALL, "the torch model class PEFT wraps"),
    "auto_mapping": (IGNORED, None, _ALL, "the torch model class PEFT rebuilds"),
    "peft_version": (IGNORED, None, _ALL, "the PEFT version that wrote the file"),
    "base_model_name_or_path": (IGNORED, None, _ALL, "where PEFT finds the base model"),
    "revision": (IGNORED, None, _ALL, "the base model's hub revision"),
    "inference_mode": (IGNORED, False, _ALL, "whether PEFT freezes the adapter"),
    # LoraConfig (AdaLoraConfig inherits it)
    "r": (HONOURED, 8, _ALL, "the rank (AdaLoRA: unused, as in PEFT; init_r is the rank)"),
    "target_modules": (HONOURED, None, _ALL, "which modules are adapted"),
    "exclude_modules": (HONOURED, None, _ALL, "modules left out"),
    "lora_alpha": (HONOURED, 8, _ALL, "the scale's numerator"),
    "lora_dropout": (HONOURED, 0.0, _ALL, "dropout on the adapter's input in training"),
    "fan_in_fan_out": (IGNORED, False, _ALL,
                       "the torch base weight's layout; lora_A/lora_B are stored the same"),
    "bias": (DEFAULT_ONLY, "none", _ALL, "trained biases are not part of the adapter tree"),
    "use_rslora": (HONOURED, False, _ALL, "scale alpha / sqrt(r) (AdaLoRA ignores it, as PEFT)"),
    "modules_to_save": (DEFAULT_ONLY, None, _ALL, "fully trained modules"),
    "init_lora_weights": (HONOURED, True, _ALL,
                          "initialisation only; 'mica' (frozen B) refused, schemes that "
                          "change the base weights warned"),
    "layers_to_transform": (HONOURED, None, _ALL, "which layer indexes are adapted"),
    "layers_pattern": (HONOURED, None, _ALL, "where layers_to_transform finds the index"),
    "rank_pattern": (HONOURED, {}, _ALL, "per-module ranks (AdaLoRA: the kept ranks)"),
    "alpha_pattern": (HONOURED, {}, _ALL, "per-module alphas (AdaLoRA ignores it, as PEFT)"),
    "megatron_config": (DEFAULT_ONLY, None, _ALL, "Megatron parallel layers"),
    "megatron_core": (IGNORED, "megatron.core", _ALL, "read only with megatron_config"),
    "trainable_token_indices": (DEFAULT_ONLY, None, _ALL, "trained embedding rows"),
    "loftq_config": (IGNORED, {}, _ALL, "initialisation (init_lora_weights='loftq' warns)"),
    "eva_config": (IGNORED, None, _ALL, "initialisation"),
    "corda_config": (IGNORED, None, _ALL, "initialisation (init_lora_weights='corda' warns)"),
    "lora_ga_config": (IGNORED, None, _ALL, "initialisation (init_lora_weights='lora_ga' warns)"),
    "use_dora": (HONOURED, False, _ALL, "DoRA's magnitude (LORA only)"),
    "velora_config": (DEFAULT_ONLY, None, _ALL, "VeLoRA's compressed backward"),
    "alora_invocation_tokens": (DEFAULT_ONLY, None, _ALL, "aLoRA: adapter on some tokens only"),
    "use_qalora": (DEFAULT_ONLY, False, _ALL, "QALoRA's pooled input"),
    "qalora_group_size": (IGNORED, 16, _ALL, "read only with use_qalora"),
    "monteclora_config": (DEFAULT_ONLY, None, _ALL, "Monte Carlo sampled factors"),
    "layer_replication": (DEFAULT_ONLY, None, _ALL, "replicated base layers"),
    "runtime_config": (IGNORED, None, _ALL, "runtime only; PEFT drops it on load"),
    "lora_bias": (DEFAULT_ONLY, False, _ALL, "a bias on lora_B"),
    "target_parameters": (HONOURED, None, _ALL,
                          "LoRA on 3-D expert parameters (lora_jax.peft.experts)"),
    "use_bdlora": (DEFAULT_ONLY, None, _ALL, "block-diagonal factors"),
    "arrow_config": (DEFAULT_ONLY, None, _ALL, "Arrow routing between adapters"),
    "kasa_config": (DEFAULT_ONLY, None, _ALL, "KaSA's truncated base and singular values"),
    "ensure_weight_tying": (DEFAULT_ONLY, False, _ALL,
                            "tied modules share one adapter that the file stores once"),
    # AdaLoraConfig
    "target_r": (HONOURED, 8, _ADA, "the rank budget of further training"),
    "init_r": (HONOURED, 12, _ADA, "the rank; scale lora_alpha / init_r"),
    "tinit": (IGNORED, 0, _ADA, "training schedule"),
    "tfinal": (IGNORED, 0, _ADA, "training schedule"),
    "deltaT": (IGNORED, 1, _ADA, "training schedule"),
    "beta1": (IGNORED, 0.85, _ADA, "training schedule"),
    "beta2": (IGNORED, 0.85, _ADA, "training schedule"),
    "orth_reg_weight": (IGNORED, 0.5, _ADA, "training loss"),
    "total_step": (IGNORED, None, _ADA, "training schedule"),
}
_CLASS = {"LORA": "LoraConfig", "ADALORA": "AdaLoraConfig"}
# init_lora_weights schemes that change the base weights, so the adapter needs the changed base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _is_off(value: Any, default: Any) -> bool:
    """``value`` is PEFT's default, or an off value where the default is off."""
    return value == default or (not value and (
        default is None or default is False or default == {} or default == []))


def check_fields(cfg: Mapping[str, Any], peft_type: str, where: str) -> None:
    """Refuses ``default only`` fields away from their default and keys PEFT 0.21.2's config
    class lacks (warns when their value is off); see :data:`FIELDS`."""
    cls = _CLASS[peft_type]
    bad, unknown, off = [], [], []
    for key, value in cfg.items():
        how, default, types, _ = FIELDS.get(key, (None, None, (), ""))
        if peft_type in types:
            if how == DEFAULT_ONLY and not _is_off(value, default):
                bad.append(f"{key}={value!r:.60}")
        elif _is_off(value, default):
            off.append(key)
        else:
            unknown.append(f"{key}={value!r:.60}")
    if bad:
        raise ValueError(f"{where}: unsupported PEFT options {bad}: lora_jax.peft handles plain "
                         "LoRA (and DoRA)/AdaLoRA adapters (no LoRA bias, trained biases, "
                         "modules_to_save, or other LoRA variants)")
    if unknown:
        raise ValueError(f"{where}: unknown PEFT options {unknown}: not fields of PEFT 0.21.2's "
                         f"{cls}, so lora_jax cannot tell whether they change the adapter's "
                         "math; remove them (or set them to null) if they do not")
    if off:
        warnings.warn(f"{where}: ignoring {off}, which are not fields of PEFT 0.21.2's {cls} "
                      "(their values are off)", stacklevel=4)


def pattern_key(pattern_keys: Sequence[str], name: str) -> str:
    """PEFT ``utils.other.get_pattern_key``: the first key matching the end of ``name``."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name


def is_targeted(cfg: Mapping[str, Any], name: str) -> bool:
    """PEFT ``tuners_utils.check_target_module_exists`` (exclusions and layer indexes included)."""
    ex = cfg.get("exclude_modules")
    if ex and (re.fullmatch(ex, name) if isinstance(ex, str)
               else name in ex or any(name.endswith(f".{e}") for e in ex)):
        return False
    tm = cfg.get("target_modules")
    if tm is None:
        return False
    if isinstance(tm, str):
        return tm.lower() == "all-linear" or re.fullmatch(tm, name) is not None
    if name in tm:
        return True
    found = any(name.endswith(f".{t}") for t in tm)
    layers = cfg.get("layers_to_transform")
    if found and layers is not None and (not isinstance(layers, list) or layers):
        pats = cfg.get("layers_pattern")
        pats = [pats] if isinstance(pats, str) else pats
        m = (re.match(r".*?\.[^.]*\.(\d+)\.", name) if not pats
             else next((m for p in pats if (m := re.match(rf".*?\.{p}\.(\d+)\.", name))), None))
        if m is None:
            return False
        i = int(m.group(1))
        return i == layers if isinstance(layers, int) else i in layers
    return found


def check_config(cfg: Mapping[str, Any], where: str) -> str:
    """``cfg``'s ``peft_type`` ("LORA" or "ADALORA"), after refusing options whose adapters a
    plain LoRA/AdaLoRA forward would not reproduce (and warning for initialisations that
    change the base weights)."""
    peft_type = cfg.get("peft_type")
    if peft_type not in ("LORA", "ADALORA"):
        raise ValueError(f"{where}: unsupported peft_type {peft_type!r}; lora_jax.peft reads and "
                         "writes LORA and ADALORA adapters")
    bad = []
    if cfg.get("use_dora") and peft_type != "LORA":
        bad.append("use_dora with peft_type " + repr(peft_type))
    if str(cfg.get("init_lora_weights", True)).lower().startswith("mica"):
        bad.append("init_lora_weights='mica'")
    if bad:
        raise ValueError(f"{where}: unsupported PEFT options {bad}: lora_jax.peft handles plain "
                         "LoRA (and DoRA)/AdaLoRA adapters (no LoRA bias, trained biases, "
                         "modules_to_save, or other LoRA variants)")
    check_fields(cfg, peft_type, where)
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        warnings.warn(f"{where}: init_lora_weights={init!r}: the adapter is only correct on the "
                      "base weights it was trained with (e.g. PiSSA's residual base)", stacklevel=3)
    return peft_type


def patterns(values: Mapping[str, Any], default: Any) -> dict[str, Any]:
    """``rank_pattern``/``alpha_pattern`` that PEFT resolves back to ``values`` exactly.

    Keys are full module names, longest first, so that a shorter name ("fc2") cannot claim a
    longer one ("block.fc2") that PEFT's suffix match would also accept; a module that still
    resolves wrongly gets its own entry.
    """
    pat = {n: v for n, v in values.items() if v != default}
    for _ in range(len(values) + 1):
        ordered = dict(sorted(pat.items(), key=lambda kv: -len(kv[0])))
        wrong = [n for n, v in values.items()
                 if ordered.get(pattern_key(list(ordered), n), default) != v]
        if not wrong:
            return ordered
        pat.update({n: values[n] for n in wrong})
    raise ValueError(f"cannot express per-module values {dict(values)} as a PEFT pattern")


def read_config(directory) -> dict:
    """``adapter_config.json`` of a PEFT folder as a dict; errors name the file."""
    directory = os.fspath(directory)
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"load: no PEFT adapter directory at {directory}")
    if not os.path.isfile(path):
        hint = ""
        if os.path.isdir(os.path.join(directory, "adapter")) or os.path.isdir(
                os.path.join(directory, "state")):
            hint = ("; it looks like a lora_jax checkpoint: read it with "
                    "lora_jax.checkpoint.load_adapter")
        raise FileNotFoundError(f"load: {directory} has no {CONFIG_NAME}, so it is not a PEFT "
                                f"adapter folder{hint}")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"load: {path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"load: {path} nests too deep to be a PEFT config") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"load: {path} must hold a JSON object (PEFT's LoraConfig fields), got "
                         f"a {type(cfg).__name__}")
    return cfg


def check_values(cfg: Mapping[str, Any], peft_type: str, where: str) -> None:
    """Types and ranges of the config fields ``load`` reads, each error naming the field."""
    def integer(key, low):
        if cfg.get(key) is not None:
            V.integer(cfg[key], f"{where}: {key}", low=low)

    def num(key, value, what):
        v = V.number(value, f"{where}: {what}")
        if peft_type == "ADALORA" and v == 0:
            return  # PEFT's AdaLoRA reads lora_alpha 0 as init_r
        if v <= 0:
            raise ValueError(f"{where}: {what} must be > 0, got {v}: PEFT scales the update by "
                             "lora_alpha / r, so the adapter would be off or reversed")

    if "r" in cfg:
        V.integer(cfg["r"], f"{where}: r", low=1)
    if "lora_alpha" in cfg:
        if cfg["lora_alpha"] is None:
            raise TypeError(f"{where}: lora_alpha must be a number, got null")
        num("lora_alpha", cfg["lora_alpha"], "lora_alpha")
    integer("init_r", 1)
    integer("target_r", 0)
    if cfg.get("lora_dropout") is not None:
        V.dropout(cfg["lora_dropout"], f"{where}: lora_dropout")
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise TypeError(f"{where}: use_rslora must be true or false, got {cfg['use_rslora']!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(key)
        if pat is None:
            continue
        if not isinstance(pat, dict):
            raise TypeError(f"{where}: {key} must be a JSON object, got {pat!r:.80}")
        for k, v in pat.items():
            # PEFT matches keys as regexes: re.match(rf"(.*\.)?({key})$", module name)
            V.regex(k, f"{where}: {key} key")
            if peft_type == "ADALORA" and key == "rank_pattern":
                if not isinstance(v, list) or not all(isinstance(b, bool) for b in v):
                    raise TypeError(f"{where}: AdaLoRA rank_pattern[{k!r}] must be a list of "
                                    f"true/false (the kept ranks), got {v!r:.80}")
            elif key == "rank_pattern":
                V.integer(v, f"{where}: rank_pattern[{k!r}]", low=1)
            else:
                num(key, v, f"alpha_pattern[{k!r}]")
    tm = cfg.get("target_modules")
    if isinstance(tm, str):
        if tm.lower() != "all-linear":
            V.regex(tm, f"{where}: target_modules")
    elif tm is not None and not (isinstance(tm, list) and all(isinstance(t, str) for t in tm)):
        raise TypeError(f"{where}: target_modules must be a regex string or a list of module "
                        f"names, got {tm!r:.80}")
    ex = cfg.get("exclude_modules")
    if isinstance(ex, str):
        V.regex(ex, f"{where}: exclude_modules")
    elif ex is not None and not (isinstance(ex, list) and all(isinstance(t, str) for t in ex)):
        raise TypeError(f"{where}: exclude_modules must be a regex string or a list of names, "
                        f"got {ex!r:.80}")
    layers = cfg.get("layers_to_transform")
    if layers is not None:
        for i, x in enumerate(layers if isinstance(layers, list) else [layers]):
            V.integer(x, f"{where}: layers_to_transform" + (f"[{i}]" if isinstance(layers, list)
                                                             else ""), low=0)
    lp = cfg.get("layers_pattern")
    for x in [lp] if isinstance(lp, str) else lp or []:
        V.regex(x, f"{where}: layers_pattern")
