"""Hugging Face PEFT's adapter format: adapters that move between PyTorch and JAX.

:func:`save` writes ``adapter_config.json`` and ``adapter_model.safetensors`` that
``peft.PeftModel.from_pretrained`` loads (``peft_type`` LORA or ADALORA); :func:`load` reads one
into a LoRA tree for the matching Flax model; :func:`save_merged` exports the merged weights as a
PyTorch-layout safetensors checkpoint. Only JSON and safetensors are read or written (no pickle).

Layouts (PEFT ``tuners/lora/layer.py``, ``tuners/adalora/layer.py``): a Flax kernel is
``(*in, *out)``, the transpose of a ``torch.nn.Linear`` weight ``(out, in)``, with multi-axis
kernels flattened row-major into the ``(in, out)`` matrix that the torch ``Linear`` sees. So

* LoRA ``lora_A.weight (r, in) = a.T`` and ``lora_B.weight (out, r) = b.T``;
* Conv kernels ``(*spatial, cin, cout)``: ``lora_A.weight (r, cin, *spatial)``, ``lora_B.weight
  (cout, r, 1, ...)`` (PEFT's ConvNd LoRA: a conv, then a 1x1 conv);
* Embeddings ``(vocab, d)``: ``lora_embedding_A (r, vocab) = a.T``, ``lora_embedding_B (d, r) =
  b.T``;
* AdaLoRA: ``lora_A (r, in) = P.T``, ``lora_B (out, r) = Q.T``, ``lora_E (r, 1)``.

Module names come from a *name map* from Flax parameter paths ("params/fc1/kernel") to torch
module names ("fc1"): a callable, a dict (exact path or ``re.fullmatch`` regex -> replacement,
expanded with the match's groups), the name of an entry of :data:`NAME_MAPS`, or ``None`` for
:func:`default_name_map`. A name may hold ``{i}`` (and ``{j}``, ``{k}``) for the stacked axes of
``nn.scan`` parameters, one module per layer. An entry may map one fused Flax kernel to a list of
``(module name, slice of the flattened output axis)``: PEFT modules that share ``lora_A``, each
with its slice of ``lora_B`` (a fused qkv kernel saved as ``q_proj``, ``k_proj``, ``v_proj``).

>>> import tempfile, jax, jax.numpy as jnp, lora_jax
>>> from lora_jax import peft
>>> params = {"params": {"fc1": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}}
>>> lora = lora_jax.init(params, r=2, alpha=4, key=jax.random.key(0))
>>> d = tempfile.mkdtemp()
>>> cfg = peft.save(d, lora)
>>> cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["target_modules"]
('LORA', 2, 4, ['fc1'])
>>> back = peft.load(d, params)
>>> bool(jnp.array_equal(back["params"]["fc1"]["kernel"].a, lora["params"]["fc1"]["kernel"].a))
True
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import numpy as st

from lora_jax import adalora as AL
from lora_jax import layouts as Lay
from lora_jax import lora as L
from lora_jax import protocols
from lora_jax import paths as P
from lora_jax import validation as V

PyTree = Any
NameMap = Callable[[str], Any] | Mapping[str, Any] | str | None

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel's prefix of every adapter tensor key
_LEAF_TO_TORCH = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
_PLACEHOLDERS = ("i", "j", "k")
_ADALORA_DEFAULTS = dict(tinit=0, tfinal=0, deltaT=1, beta1=0.85, beta2=0.85, orth_reg_weight=0.5,
                         total_step=1)  # PEFT refuses total_step=None; override via extra_config
# PEFT options whose adapters a plain LoRA/AdaLoRA forward would not reproduce.
_UNSUPPORTED = ("use_dora", "lora_bias", "use_qalora", "use_bdlora", "velora_config",
                "alora_invocation_tokens", "monteclora_config", "arrow_config", "kasa_config",
                "modules_to_save", "trainable_token_indices", "layer_replication",
                "target_parameters", "megatron_config")
_SAVE_PROTECTED = ("peft_type", "r", "lora_alpha", "target_modules", "rank_pattern",
                   "alpha_pattern", "use_rslora", "init_r", "target_r")


# ----------------------------------------------------------------------------------------
# Name maps


def default_name_map(path: str) -> str:
    """Drops a leading ``params/`` and a trailing leaf name, joins the rest with dots.

    >>> default_name_map("params/encoder/fc1/kernel"), default_name_map("params/pos")
    ('encoder.fc1', 'pos')
    """
    parts = path.split("/")
    if len(parts) > 1 and parts[0] == "params":
        parts = parts[1:]
    if len(parts) > 1 and parts[-1] in _LEAF_TO_TORCH:
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


#: Built-in name maps by name (pass the name as ``name_map``); add entries for other models.
#:
#: * ``"llama"`` (:class:`lora_jax.models.llama.Llama`): Hugging Face ``LlamaForCausalLM``
#:   names, ``layers_{i}/self_attn/q_proj`` -> ``model.layers.{i}.self_attn.q_proj``, and so
#:   on for every projection, norm, ``embed_tokens`` and ``lm_head``: PEFT adapters of Llama
#:   models (SmolLM2, Llama 2/3, ...) load and save with no hand-written map.
#: * ``"gpt"`` (:class:`lora_jax.models.gpt.GPT`): ``embed`` -> ``transformer.wte``, ``pos``
#:   -> ``transformer.wpe.weight``, ``block_{i}/{ln1,q,k,v,o,ln2,up,down}`` (or the scanned
#:   ``layers/block/...``) -> ``transformer.h.{i}.{ln_1, attn.q_proj, attn.k_proj,
#:   attn.v_proj, attn.out_proj, ln_2, mlp.fc_in, mlp.fc_out}``, ``ln_f`` ->
#:   ``transformer.ln_f``, ``head`` -> ``lm_head`` (GPT-J's names; GPT-J itself computes
#:   differently, so no transformers class loads the merged weights as the same model).
NAME_MAPS: dict[str, NameMap] = {"default": default_name_map, "gpt": _gpt_name_map(),
                                 "llama": _llama_name_map()}


def _few(names: Sequence[str], n: int = 5) -> str:
    """A handful of names and the count, for error messages about many modules."""
    names = sorted(names)
    head = ", ".join(repr(x) for x in names[:n])
    return f"[{head}{', ...' if len(names) > n else ''}] ({len(names)} in all)" if len(
        names) > n else f"[{head}]"


def _suggest_map(modules: Sequence[str], params: PyTree, current: NameMap) -> str:
    """A built-in name map under which ``params`` has all of ``modules``, as a hint."""
    for name, m in NAME_MAPS.items():
        if m is current or name == current:
            continue
        try:
            known = {mod for t in _targets(params, name).values() for _, mod, _ in t.modules}
        except (ValueError, TypeError, NotImplementedError):
            continue
        if set(modules) <= known:
            return f"; these are the names of name_map={name!r}: pass it"
    return ""


@dataclasses.dataclass(frozen=True)
class _Part:
    template: str  # module name, possibly with {i}/{j}/{k}
    out: slice | None  # slice of the flattened output axis (fused kernels), None = all


def _resolve(name_map: NameMap) -> Callable[[str], Any]:
    if name_map is None:
        return default_name_map
    if isinstance(name_map, str):
        if name_map not in NAME_MAPS:
            raise ValueError(f"unknown name_map {name_map!r}; NAME_MAPS has {sorted(NAME_MAPS)}")
        return _resolve(NAME_MAPS[name_map])
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


def _parts(fn: Callable[[str], Any], path: str) -> list[_Part] | None:
    """The map's answer for ``path`` as a list of parts (None: not mapped)."""
    v = fn(path)
    if v is None:
        return None
    if isinstance(v, str):
        return [_Part(v, None)]
    out = []
    for item in v:
        name, sl = item
        if isinstance(sl, tuple):
            sl = slice(*sl)
        if not isinstance(name, str) or not isinstance(sl, slice):
            raise TypeError(f"name_map entry for {path!r} must be a str or a list of (module name, "
                            f"slice) pairs, got {v!r}")
        out.append(_Part(name, sl))
    if not out:
        raise ValueError(f"name_map gives an empty list of modules for {path!r}")
    return out


def _stack_axes_of(parts: list[_Part], path: str) -> int:
    counts = {sum(f"{{{c}}}" in p.template for c in _PLACEHOLDERS) for p in parts}
    n = counts.pop()
    if counts or any(f"{{{c}}}" not in p.template for p in parts for c in _PLACEHOLDERS[:n]):
        raise ValueError(f"module names for {path!r} must use the placeholders {{i}}, {{j}}, "
                         f"{{k}} in order, the same in every part: {[p.template for p in parts]}")
    return n


def _tile(parts: list[_Part], out_size: int, path: str) -> list[tuple[str, slice | None]]:
    """Validates fused slices (they must tile the output axis); sorted by start."""
    if len(parts) == 1 and parts[0].out is None:
        return [(parts[0].template, None)]
    res = []
    for p in parts:
        if p.out is None:
            raise ValueError(f"fused name_map entry for {path!r}: every part needs a slice")
        start, stop, step = p.out.indices(out_size)
        if step != 1 or stop <= start:
            raise ValueError(f"fused name_map entry for {path!r}: bad slice {p.out} of {out_size}")
        res.append((p.template, slice(start, stop)))
    res.sort(key=lambda t: t[1].start)
    edges = [0] + [s.stop for _, s in res]
    if any(s.start != e for (_, s), e in zip(res, edges)) or edges[-1] != out_size:
        raise ValueError(f"fused name_map entry for {path!r}: slices {[s for _, s in res]} do "
                         f"not tile the flattened output axis of size {out_size}")
    return res


def _kind(path: str, core_ndim: int, in_axes: int) -> str:
    parts = path.split("/")
    if parts[-1] == "embedding":
        return "embedding"
    module = parts[-2].lower() if len(parts) > 1 else ""
    if "conv" in module and "transpose" in module:
        return "conv_transpose"  # neither PEFT nor this module handles these
    if "conv" in module and core_ndim >= 3 and in_axes == core_ndim - 1:
        return "conv"
    return "linear"


@dataclasses.dataclass(frozen=True)
class _Target:
    """One adaptable Flax parameter and the torch modules it becomes."""

    path: str
    kind: str
    in_axes: int
    stack_shape: tuple[int, ...]
    core: tuple[int, ...]  # kernel shape without stack axes
    modules: tuple[tuple[tuple[int, ...], str, slice | None], ...]  # (stack index, name, slice)

    @property
    def n_in(self) -> int:
        return math.prod(self.core[: self.in_axes])

    @property
    def n_out(self) -> int:
        return math.prod(self.core[self.in_axes:])


def _target(path, shape, in_axes, parts, stack_axes=None) -> _Target:
    sa = _stack_axes_of(parts, path)
    if stack_axes is not None and stack_axes != sa:
        raise ValueError(f"{path!r} has {stack_axes} stack axes but its module name "
                         f"{parts[0].template!r} has {sa} placeholders ({{i}}, {{j}}, {{k}})")
    stack, core = tuple(shape[:sa]), tuple(shape[sa:])
    if in_axes is None:
        in_axes = P.default_in_axes(path, shape, sa)
    kind = _kind(path, len(core), in_axes)
    n_out = math.prod(core[in_axes:])
    tiles = _tile(parts, n_out, path)
    if kind != "linear" and tiles[0][1] is not None:
        raise NotImplementedError(f"{path!r}: fused (sliced) name_map entries are supported for "
                                  f"Linear kernels only, not {kind}")
    mods = []
    for idx in np.ndindex(*stack):
        fmt = dict(zip(_PLACEHOLDERS, idx))
        mods += [(tuple(idx), t.format(**fmt), s) for t, s in tiles]
    return _Target(path, kind, in_axes, stack, core, tuple(mods))


def _supported(t: _Target) -> _Target:
    if t.kind == "conv_transpose":
        raise NotImplementedError(f"{t.path!r}: transposed convolutions are not supported (PEFT "
                                  "has no LoRA layer for them)")
    return t


def module_names(params: PyTree, *, name_map: NameMap = None) -> dict[str, list[str]]:
    """``{Flax kernel path: [torch module names]}`` of every adaptable parameter, to check a map.

    >>> import jax.numpy as jnp
    >>> module_names({"params": {"fc1": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}})
    {'params/fc1/kernel': ['fc1']}
    """
    return {t.path: [m[1] for m in t.modules] for t in _targets(params, name_map).values()}


def _targets(params, name_map, in_axes=None, stack_axes=None) -> dict[str, _Target]:
    fn = _resolve(name_map)
    out = {}
    for path, x in P.flatten(params):
        shape = tuple(getattr(x, "shape", ()))
        if path.rsplit("/", 1)[-1] not in ("kernel", "embedding") or len(shape) < 2:
            continue
        parts = _parts(fn, path)
        if parts is None:
            continue
        sa = P.setting_for(stack_axes, path, None, None)
        out[path] = _target(path, shape, P.setting_for(in_axes, path, None, None), parts, sa)
    return out


# ----------------------------------------------------------------------------------------
# PEFT's config semantics


def _pattern_key(pattern_keys: Sequence[str], name: str) -> str:
    """PEFT ``utils.other.get_pattern_key``: the first key matching the end of ``name``."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name


def _is_targeted(cfg: Mapping[str, Any], name: str) -> bool:
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


def _check_config(cfg: Mapping[str, Any], where: str) -> str:
    kind = cfg.get("peft_type")
    if kind not in ("LORA", "ADALORA"):
        raise ValueError(f"{where}: unsupported peft_type {kind!r}; lora_jax.peft reads and "
                         "writes LORA and ADALORA adapters")
    bad = [k for k in _UNSUPPORTED if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        bad.append(f"bias={cfg['bias']!r}")
    if str(cfg.get("init_lora_weights", True)).lower().startswith("mica"):
        bad.append("init_lora_weights='mica'")
    if bad:
        raise ValueError(f"{where}: unsupported PEFT options {bad}: lora_jax.peft handles plain "
                         "LoRA/AdaLoRA adapters (no DoRA, LoRA bias, trained biases, "
                         "modules_to_save, or other LoRA variants)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.split("_")[0] in ("pissa", "olora", "corda", "loftq", "eva"):
        warnings.warn(f"{where}: init_lora_weights={init!r}: the adapter is only correct on the "
                      "base weights it was trained with (e.g. PiSSA's residual base)", stacklevel=3)
    return kind


# ----------------------------------------------------------------------------------------
# save


def _num(x: float) -> float | int:
    x = float(x)
    return int(x) if x.is_integer() else x


def _most_common(values: Sequence[Any]) -> Any:
    return collections.Counter(values).most_common(1)[0][0]  # ties: the first seen


def _patterns(values: Mapping[str, Any], default: Any) -> dict[str, Any]:
    """``rank_pattern``/``alpha_pattern`` that PEFT resolves back to ``values`` exactly.

    Keys are full module names, longest first, so that a shorter name ("fc2") cannot claim a
    longer one ("block.fc2") that PEFT's suffix match would also accept; a module that still
    resolves wrongly gets its own entry.
    """
    pat = {n: v for n, v in values.items() if v != default}
    for _ in range(len(values) + 1):
        ordered = dict(sorted(pat.items(), key=lambda kv: -len(kv[0])))
        wrong = [n for n, v in values.items()
                 if ordered.get(_pattern_key(list(ordered), n), default) != v]
        if not wrong:
            return ordered
        pat.update({n: values[n] for n in wrong})
    raise ValueError(f"cannot express per-module values {dict(values)} as a PEFT pattern")


def _module_tensors(t: _Target, leaf: L.LowRankLeaf, idx, sl, dtype) -> dict[str, np.ndarray]:
    """PEFT's tensors for one module: the leaf's matrices at ``idx``, shaped for the kind of
    layer (``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)`` for a Linear; conv and embedding
    variants), ``lora_B`` sliced to the module's part of a fused kernel."""
    cast = lambda x: np.ascontiguousarray(np.asarray(x, dtype or x.dtype))  # noqa: E731
    m = leaf.peft_matrices(idx)
    a, b = m.pop("lora_A"), m.pop("lora_B")  # (r, n_in), (n_out, r)
    if m and t.kind != "linear":
        raise NotImplementedError(f"{t.path!r}: PEFT's {leaf.peft_type} adapts Linear layers only")
    if t.kind == "conv":  # (r, cin, *spatial) from the kernel's (*spatial, cin) input axes
        spatial = t.core[: t.in_axes - 1]
        r = a.shape[0]
        ta = a.reshape((r,) + spatial + (t.core[t.in_axes - 1],))
        ta = ta.transpose((0, len(spatial) + 1) + tuple(range(1, len(spatial) + 1)))
        return {"lora_A.weight": cast(ta),
                "lora_B.weight": cast(b.reshape(b.shape + (1,) * len(spatial)))}
    b = b if sl is None else b[sl]
    if t.kind == "embedding":
        return {"lora_embedding_A": cast(a), "lora_embedding_B": cast(b)}
    if leaf.peft_type == "ADALORA":  # PEFT's AdaLoRA names its parameters without ".weight"
        return {"lora_A": cast(a), "lora_B": cast(b), **{k: cast(v) for k, v in m.items()}}
    return {"lora_A.weight": cast(a), "lora_B.weight": cast(b),
            **{k: cast(v) for k, v in m.items()}}


def save(
    directory: str | os.PathLike,
    lora: PyTree,
    *,
    name_map: NameMap = None,
    dtype=None,
    extra_config: Mapping[str, Any] | None = None,
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
      name_map: Flax path -> torch module name (see the module docstring).
      dtype: dtype of the saved tensors; default: the factors' own dtype.
      extra_config: more ``adapter_config.json`` fields (``task_type``,
        ``base_model_name_or_path``, AdaLoRA's ``total_step``/``tinit``/``tfinal``, ...);
        fields that the tree determines (``r``, ``lora_alpha``, ``target_modules``, ...) may not
        be set here.

    Returns:
      The config written.

    Raises:
      ValueError: a path the map does not name, two paths with one module name, per-module
        ``rslora`` values that differ (PEFT has one ``use_rslora``), AdaLoRA modules with
        different ``init_r``/alpha/``target_r`` (PEFT has one of each), or a protected field in
        ``extra_config``. NotImplementedError: an AdaLoRA conv/embedding, a fused conv.
    """
    lmap = L.leaves(lora)
    if not lmap:
        raise ValueError("save: the LoRA tree has no adapter leaves")
    kinds = {x.peft_type for x in lmap.values()}
    if kinds not in ({"LORA"}, {"ADALORA"}):
        raise TypeError(f"save: expected only LoRA or only AdaLoRA leaves, got "
                        f"{sorted({type(x).__name__ for x in lmap.values()})}")
    ada = kinds == {"ADALORA"}
    fn = _resolve(name_map)
    tensors: dict[str, np.ndarray] = {}
    ranks, alphas, rslora, dropout = {}, {}, {}, {}
    for path, leaf in lmap.items():
        parts = _parts(fn, path)
        if parts is None:
            raise ValueError(f"save: name_map gives no PyTorch module name for {path!r}")
        if leaf.layout != Lay.canonical(len(leaf.layout), leaf.in_axes, leaf.stack_axes):
            raise ValueError(
                f"save: {path!r} has a kernel laid out as roles {leaf.roles!r}; PEFT's format "
                "stores (out, in) matrices of kernels laid out as (*stack, *in, *out), and "
                "this kernel's PyTorch counterpart is unknown")
        t = _supported(_target(path, leaf.kernel_shape, leaf.in_axes, parts, leaf.stack_axes))
        for idx, name, sl in t.modules:
            if name in ranks:
                raise ValueError(f"save: {path!r} and another path both map to module {name!r}")
            for k, v in _module_tensors(t, leaf, idx, sl, dtype).items():
                tensors[f"{PREFIX}{name}.{k}"] = v
            hp = leaf.hparams()
            ranks[name], alphas[name] = leaf.r, float(hp["alpha"])
            rslora[name], dropout[name] = hp.get("rslora", False), leaf.dropout
    if len(set(dropout.values())) > 1:
        warnings.warn(f"save: PEFT has one lora_dropout; the modules have {set(dropout.values())},"
                      " writing the most common", stacklevel=2)
    names = sorted(ranks)
    cfg: dict[str, Any] = dict(
        task_type=None, base_model_name_or_path=None, inference_mode=True,
        target_modules=names, lora_dropout=_most_common(list(dropout.values())), bias="none",
        fan_in_fan_out=False, init_lora_weights=True, use_dora=False, modules_to_save=None,
        layers_to_transform=None, layers_pattern=None,
    )
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
    else:
        if len(set(rslora.values())) > 1:
            on = sorted(n for n, v in rslora.items() if v)
            raise ValueError(f"save: PEFT has one use_rslora for all modules, but only {on} use "
                             "rsLoRA; use the same rslora everywhere")
        r, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
        cfg.update(peft_type="LORA", r=r, lora_alpha=_num(alpha),
                   rank_pattern=_patterns(ranks, r),
                   alpha_pattern={k: _num(v) for k, v in _patterns(alphas, alpha).items()},
                   use_rslora=bool(_most_common(list(rslora.values()))))
    for k, v in (extra_config or {}).items():
        if k in _SAVE_PROTECTED:
            raise ValueError(f"save: extra_config may not set {k!r}; the LoRA tree determines it")
        cfg[k] = v
    _check_config(cfg, "save")
    os.makedirs(directory, exist_ok=True)
    st.save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    return cfg


# ----------------------------------------------------------------------------------------
# load


_ROLES = {"LORA": {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "A",
                   "lora_embedding_B": "B"},
          "ADALORA": {"lora_A": "A", "lora_B": "B", "lora_E": "E"}}


def _split_keys(tensors, kind) -> dict[str, dict[str, tuple[str, np.ndarray]]]:
    roles = _ROLES[kind]
    out: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    for key, v in tensors.items():
        suffix = next((s for s in roles if key.endswith("." + s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise ValueError(f"load: unsupported tensor {key!r} in a {kind} adapter; expected "
                             f"'{PREFIX}<module>.<{'|'.join(roles)}>'")
        out.setdefault(key[len(PREFIX): -len(suffix) - 1], {})[roles[suffix]] = (key, v)
    for name, d in out.items():
        need = {"A", "B"} | ({"E"} if kind == "ADALORA" else set())
        if set(d) != need:
            raise ValueError(f"load: module {name!r} has tensors {sorted(k for k, _ in d.values())}"
                             f", missing {sorted(need - set(d))}")
    return out


def _check_shape(key: str, x: np.ndarray, expected: tuple[int, ...]) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"load: tensor {key!r} has shape {tuple(x.shape)}, expected "
                         f"{tuple(expected)}")


def _lora_module(t: _Target, d, n_out: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(a (*in, r) or (n_in, r), b (r, n_out)) of one LoRA module, shapes checked."""
    (ka, A), (kb, B) = d["A"], d["B"]
    if t.kind == "conv":
        spatial, cin, cout = t.core[:-2], t.core[-2], t.core[-1]
        _check_shape(ka, A, (r, cin) + spatial)
        _check_shape(kb, B, (cout, r) + (1,) * len(spatial))
        nd = A.ndim
        return A.transpose(tuple(range(2, nd)) + (1, 0)), B.reshape(cout, r).T
    _check_shape(ka, A, (r, t.n_in))
    _check_shape(kb, B, (n_out, r))
    return A.T, B.T


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
      name_map: Flax path -> torch module name, as in :func:`save`.
      dtype: dtype of the factors.
      in_axes, stack_axes: as in :func:`lora_jax.init` (defaults: Flax conventions; stack axes
        from the ``{i}`` placeholders of the module names).

    Returns:
      A LoRA tree of :class:`lora_jax.LoraWeight` (or :class:`lora_jax.adalora.AdaLoraWeight`).

    Raises:
      ValueError: unsupported ``peft_type`` or options (DoRA, LoRA bias, modules_to_save, ...),
        an unknown module (the message lists the known ones), a tensor of the wrong shape
        (named, with expected and actual shapes), a rank that disagrees with the config, a
        targeted module without tensors. NotImplementedError: ranks or alphas that differ
        across the layers of one stacked kernel, AdaLoRA fused modules with different factors.
    """
    V.params_tree(params, "peft.load")
    in_axes = V.axes_arg(in_axes, "peft.load: in_axes", low=1)
    stack_axes = V.axes_arg(stack_axes, "peft.load: stack_axes", low=0)
    cfg = _read_config(directory)
    kind = _check_config(cfg, f"load {os.fspath(directory)!r}")
    _check_values(cfg, kind, f"load: {os.path.join(os.fspath(directory), CONFIG_NAME)}")
    ada = kind == "ADALORA"
    mods = _split_keys(_read_tensors(directory), kind)
    if not mods:
        raise ValueError(f"load: {WEIGHTS_NAME} in {os.fspath(directory)!r} has no adapter tensors")
    targets = _targets(params, name_map, in_axes, stack_axes)
    where = {m[1]: (t, m) for t in targets.values() for m in t.modules}
    if len(where) != sum(len(t.modules) for t in targets.values()):
        dup = collections.Counter(m[1] for t in targets.values() for m in t.modules)
        raise ValueError(f"load: several parameters map to the modules "
                         f"{_few([n for n, c in dup.items() if c > 1])}")
    unknown = sorted(set(mods) - set(where))
    if unknown:
        raise ValueError(f"load: the adapter has {len(unknown)} module(s) that the Flax "
                         f"parameters do not have under this name_map, e.g. {_few(unknown)}; "
                         f"the parameters' modules are e.g. {_few(list(where))}"
                         + _suggest_map(unknown, params, name_map))
    untargeted = sorted(n for n in mods if not _is_targeted(cfg, n))
    if untargeted:
        raise ValueError(f"load: tensors for {_few(untargeted)}, which the config's "
                         f"target_modules {cfg.get('target_modules')!r} do not select (PEFT "
                         "would ignore them)")
    if cfg.get("target_modules") != "all-linear":  # PEFT resolves that one against the torch model
        lacking = sorted(n for n in where if n not in mods and _is_targeted(cfg, n))
        if lacking:
            raise ValueError(f"load: target_modules selects {_few(lacking)} but the adapter has "
                             "no tensors for them")
    if ada:
        if cfg.get("alpha_pattern") or cfg.get("use_rslora"):
            warnings.warn("load: PEFT's AdaLoRA ignores alpha_pattern and use_rslora; so does "
                          "this load", stacklevel=2)
        masks = _adalora_masks(cfg.get("rank_pattern"), int(cfg.get("init_r", 12)))
    dropout = float(cfg.get("lora_dropout") or 0.0)
    out = {}
    for path, t in targets.items():
        present = [m for m in t.modules if m[1] in mods]
        if not present:
            continue
        _supported(t)
        per_index: dict[tuple[int, ...], list] = collections.defaultdict(list)
        for idx, name, sl in t.modules:
            per_index[idx].append((name, sl))
        if ada:
            out[path] = _load_adalora(t, per_index, mods, masks, cfg, dtype, dropout)
        else:
            out[path] = _load_lora(t, per_index, mods, cfg, dtype, dropout)
    tree = L.from_leaves(out)
    L.check_fits(params, tree, where="peft.load")
    return tree


def _read_config(directory) -> dict:
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


def _check_values(cfg: Mapping[str, Any], kind: str, where: str) -> None:
    """Types and ranges of the config fields ``load`` reads, each error naming the field."""
    def integer(key, low):
        if cfg.get(key) is not None:
            V.integer(cfg[key], f"{where}: {key}", low=low)

    def num(key, value, what):
        v = V.number(value, f"{where}: {what}")
        if kind == "ADALORA" and v == 0:
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
            if kind == "ADALORA" and key == "rank_pattern":
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
    for i, x in enumerate([lp] if isinstance(lp, str) else lp or []):
        V.regex(x, f"{where}: layers_pattern")


def _load_lora(t: _Target, per_index, mods, cfg, dtype, dropout) -> L.LoraWeight:
    rslora = bool(cfg.get("use_rslora"))
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    got = {}  # stack index -> ((a, b), (alpha, rslora))
    for idx, parts in per_index.items():
        blocks = []  # (slice, a (n_in.., r), b (r, n_out), alpha) of the modules present
        for name, sl in parts:
            if name not in mods:
                continue
            r = rp.get(_pattern_key(list(rp), name), cfg.get("r", 8))  # PEFT's defaults: 8, 8
            alpha = float(ap.get(_pattern_key(list(ap), name), cfg.get("lora_alpha", 8)))
            key_a, a_t = mods[name]["A"]
            if ("lora_embedding_A" in key_a) != (t.kind == "embedding"):
                raise ValueError(f"load: tensor {key_a!r} does not fit {t.path!r}, which is "
                                 f"{'an' if t.kind == 'embedding' else 'a'} {t.kind} parameter")
            if a_t.shape[0] != r:
                raise ValueError(f"load: tensor {key_a!r} has rank {a_t.shape[0]} but the config "
                                 f"(r, rank_pattern) gives r={r} for module {name!r}")
            n_out = t.n_out if sl is None else sl.stop - sl.start
            blocks.append((sl, *_lora_module(t, mods[name], n_out, r), alpha))
        if blocks:
            got[idx] = _fuse(t, blocks, rslora)
    return _stack_leaf(t, got, lambda a, b, alpha, rs: L.LoraWeight(
        a=jnp.asarray(a, dtype), b=jnp.asarray(b, dtype), alpha=alpha, rslora=rs,
        in_axes=t.in_axes, stack_axes=len(t.stack_shape), dropout=dropout))


def _fuse(t: _Target, blocks, rslora):
    """((a, b), (alpha, rslora)) for one kernel from its modules: shared A, or stacked ranks."""
    in_dims, out_dims = t.core[: t.in_axes], t.core[t.in_axes:]
    sl0, a0, b0, alpha0 = blocks[0]
    if sl0 is None:  # one module for the whole kernel
        return (a0.reshape(in_dims + (-1,)), b0.reshape((-1,) + out_dims)), (alpha0, rslora)
    if all(np.array_equal(a, a0) and alpha == alpha0 for _, a, _, alpha in blocks):
        b = np.zeros((a0.shape[-1], t.n_out), b0.dtype)  # absent modules stay zero
        for sl, _, bb, _ in blocks:
            b[:, sl] = bb
        return (a0.reshape(in_dims + (-1,)), b.reshape((-1,) + out_dims)), (alpha0, rslora)
    # Different A per module: stack the ranks, each module's scale folded into its block of b.
    a = np.concatenate([a for _, a, _, _ in blocks], axis=-1)
    b = np.zeros((a.shape[-1], t.n_out), np.float64)
    row = 0
    for sl, aa, bb, alpha in blocks:
        r = aa.shape[-1]
        b[row: row + r, sl] = bb * (alpha / math.sqrt(r) if rslora else alpha / r)
        row += r
    rank = a.shape[-1]
    return (a.reshape(in_dims + (rank,)), b.reshape((rank,) + out_dims)), (float(rank), False)


def _stack_leaf(t: _Target, got: dict, make):
    """One leaf from ``{stack index: (arrays, meta)}``; absent layers get zero arrays."""
    if not t.stack_shape:
        arrays, meta = got[()]
        return make(*arrays, *meta)
    metas = {(arrs[0].shape[-1],) + tuple(meta) for arrs, meta in got.values()}
    if len(metas) > 1:
        raise NotImplementedError(f"load: the layers of stacked kernel {t.path!r} have different "
                                  f"(rank, alpha, ...) {sorted(metas, key=str)}; one adapter leaf "
                                  "holds one of each")
    ref, meta = next(iter(got.values()))
    stacked = [np.stack([got[idx][0][j] if idx in got else np.zeros_like(ref[j])
                         for idx in np.ndindex(*t.stack_shape)]
                        ).reshape(t.stack_shape + ref[j].shape) for j in range(len(ref))]
    return make(*stacked, *meta)


def _adalora_masks(rank_pattern, init_r) -> dict[str, np.ndarray]:
    masks = {}
    for key, m in (rank_pattern or {}).items():
        name = key.split(".lora_E")[0]
        m = np.asarray(m, bool).reshape(-1)
        if m.shape[0] != init_r:
            raise ValueError(f"load: AdaLoRA rank_pattern[{key!r}] has {m.shape[0]} entries, "
                             f"expected init_r={init_r}")
        masks[name] = m
    return masks


def _load_adalora(t: _Target, per_index, mods, masks, cfg, dtype, dropout) -> AL.AdaLoraWeight:
    init_r = int(cfg.get("init_r", 12))  # PEFT's default
    alpha = float(cfg.get("lora_alpha", 8) or 0) or float(init_r)  # PEFT: r when lora_alpha == 0
    if t.kind != "linear":
        raise NotImplementedError(f"load: {t.path!r}: PEFT's AdaLoRA adapts Linear layers only")
    got = {}
    for idx, parts in per_index.items():
        ps, es, qs = [], [], []
        for name, sl in parts:
            if name not in mods:
                continue
            n_out = t.n_out if sl is None else sl.stop - sl.start
            keep = masks.get(name, np.ones(init_r, bool))
            k = int(keep.sum())
            (ka, A), (kb, B), (ke, E) = mods[name]["A"], mods[name]["B"], mods[name]["E"]
            _check_shape(ka, A, (k, t.n_in))
            _check_shape(kb, B, (n_out, k))
            _check_shape(ke, E, (k, 1))
            p, e, q = (np.zeros((t.n_in, init_r), A.dtype), np.zeros(init_r, E.dtype),
                       np.zeros((init_r, n_out), B.dtype))
            p[:, keep], e[keep], q[keep] = A.T, E[:, 0], B.T
            ps.append(p), es.append(e), qs.append((sl, q))
        if not ps:
            continue
        if any(not np.array_equal(p, ps[0]) or not np.array_equal(e, es[0])
               for p, e in zip(ps, es)):
            raise NotImplementedError(f"load: the AdaLoRA modules of fused kernel {t.path!r} "
                                      "have different lora_A/lora_E")
        q = np.zeros((init_r, t.n_out), qs[0][1].dtype)
        for sl, qq in qs:
            q[:, slice(None) if sl is None else sl] = qq
        got[idx] = ((ps[0].reshape(t.core[: t.in_axes] + (init_r,)), es[0],
                     q.reshape((init_r,) + t.core[t.in_axes:])), (alpha,))
    return _stack_leaf(t, got, lambda p, e, q, alpha: AL.AdaLoraWeight(
        p=jnp.asarray(p, dtype), e=jnp.asarray(e, dtype), q=jnp.asarray(q, dtype), alpha=alpha,
        target_r=int(cfg.get("target_r", 0)), in_axes=t.in_axes,
        stack_axes=len(t.stack_shape), dropout=dropout))


# ----------------------------------------------------------------------------------------
# Merged export


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
      name_map: as in :func:`save`.
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
    merged = L.merge(params, lora) if lora is not None else P.map_with_path(
        lambda _, x: protocols.dense(x), params)
    lmap = L.leaves(lora) if lora is not None else {}
    fn = _resolve(name_map)
    out: dict[str, np.ndarray] = {}
    for p, x in P.flatten(merged):
        parts = _parts(fn, p)
        if parts is None:
            if strict:
                raise ValueError(f"save_merged: name_map gives no name for {p!r}")
            continue
        leaf_name = p.rsplit("/", 1)[-1]
        x = np.asarray(x, dtype or x.dtype)
        sa = _stack_axes_of(parts, p)
        ia = lmap[p].in_axes if p in lmap else P.setting_for(in_axes, p, None, None)
        if leaf_name in ("kernel", "embedding") and x.ndim - sa >= 2:
            t = _supported(_target(p, x.shape, ia, parts, sa))
            for idx, name, sl in t.modules:
                w = x[idx]
                if t.kind == "conv":
                    w = w.transpose((w.ndim - 1, w.ndim - 2) + tuple(range(w.ndim - 2)))
                elif t.kind == "linear":
                    w = w.reshape(t.n_in, t.n_out).T
                    w = w if sl is None else w[sl]
                _put(out, f"{name}.weight", w)
            continue
        fused = len(parts) > 1 or parts[0].out is not None
        if fused and leaf_name != "bias":
            raise NotImplementedError(f"save_merged: fused entry for {p!r}: only kernels and "
                                      "biases can be split")
        for idx in np.ndindex(*x.shape[:sa]):
            fmt = dict(zip(_PLACEHOLDERS, idx))
            w = x[idx]
            tiles = _tile(parts, w.size, p) if fused else [(parts[0].template, None)]
            for tmpl, sl in tiles:
                name = tmpl.format(**fmt)
                if leaf_name in _LEAF_TO_TORCH:
                    name = f"{name}.{_LEAF_TO_TORCH[leaf_name]}"
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
