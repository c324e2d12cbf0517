"""Name maps: which PyTorch module each Flax parameter path becomes.

A name map takes a Flax parameter path ("params/fc1/kernel") to a torch module name ("fc1"). It
is a callable, a dict (exact path or ``re.fullmatch`` regex -> replacement, expanded with the
match's groups), the name of an entry of :data:`NAME_MAPS`, or ``None`` for
:func:`default_name_map`. A name may hold ``{i}`` (and ``{j}``, ``{k}``) for the stacked axes of
``nn.scan`` parameters; an entry may map one fused kernel to a list of ``(module name, slice of
the flattened output axis)``. :func:`resolve` turns any of these into a function and
:func:`map_parts` reads its answer for one path.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

NameMap = Callable[[str], Any] | Mapping[str, Any] | str | None
# A Flax leaf name -> the torch parameter name it is stored under.
LEAF_TO_TORCH = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
PLACEHOLDERS = ("i", "j", "k")  # in module names, the indexes of the stack axes


def default_name_map(path: str) -> str:
    """Drops a leading ``params/`` and a trailing leaf name, joins the rest with dots.

    >>> default_name_map("params/encoder/fc1/kernel"), default_name_map("params/pos")
    ('encoder.fc1', 'pos')
    """
    parts = path.split("/")
    if len(parts) > 1 and parts[0] == "params":
        parts = parts[1:]
    if len(parts) > 1 and parts[-1] in LEAF_TO_TORCH:
        parts = parts[:-1]
    return ".".join(parts)


def _gpt_name_map() -> dict[str, str]:
    # GPT-J-style names (lora_jax.models.gpt has separate q/k/v like GPT-J, not GPT-2's c_attn).
    m = {r"params/embed/embedding": "transformer.wte", r"params/pos": "transformer.wpe.weight",
         r"params/ln_f/\w+": "transformer.ln_f", r"params/head/\w+": "lm_head"}
    for flax, torch in (("ln1", "ln_1"), ("q", "attn.q_proj"), ("k", "attn.k_proj"),
                        ("v", "attn.v_proj"), ("o", "attn.out_proj"), ("ln2", "ln_2"),
                        ("up", "mlp.fc_in"), ("down", "mlp.fc_out")):
        m[rf"params/block_(\d+)/{flax}/\w+"] = rf"transformer.h.\1.{torch}"
        m[rf"params/layers/block/{flax}/\w+"] = f"transformer.h.{{i}}.{torch}"  # nn.scan
    return m


def _llama_name_map() -> dict[str, str]:
    # Hugging Face LlamaForCausalLM's module names, as lora_jax.models.llama.hf_names spells
    # its tensor names (a test checks the two agree on every parameter).
    return {r"params/embed_tokens/embedding": "model.embed_tokens",
            r"params/norm/scale": "model.norm",
            r"params/lm_head/kernel": "lm_head",
            r"params/layers_(\d+)/(self_attn|mlp)/(\w+)/kernel": r"model.layers.\1.\2.\3",
            r"params/layers_(\d+)/(input_layernorm|post_attention_layernorm)/scale":
                r"model.layers.\1.\2"}


def _qwen3_moe_name_map() -> dict[str, str]:
    # Hugging Face Qwen3MoeForCausalLM's module names (lora_jax.models.moe.hf_names): Llama's,
    # the q/k norms, and the router ``mlp.gate``. The expert kernels are parameters, not
    # modules: lora_jax.peft.experts.EXPERT_MAPS["qwen3_moe"] names them.
    m = _llama_name_map()
    m[r"params/layers_(\d+)/self_attn/(q_norm|k_norm)/scale"] = r"model.layers.\1.self_attn.\2"
    return m


NAME_MAPS: dict[str, NameMap] = {"default": default_name_map, "gpt": _gpt_name_map(),
                                 "llama": _llama_name_map(), "qwen3_moe": _qwen3_moe_name_map()}
"""Built-in name maps by name (pass the name as ``name_map``); add entries for other models.

* ``"llama"`` (:class:`lora_jax.models.llama.Llama`): Hugging Face ``LlamaForCausalLM``
  names, ``layers_{i}/self_attn/q_proj`` -> ``model.layers.{i}.self_attn.q_proj``, and so
  on for every projection, norm, ``embed_tokens`` and ``lm_head``: PEFT adapters of Llama
  models (SmolLM2, Llama 2/3, ...) load and save with no hand-written map.
* ``"qwen3_moe"`` (:class:`lora_jax.models.moe.MoeModel`): ``"llama"``'s names, the
  ``q_norm``/``k_norm`` of attention and the router ``mlp.gate``; the stacked expert kernels
  are PEFT ``target_parameters`` (:mod:`lora_jax.peft.experts`).
* ``"gpt"`` (:class:`lora_jax.models.gpt.GPT`): ``embed`` -> ``transformer.wte``, ``pos``
  -> ``transformer.wpe.weight``, ``block_{i}/{ln1,q,k,v,o,ln2,up,down}`` (or the scanned
  ``layers/block/...``) -> ``transformer.h.{i}.{ln_1, attn.q_proj, attn.k_proj,
  attn.v_proj, attn.out_proj, ln_2, mlp.fc_in, mlp.fc_out}``, ``ln_f`` ->
  ``transformer.ln_f``, ``head`` -> ``lm_head`` (GPT-J's names; GPT-J itself computes
  differently, so no transformers class loads the merged weights as the same model).
"""


def few(names: Sequence[str], n: int = 5) -> str:
    """A handful of names and the count, for error messages about many modules."""
    names = sorted(names)
    head = ", ".join(repr(x) for x in names[:n])
    return f"[{head}{', ...' if len(names) > n else ''}] ({len(names)} in all)" if len(
        names) > n else f"[{head}]"


@dataclasses.dataclass(frozen=True)
class Part:
    """One module of a parameter, as a name map gives it."""

    template: str  # module name, possibly with {i}/{j}/{k}
    out: slice | None  # slice of the flattened output axis (fused kernels), None = all


def resolve(name_map: NameMap) -> Callable[[str], Any]:
    """Any :data:`NameMap` as a function of the Flax path (``None`` for an unmapped path)."""
    if name_map is None:
        return default_name_map
    if isinstance(name_map, str):
        if name_map not in NAME_MAPS:
            raise ValueError(f"unknown name_map {name_map!r}; NAME_MAPS has {sorted(NAME_MAPS)}")
        return resolve(NAME_MAPS[name_map])
    if isinstance(name_map, Mapping):
        return functools.partial(_dict_lookup, name_map)
    if callable(name_map):
        return name_map
    raise TypeError(f"name_map must be a callable, dict, NAME_MAPS key or None, got {name_map!r}")


def _dict_lookup(d: Mapping[str, Any], path: str) -> Any:
    if path in d:
        return d[path]
    for key, value in d.items():
        m = re.fullmatch(key, path)
        if m:
            if isinstance(value, str):
                return m.expand(value)
            return [(m.expand(n), s) for n, s in value]
    return None


def map_parts(fn: Callable[[str], Any], path: str) -> list[Part] | None:
    """The map's answer for ``path`` as a list of parts (None: not mapped)."""
    v = fn(path)
    if v is None:
        return None
    if isinstance(v, str):
        return [Part(v, None)]
    out = []
    for item in v:
        name, sl = item
        if isinstance(sl, tuple):
            sl = slice(*sl)
        if not isinstance(name, str) or not isinstance(sl, slice):
            raise TypeError(f"name_map entry for {path!r} must be a str or a list of (module name, "
                            f"slice) pairs, got {v!r}")
        out.append(Part(name, sl))
    if not out:
        raise ValueError(f"name_map gives an empty list of modules for {path!r}")
    return out


def stack_axes_of(parts: list[Part], path: str) -> int:
    """How many stack axes the module names of ``path`` index (``{i}``, ``{j}``, ``{k}``)."""
    counts = {sum(f"{{{c}}}" in p.template for c in PLACEHOLDERS) for p in parts}
    n = counts.pop()
    if counts or any(f"{{{c}}}" not in p.template for p in parts for c in PLACEHOLDERS[:n]):
        raise ValueError(f"module names for {path!r} must use the placeholders {{i}}, {{j}}, "
                         f"{{k}} in order, the same in every part: {[p.template for p in parts]}")
    return n
