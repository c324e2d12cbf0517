"""A Qwen3-MoE-style mixture of experts in Flax Linen, with a Hugging Face loader.

Follows transformers' ``Qwen3MoeForCausalLM`` (``modeling_qwen3_moe.py``): pre-norm blocks of
RMSNorm, grouped-query attention whose queries and keys get a per-head RMSNorm (``q_norm``,
``k_norm``) before the rotary embedding, and a sparse MLP: a router (``mlp/gate``, no bias)
whose softmax picks ``top_k`` experts per token (their probabilities renormalized to sum to 1
when ``norm_topk_prob``), each expert a SwiGLU MLP. Layers listed in ``mlp_only_layers`` or off
the ``decoder_sparse_step`` grid have a dense SwiGLU MLP of width ``ffn`` instead.

The experts of a layer are two stacked kernels, ``mlp/experts/gate_up_proj/kernel`` of shape
``(E, d, 2·expert_ffn)`` (the gate's columns first, then the up projection's, as Hugging Face
fuses them) and ``mlp/experts/down_proj/kernel`` ``(E, expert_ffn, d)``: each expert's slice is
a Flax ``(in, out)`` kernel, the transpose of Hugging Face's per-expert ``(out, in)`` weight.
Tokens are sorted by expert and multiplied with ``jax.lax.ragged_dot`` (one matmul per
expert's run of rows), then put back in order and summed with their gate weights.

Adapting or quantizing the expert kernels needs their stack axis: pass
``stack_axes=EXPERT_STACK_AXES`` to :func:`lora_jax.init` / :func:`lora_jax.quantize` (an
expert kernel's leading axis is the expert, not an input axis; :func:`from_safetensors`
passes it for ``quantize=``).

>>> import jax, jax.numpy as jnp
>>> cfg = MoeConfig(vocab=64, d=32, layers=2, heads=4, kv_heads=2, experts=4, top_k=2,
...                 expert_ffn=16)
>>> model = MoeModel(cfg)
>>> tokens = jnp.ones((2, 8), jnp.int32)
>>> variables = model.init(jax.random.key(0), tokens)
>>> variables["params"]["layers_0"]["mlp"]["experts"]["gate_up_proj"]["kernel"].shape
(4, 32, 32)
>>> model.apply(variables, tokens).shape
(2, 8, 64)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models import streaming
from lora_jax.models.llama import rope
from lora_jax.models.tensor_files import TensorFiles

EXPERT_STACK_AXES = {r".*/experts/(gate_up_proj|down_proj)/kernel": 1}
"""``stack_axes`` for :func:`lora_jax.init` and :func:`lora_jax.quantize`: the expert axis of
the expert kernels (one low-rank update, or one run of quantization blocks, per expert)."""


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Qwen3-MoE hyperparameters (Hugging Face ``Qwen3MoeConfig`` names in brackets).

    Attributes:
      vocab: vocabulary size [vocab_size].
      d: model width [hidden_size].
      layers: decoder blocks [num_hidden_layers].
      heads: query heads [num_attention_heads].
      kv_heads: key/value heads, dividing ``heads`` [num_key_value_heads].
      experts: experts per sparse layer, 0 for none [num_experts].
      top_k: experts per token [num_experts_per_tok].
      expert_ffn: each expert's MLP width [moe_intermediate_size].
      ffn: the dense MLP width of the layers without experts [intermediate_size].
      norm_topk_prob: renormalize the chosen experts' probabilities to sum to 1.
      sparse_step: layer i has experts when ``(i + 1) % sparse_step == 0``
        [decoder_sparse_step].
      mlp_only_layers: layers with a dense MLP whatever ``sparse_step`` says.
      head_dim: per-head width; default ``d // heads``.
      rope_theta: rotary base.
      rms_eps: RMSNorm epsilon [rms_norm_eps].
      max_len: [max_position_embeddings] (informational).
      tied: output head = embedding transposed [tie_word_embeddings].
      dtype: compute dtype ("float32", "bfloat16"); parameters stay as loaded.
      remat: recompute each block's activations in the backward pass (``nn.remat``).
    """

    vocab: int = 151936
    d: int = 2048
    layers: int = 48
    heads: int = 32
    kv_heads: int = 4
    experts: int = 128
    top_k: int = 8
    expert_ffn: int = 768
    ffn: int = 6144
    norm_topk_prob: bool = True
    sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    head_dim: int | None = None
    rope_theta: float = 1000000.0
    rms_eps: float = 1e-6
    max_len: int = 40960
    tied: bool = False
    dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.d // self.heads)
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))  # a list too
        if self.heads % self.kv_heads:
            raise ValueError(f"MoeConfig: heads={self.heads} is not a multiple of "
                             f"kv_heads={self.kv_heads}")
        if cast(int, self.head_dim) % 2:
            raise ValueError(f"MoeConfig: head_dim={self.head_dim} must be even for RoPE")
        if self.sparse_step < 1:
            raise ValueError(f"MoeConfig: sparse_step={self.sparse_step} must be >= 1")
        if self.experts < 0 or (self.experts and not 1 <= self.top_k <= self.experts):
            raise ValueError(f"MoeConfig: top_k={self.top_k} must be in [1, experts="
                             f"{self.experts}]")

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` has experts (else a dense MLP), as Hugging Face
        decides it."""
        return (layer not in self.mlp_only_layers and self.experts > 0
                and (layer + 1) % self.sparse_step == 0)


class Attention(nn.Module):
    """Grouped-query attention with Qwen3's per-head RMSNorm of queries and keys."""

    cfg: MoeConfig

    @nn.compact
    def __call__(self, x, positions):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        b, t, _ = x.shape
        hd = cast(int, cfg.head_dim)  # never None: MoeConfig.__post_init__ fills it in
        kvh, groups = cfg.kv_heads, cfg.heads // cfg.kv_heads
        dense = lambda n, f: nn.Dense(f, use_bias=False, dtype=dt, name=n)  # noqa: E731
        norm = lambda n: nn.RMSNorm(epsilon=cfg.rms_eps, dtype=dt, name=n)  # noqa: E731
        q = norm("q_norm")(dense("q_proj", cfg.heads * hd)(x).reshape(b, t, cfg.heads, hd))
        k = norm("k_norm")(dense("k_proj", kvh * hd)(x).reshape(b, t, kvh, hd))
        v = dense("v_proj", kvh * hd)(x).reshape(b, t, kvh, hd)
        q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        q = q.reshape(b, t, kvh, groups, hd)  # query head h reads key/value head h // groups
        att = jnp.einsum("btkgd,bskd->bkgts", q, k) / jnp.sqrt(hd).astype(dt)
        mask = positions[None, :] <= positions[:, None]
        att = jnp.where(mask, att.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        att = jax.nn.softmax(att, axis=-1).astype(dt)
        y = jnp.einsum("bkgts,bskd->btkgd", att, v).reshape(b, t, cfg.heads * hd)
        return dense("o_proj", cfg.d)(y)


class MLP(nn.Module):
    """The dense SwiGLU MLP of the layers without experts."""

    cfg: MoeConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dense = lambda n, f: nn.Dense(f, use_bias=False, dtype=cfg.dtype, name=n)  # noqa: E731
        return dense("down_proj", cfg.d)(
            nn.silu(dense("gate_proj", cfg.ffn)(x)) * dense("up_proj", cfg.ffn)(x))


class StackedKernel(nn.Module):
    """One ``kernel`` parameter of shape ``(experts, in, out)``."""

    shape: tuple[int, int, int]

    @nn.compact
    def __call__(self):
        init = nn.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=(0,))
        return self.param("kernel", init, self.shape)


def expert_mlp(x: jax.Array, experts: jax.Array, gates: jax.Array, gate_up: jax.Array,
               down: jax.Array) -> jax.Array:
    """Each token through its chosen experts' SwiGLU MLPs, summed with the gate weights.

    Args:
      x: (tokens, d).
      experts: (tokens, top_k) int expert indexes.
      gates: (tokens, top_k) weights.
      gate_up: (E, d, 2·f) kernels, the gate's columns then the up projection's.
      down: (E, f, d) kernels.

    The ``tokens·top_k`` rows are sorted by expert, multiplied with ``jax.lax.ragged_dot``
    (each expert's run of rows by that expert's kernel), and put back in token order.
    """
    n_experts = gate_up.shape[0]
    tokens, top_k = experts.shape
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rows = x[order // top_k]  # row j of the sorted list is token order[j] // top_k
    sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    h = jax.lax.ragged_dot(rows, gate_up.astype(x.dtype), sizes)
    gate, up = jnp.split(h, 2, axis=-1)
    y = jax.lax.ragged_dot(nn.silu(gate) * up, down.astype(x.dtype), sizes)
    y = y[jnp.argsort(order)].reshape(tokens, top_k, -1)  # back to (token, choice) order
    return jnp.einsum("tkd,tk->td", y, gates.astype(y.dtype))


class SparseMoeBlock(nn.Module):
    """Router (``gate``) and experts (``experts/gate_up_proj``, ``experts/down_proj``)."""

    cfg: MoeConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        shape = x.shape
        x = x.reshape(-1, cfg.d)
        logits = nn.Dense(cfg.experts, use_bias=False, dtype=dt, name="gate")(x)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        weights, chosen = jax.lax.top_k(probs, cfg.top_k)
        if cfg.norm_topk_prob:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        gate_up, down = Experts(cfg, name="experts")()
        return expert_mlp(x, chosen, weights.astype(dt), gate_up, down).reshape(shape)


class Experts(nn.Module):
    """The stacked expert kernels: ``gate_up_proj/kernel`` (E, d, 2·f) and
    ``down_proj/kernel`` (E, f, d)."""

    cfg: MoeConfig

    @nn.compact
    def __call__(self):
        cfg = self.cfg
        f = cfg.expert_ffn
        return (StackedKernel((cfg.experts, cfg.d, 2 * f), name="gate_up_proj")(),
                StackedKernel((cfg.experts, f, cfg.d), name="down_proj")())


class Block(nn.Module):
    cfg: MoeConfig
    sparse: bool

    @nn.compact
    def __call__(self, x, positions):
        cfg = self.cfg
        norm = lambda n: nn.RMSNorm(epsilon=cfg.rms_eps, dtype=cfg.dtype, name=n)  # noqa: E731
        x = x + Attention(cfg, name="self_attn")(norm("input_layernorm")(x), positions)
        mlp = SparseMoeBlock(cfg, name="mlp") if self.sparse else MLP(cfg, name="mlp")
        return x + mlp(norm("post_attention_layernorm")(x))


class MoeModel(nn.Module):
    """Decoder-only Qwen3-MoE; ``__call__(tokens)`` -> logits (float32)."""

    cfg: MoeConfig

    @nn.compact
    def __call__(self, tokens):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        emb = nn.Embed(cfg.vocab, cfg.d, name="embed_tokens")
        x = emb(tokens).astype(dt)
        positions = jnp.arange(tokens.shape[1])
        block = nn.remat(Block) if cfg.remat else Block
        for i in range(cfg.layers):
            x = block(cfg, cfg.is_sparse(i), name=f"layers_{i}")(x, positions)
        x = nn.RMSNorm(epsilon=cfg.rms_eps, dtype=dt, name="norm")(x)
        if cfg.tied:
            logits = emb.attend(x)
        else:
            logits = nn.Dense(cfg.vocab, use_bias=False, dtype=dt, name="lm_head")(x)
        return logits.astype(jnp.float32)


# --------------------------------------------------------------------------- Hugging Face

# Config keys that do not change the outputs of a forward pass (training-time, generation,
# bookkeeping): read and ignored.
_IGNORED_KEYS = frozenset({
    "architectures", "model_type", "dtype", "torch_dtype", "transformers_version",
    "initializer_range", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
    "output_router_logits", "router_aux_loss_coef", "attention_dropout", "_name_or_path",
    "max_window_layers", "output_attentions", "output_hidden_states", "return_dict",
    "id2label", "label2id", "problem_type", "tokenizer_class", "task_specific_params",
    "chunk_size_feed_forward", "is_encoder_decoder", "sliding_window",
})
# Keys whose only accepted value is the one this model computes with: key -> (value, what).
_FIXED_KEYS = {
    "hidden_act": ("silu", "only the SwiGLU (silu) MLP is implemented"),
    "attention_bias": (False, "q/k/v/o biases are not implemented"),
    "use_sliding_window": (False, "sliding-window attention is not implemented"),
    "rope_scaling": (None, "RoPE scaling is not implemented"),
    "shared_expert_intermediate_size": (0, "a shared expert (Qwen2-MoE) is not implemented"),
}
_HONOURED_KEYS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "moe_intermediate_size",
    "num_experts", "num_local_experts", "num_experts_per_tok", "norm_topk_prob",
    "decoder_sparse_step", "mlp_only_layers", "rms_norm_eps", "max_position_embeddings",
    "tie_word_embeddings", "rope_theta", "rope_parameters",
})


def _read_json(config: dict | str | os.PathLike) -> tuple[dict, str]:
    if isinstance(config, dict):
        return config, "config"
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path) as f:
        return json.load(f), path


def config_from_hf(config: dict | str | os.PathLike, **overrides) -> MoeConfig:
    """A :class:`MoeConfig` from a Hugging Face Qwen3-MoE ``config.json`` (a dict, file or
    folder); ``overrides`` set :class:`MoeConfig` fields (``dtype``, ``remat``...).

    Every key is either honoured, known not to change the outputs (ids, initialisation,
    training-only options), or refused: an unknown key could change the math, so it is an
    error rather than silently ignored. Missing optional keys take ``Qwen3MoeConfig``'s
    defaults.

    Raises:
      ValueError: an unknown key, a key with a value this model does not compute (naming it
        and the value), a missing required key, a ``model_type`` other than ``qwen3_moe``.
    """
    config, where = _read_json(config)
    model_type = config.get("model_type", "qwen3_moe")
    if model_type != "qwen3_moe":
        raise ValueError(f"{where}: model_type={model_type!r}; this loader reads 'qwen3_moe'")
    unknown = sorted(k for k in config
                     if k not in _IGNORED_KEYS | _HONOURED_KEYS | set(_FIXED_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown config keys {unknown}: they may change the model's "
                         "outputs, which this Qwen3-MoE model would not reproduce")
    for key, (value, why) in _FIXED_KEYS.items():
        got = config.get(key, value)
        if got != value and not (value == 0 and got is None):
            raise ValueError(f"{where}: {key}={got!r}: {why}")
    if "num_experts" in config and "num_local_experts" in config and \
            config["num_experts"] != config["num_local_experts"]:
        raise ValueError(f"{where}: num_experts={config['num_experts']} and num_local_experts="
                         f"{config['num_local_experts']} disagree")
    rope_params = config.get("rope_parameters") or {}
    if not isinstance(rope_params, dict):
        raise ValueError(f"{where}: rope_parameters={rope_params!r} must be an object")
    rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{where}: rope_parameters.rope_type={rope_type!r}: only the default "
                         "RoPE is implemented")
    extra = sorted(set(rope_params) - {"rope_type", "type", "rope_theta"})
    if extra:
        raise ValueError(f"{where}: rope_parameters keys {extra} are not implemented")
    theta = rope_params.get("rope_theta", config.get("rope_theta", 10000.0))

    def need(key):
        if key not in config:
            raise ValueError(f"{where}: missing required key {key!r}")
        return config[key]

    def integer(key, value, low):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{where}: {key}={value!r} must be an integer >= {low}")
        return value

    experts = integer("num_experts", config.get("num_experts", config.get("num_local_experts")
                                                 if "num_local_experts" in config
                                                 else need("num_experts")), 0)
    layers = integer("num_hidden_layers", need("num_hidden_layers"), 1)
    heads = integer("num_attention_heads", need("num_attention_heads"), 1)
    only = config.get("mlp_only_layers") or []
    if not isinstance(only, list):
        raise ValueError(f"{where}: mlp_only_layers={only!r} must be a list of layer indexes")
    for i in only:
        integer("mlp_only_layers[...]", i, 0)
    fields = dict(
        vocab=integer("vocab_size", need("vocab_size"), 1),
        d=integer("hidden_size", need("hidden_size"), 1), layers=layers, heads=heads,
        kv_heads=integer("num_key_value_heads", config.get("num_key_value_heads") or heads, 1),
        experts=experts,
        top_k=integer("num_experts_per_tok", need("num_experts_per_tok") if experts else 1, 1),
        expert_ffn=integer("moe_intermediate_size",
                           need("moe_intermediate_size") if experts else 1, 1),
        ffn=integer("intermediate_size", config.get("intermediate_size", 6144), 1),
        norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        sparse_step=integer("decoder_sparse_step", config.get("decoder_sparse_step", 1), 1),
        mlp_only_layers=tuple(only),
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        rope_theta=float(theta), rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_len=config.get("max_position_embeddings", 32768),
        tied=bool(config.get("tie_word_embeddings", False)),
    )
    fields.update(overrides)
    return MoeConfig(**fields)


@dataclasses.dataclass(frozen=True)
class Stacked:
    """Sources of equal shape stacked along a new leading axis (one per expert)."""

    sources: tuple[streaming.Source, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.sources),) + tuple(self.sources[0].shape)

    def read(self, index: streaming.Index) -> np.ndarray:
        rows = range(*index[0].indices(len(self.sources)))
        return np.stack([self.sources[i].read(index[1:]) for i in rows])


@dataclasses.dataclass(frozen=True)
class Concatenated:
    """Sources concatenated along their last axis (gate and up projections)."""

    sources: tuple[streaming.Source, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        first = tuple(self.sources[0].shape)
        return first[:-1] + (sum(s.shape[-1] for s in self.sources),)

    def read(self, index: streaming.Index) -> np.ndarray:
        start, stop, _ = index[-1].indices(self.shape[-1])
        parts, offset = [], 0
        for s in self.sources:
            n = s.shape[-1]
            lo, hi = max(start - offset, 0), min(stop - offset, n)
            if lo < hi:
                parts.append(s.read(list(index[:-1]) + [slice(lo, hi)]))
            offset += n
        return np.concatenate(parts, axis=-1)


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.*)")
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def hf_names(cfg: MoeConfig) -> dict[str, tuple[str, ...]]:
    """Hugging Face tensor name -> path in the Flax params, for every tensor but the experts'
    (kernels are transposed weights); see :func:`expert_sources` for those."""
    names: dict[str, tuple[str, ...]] = {
        "model.embed_tokens.weight": ("embed_tokens", "embedding"),
        "model.norm.weight": ("norm", "scale")}
    for i in range(cfg.layers):
        h, f = f"model.layers.{i}.", f"layers_{i}"
        for n in ("input_layernorm", "post_attention_layernorm"):
            names[h + n + ".weight"] = (f, n, "scale")
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[h + f"self_attn.{n}.weight"] = (f, "self_attn", n, "kernel")
        for n in ("q_norm", "k_norm"):
            names[h + f"self_attn.{n}.weight"] = (f, "self_attn", n, "scale")
        if cfg.is_sparse(i):
            names[h + "mlp.gate.weight"] = (f, "mlp", "gate", "kernel")
        else:
            for n in ("gate_proj", "up_proj", "down_proj"):
                names[h + f"mlp.{n}.weight"] = (f, "mlp", n, "kernel")
    if not cfg.tied:
        names["lm_head.weight"] = ("lm_head", "kernel")
    return names


def expert_sources(files: TensorFiles, cfg: MoeConfig, where: str = "checkpoint"
                   ) -> tuple[dict[str, streaming.Source], set[str]]:
    """The expert kernels' sources ``{params path: Source}`` and the tensor names they read.

    Reads either layout, per layer: transformers 5's fused 3-D parameters
    ``mlp.experts.gate_up_proj`` (E, 2f, d) and ``mlp.experts.down_proj`` (E, d, f), or the
    per-expert 2-D weights ``mlp.experts.{j}.{gate,up,down}_proj.weight`` ((f, d), (f, d),
    (d, f)) that ``save_pretrained`` writes (and older versions used).

    Raises:
      ValueError: a layer with both layouts, missing experts or tensors, experts beyond
        ``cfg.experts`` (naming the layer, the tensors and the expected count).
    """
    per_layer: dict[int, dict[str, Any]] = {}
    for name in files.keys():
        m = _LAYER.fullmatch(name)
        if not m:
            continue
        i, rest = int(m.group(1)), m.group(2)
        e = _EXPERT.fullmatch(rest)
        if e:
            per_layer.setdefault(i, {}).setdefault("split", {})[
                (int(e.group(1)), e.group(2))] = name
        elif rest in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
            per_layer.setdefault(i, {}).setdefault("fused", {})[rest.rsplit(".", 1)[1]] = name
    sources: dict[str, streaming.Source] = {}
    used: set[str] = set()
    n, f = cfg.experts, cfg.expert_ffn
    for i in range(cfg.layers):
        found = per_layer.pop(i, {})
        if not cfg.is_sparse(i):
            per_layer[i] = found  # reported below as unexpected, if any
            continue
        head = f"params/layers_{i}/mlp/experts"
        if "fused" in found and "split" in found:
            raise ValueError(f"{where}: layer {i} stores its experts both fused "
                             f"({sorted(found['fused'].values())}) and per expert")
        if "fused" in found:
            fused = found["fused"]
            missing = [k for k in ("gate_up_proj", "down_proj") if k not in fused]
            if missing:
                raise ValueError(f"{where}: missing tensors "
                                 f"{[f'model.layers.{i}.mlp.experts.{k}' for k in missing]}")
            for k, want in (("gate_up_proj", (n, 2 * f, cfg.d)), ("down_proj", (n, cfg.d, f))):
                got = files.shape(fused[k])
                if tuple(got) != want:
                    raise ValueError(f"{where}: tensor {fused[k]!r} has shape {tuple(got)}, "
                                     f"expected {want} (num_experts={n}, hidden_size={cfg.d}, "
                                     f"moe_intermediate_size={f})")
                sources[f"{head}/{k}/kernel"] = streaming.Transposed(
                    streaming.FileTensor(files, fused[k]), (0, 2, 1))
                used.add(fused[k])
            continue
        split = found.get("split", {})
        present = sorted({j for j, _ in split})
        extra = [j for j in present if j >= n]
        if extra:
            raise ValueError(f"{where}: layer {i} has tensors of experts {extra}, but the config "
                             f"has num_experts={n} (experts 0..{n - 1})")
        names = {(j, p): f"model.layers.{i}.mlp.experts.{j}.{p}.weight"
                 for j in range(n) for p in ("gate_proj", "up_proj", "down_proj")}
        missing = [v for key, v in names.items() if key not in split]
        if missing:
            more = "..." if len(missing) > 4 else ""
            raise ValueError(f"{where}: layer {i} misses expert tensors {missing[:4]}{more} "
                             f"({len(missing)} of {len(names)}; num_experts={n})")

        def weight(j, p):
            return streaming.Transposed(streaming.FileTensor(files, names[(j, p)]), (1, 0))

        sources[f"{head}/gate_up_proj/kernel"] = Stacked(tuple(
            Concatenated((weight(j, "gate_proj"), weight(j, "up_proj"))) for j in range(n)))
        sources[f"{head}/down_proj/kernel"] = Stacked(tuple(
            weight(j, "down_proj") for j in range(n)))
        used.update(names.values())
    stray = sorted(name for d in per_layer.values() for part in d.values()
                   for name in part.values())
    if stray:
        raise ValueError(f"{where}: expert tensors {stray[:4]} for layers without experts "
                         f"(num_hidden_layers={cfg.layers}, mlp_only_layers="
                         f"{list(cfg.mlp_only_layers)}, decoder_sparse_step={cfg.sparse_step})")
    return sources, used


def from_safetensors(path: str | os.PathLike | TensorFiles, config: MoeConfig | None = None,
                     dtype: Any = jnp.float32, *, quantize: str | Mapping | None = None,
                     mesh: jax.sharding.Mesh | None = None,
                     specs: Any = None) -> tuple[MoeConfig, dict]:
    """Loads a Hugging Face Qwen3-MoE checkpoint (``model*.safetensors``, bf16/f16/f32).

    As :func:`lora_jax.models.llama.from_safetensors`: tensors are read one at a time
    (:mod:`lora_jax.models.streaming`), quantized as read with ``quantize`` and placed on
    ``mesh``. The experts come fused (transformers 5's 3-D ``gate_up_proj``/``down_proj``) or
    one tensor per expert and projection (what ``save_pretrained`` writes); see
    :func:`expert_sources`. With ``quantize`` the expert kernels are quantized with their
    expert axis as a stack axis (blocks within each expert; :data:`EXPERT_STACK_AXES`)
    unless the ``quantize`` dict sets ``stack_axes`` or ``layouts`` itself: the result equals
    ``lora_jax.quantize(dense, ..., stack_axes=EXPERT_STACK_AXES)``.

    Args:
      path: a ``.safetensors`` file, or a folder with (sharded) files and, when ``config`` is
        None, a ``config.json``; or a :class:`TensorFiles`.
      config: the model's config; default read from the folder's ``config.json``.
      dtype: parameter dtype.
      quantize: None, a format (``"nf4"``...) or a dict of :func:`lora_jax.quantize`
        arguments with ``"format"``.
      mesh, specs: place the parameters on ``mesh`` while loading (see
        :func:`lora_jax.models.streaming.load`).

    Returns:
      ``(config, {"params": ...})``.

    Raises:
      ValueError: a tensor missing, unexpected, or of the wrong shape, by name; a config key
        this model does not implement.
    """
    files = path if isinstance(path, TensorFiles) else streaming.open_files(path)
    folder = os.fspath(path) if not isinstance(path, TensorFiles) else \
        os.path.dirname(files.files[0])
    if config is None:
        if not os.path.isdir(folder) or not os.path.exists(os.path.join(folder, "config.json")):
            raise ValueError(f"from_safetensors({folder!r}): pass config= (no config.json "
                             "beside it)")
        config = config_from_hf(folder)
    names = hf_names(config)
    sources, used = expert_sources(files, config, folder)
    for name in files.keys():
        if name in used:
            continue
        if name not in names:
            if config.tied and name == "lm_head.weight":
                continue  # some tied checkpoints still store the head
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise ValueError(f"{files.file(name)}: unexpected tensor {name!r} for {config}")
        where = names[name]
        src: streaming.Source = streaming.FileTensor(files, name)
        if where[-1] == "kernel":  # a PyTorch (out, in) weight is a Flax (in, out) kernel
            src = streaming.Transposed(src, (1, 0))
        sources["/".join(("params",) + where)] = src
    missing = sorted(n for n in names if n not in files)
    if missing:
        more = "..." if len(missing) > 5 else ""
        raise ValueError(f"{folder}: missing tensors {missing[:5]}{more}")
    expected = jax.eval_shape(MoeModel(config).init, jax.random.key(0),
                              jnp.zeros((1, 1), jnp.int32))
    expected = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), expected)
    if quantize is not None:
        quantize = {"format": quantize} if isinstance(quantize, str) else dict(quantize)
        if "stack_axes" not in quantize and "layouts" not in quantize:
            quantize["stack_axes"] = EXPERT_STACK_AXES
    try:
        variables = streaming.load(expected, sources, quantize=quantize, mesh=mesh, specs=specs)
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from None
    return config, variables


