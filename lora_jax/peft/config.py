"""PEFT's ``adapter_config.json``: reading it, the options this package supports, and PEFT's
rules for which modules a config targets and what rank and alpha each gets.

The rules follow PEFT's own code (cited per function), so that a folder means the same here as
in ``PeftModel.from_pretrained``.
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

# PEFT options whose adapters a plain LoRA/AdaLoRA forward would not reproduce.
_UNSUPPORTED = ("lora_bias", "use_qalora", "use_bdlora", "velora_config",
                "alora_invocation_tokens", "monteclora_config", "arrow_config", "kasa_config",
                "modules_to_save", "trainable_token_indices", "layer_replication",
                "megatron_config")  # target_parameters: lora_jax.peft.experts


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
    bad = [k for k in _UNSUPPORTED if cfg.get(k)]
    if cfg.get("use_dora") and peft_type != "LORA":
        bad.append("use_dora with peft_type " + repr(peft_type))
    if cfg.get("bias", "none") != "none":
        bad.append(f"bias={cfg['bias']!r}")
    if str(cfg.get("init_lora_weights", True)).lower().startswith("mica"):
        bad.append("init_lora_weights='mica'")
    if bad:
        raise ValueError(f"{where}: unsupported PEFT options {bad}: lora_jax.peft handles plain "
                         "LoRA (and DoRA)/AdaLoRA adapters (no LoRA bias, trained biases, "
                         "modules_to_save, or other LoRA variants)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.split("_")[0] in ("pissa", "olora", "corda", "loftq", "eva"):
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
