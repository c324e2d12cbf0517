"""LoRA+ (Hayou et al. 2024): the B factors learn ``ratio`` times faster than the A factors.

:func:`labels` sorts a LoRA tree (or a combined ``{"base": params, "lora": lora}`` tree)
into PEFT's parameter groups and :func:`optimizer` gives each group its learning rate and
weight decay, as ``peft.optimizers.create_loraplus_optimizer`` (PEFT 0.21, ``loraplus.py``
l.61–116) does:

* ``"embedding"``: both factors of an embedding's adapter, at ``lr_embedding``;
* ``"B"``: B factors and every other array of one output-side axis (a DoRA magnitude, a
  trained 1-D base leaf such as a bias), at ``lr · ratio``; ``"B_no_decay"`` for those
  whose path names a bias or a norm layer (no weight decay);
* ``"A"``: the rest (A factors, AdaLoRA's Λ, trained 2-D base weights), at ``lr``;
* ``"frozen"``: leaves that do not train (``optax.set_to_zero``).

>>> import jax, jax.numpy as jnp, optax, lora_jax
>>> params = {"d": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
>>> tree = {"base": params, "lora": lora_jax.init(params, r=2, key=jax.random.key(0))}
>>> lab = labels(tree, bias="lora_only")
>>> lab["lora"]["d"]["kernel"].a, lab["lora"]["d"]["kernel"].b, lab["base"]["d"]["bias"]
('A', 'B', 'B_no_decay')
>>> tx = optimizer(tree, lr=1e-3, ratio=16, weight_decay=0.1, bias="lora_only")
>>> state = tx.init(tree)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any

import jax
import optax

from lora_jax import lora as L
from lora_jax import paths as P
from lora_jax import protocols
from lora_jax import validation as V
from lora_jax.train import trainable_mask

PyTree = Any

#: Paths of 1-D trained leaves that get no weight decay (PEFT: names holding "bias", and the
#: parameters of LayerNorm modules; here, modules whose name holds "norm" or "ln").
NO_DECAY = (r".*bias.*", r"(.*/)?[^/]*(norm|ln)[^/]*/[^/]+")
#: Adapters of embeddings (PEFT: a LoRA ``Embedding`` layer): Flax ``nn.Embed`` tables.
EMBEDDINGS = (r"(.*/)?embedding",)
GROUPS = ("A", "B", "B_no_decay", "embedding", "frozen")


def labels(
    tree: PyTree,
    *,
    modules_to_save: P.Pattern | None = None,
    bias: str = "none",
    embeddings: P.Pattern = EMBEDDINGS,
    no_decay: P.Pattern = NO_DECAY,
) -> PyTree:
    """A tree of group names (:data:`GROUPS`) with ``tree``'s structure, adapter leaves
    entered (each array field labelled).

    Args:
      tree: a LoRA tree, or ``{"base": params, "lora": lora}``.
      modules_to_save, bias: which base leaves train, as :func:`lora_jax.optimizer`.
      embeddings: regexes over adapter paths of embedding tables (both factors at
        ``lr_embedding``).
      no_decay: regexes over paths of trained 1-D leaves without weight decay.
    """
    mask = trainable_mask(tree, modules_to_save=modules_to_save, bias=bias)
    emb, nd = P.as_patterns(embeddings), P.as_patterns(no_decay)

    def adapter(path, leaf, m):
        roles = leaf.field_roles
        out = {}
        for f in dataclasses.fields(leaf):
            if not f.metadata.get("pytree_node", True) or getattr(leaf, f.name) is None:
                continue
            if not getattr(m, f.name):
                out[f.name] = "frozen"
            elif P.matches(path.removeprefix("lora/"), emb):
                out[f.name] = "embedding"
            else:  # PEFT: "lora_B" in the name, or a 1-D parameter (DoRA's magnitude)
                out[f.name] = "B" if roles.get(f.name) in ("out", "unit") else "A"
        return leaf.replace(**out)

    def label(kp, x, m):
        path = P.path_str(kp)
        if L.is_lowrank(x):
            return adapter(path, x, m)
        if protocols.is_base_leaf(x):
            return jax.tree.map(lambda _: "frozen", x)
        if not m:
            return "frozen"
        if len(getattr(x, "shape", ())) == 1:
            return "B_no_decay" if P.matches(path, nd) else "B"
        return "A"

    return jax.tree_util.tree_map_with_path(
        label, tree, mask, is_leaf=lambda x: L.is_lowrank(x) or protocols.is_base_leaf(x))


def optimizer(
    tree: PyTree,
    *,
    lr: float,
    ratio: float = 16.0,
    weight_decay: float = 0.0,
    lr_embedding: float = 1e-6,
    make: Callable[..., optax.GradientTransformation] = optax.adamw,
    modules_to_save: P.Pattern | None = None,
    bias: str = "none",
    embeddings: P.Pattern = EMBEDDINGS,
    no_decay: P.Pattern = NO_DECAY,
    **kwargs: Any,
) -> optax.GradientTransformation:
    """PEFT's ``create_loraplus_optimizer(model, make, lr, loraplus_lr_ratio=ratio,
    loraplus_weight_decay=weight_decay, loraplus_lr_embedding=lr_embedding)`` for ``tree``.

    Args:
      tree: a LoRA tree, or ``{"base": params, "lora": lora}``.
      lr: the A factors' learning rate (a float or an optax schedule; B's is ``ratio``
        times it).
      ratio: LoRA+'s ``λ = η_B / η_A``.
      weight_decay: decay of every group but ``B_no_decay``.
      lr_embedding: the embedding adapters' learning rate (PEFT's default 1e-6).
      make: ``make(learning_rate=..., weight_decay=..., **kwargs)`` builds each group's
        optimizer (``optax.adamw``: PEFT's decoupled ``torch.optim.AdamW``).
      modules_to_save, bias, embeddings, no_decay: as :func:`labels`.
      **kwargs: more arguments of ``make`` (``b1``, ``b2``, ``eps``, ...).

    Returns:
      An ``optax.multi_transform`` over the groups, ``set_to_zero`` on frozen leaves.

    Raises:
      ValueError/TypeError: ``ratio`` not a finite number > 0 (0 would freeze B, a negative
        one make B climb the loss), ``lr`` not a finite number > 0 (or a schedule),
        ``lr_embedding`` or ``weight_decay`` not a finite number >= 0.
    """
    ratio = _number(ratio, "ratio", "> 0: B's learning rate is ratio times A's", positive=True)
    if not callable(lr):
        lr = _number(lr, "lr", "> 0 (or an optax schedule)", positive=True)
    lr_embedding = _number(lr_embedding, "lr_embedding", ">= 0", positive=False)
    weight_decay = _number(weight_decay, "weight_decay", ">= 0", positive=False)
    def scaled(f):
        return (lambda c: f(c) * ratio) if callable(f) else f * ratio

    groups = {"A": (lr, weight_decay), "B": (scaled(lr), weight_decay),
              "B_no_decay": (scaled(lr), 0.0), "embedding": (lr_embedding, weight_decay)}
    txs: dict[Hashable, optax.GradientTransformation] = {
        g: make(learning_rate=a, weight_decay=wd, **kwargs) for g, (a, wd) in groups.items()}
    txs["frozen"] = optax.set_to_zero()
    lab = labels(tree, modules_to_save=modules_to_save, bias=bias, embeddings=embeddings,
                 no_decay=no_decay)
    return optax.multi_transform(txs, lab)


def _number(value: Any, name: str, want: str, *, positive: bool) -> float:
    """``value`` as a finite float, > 0 (``positive``) or >= 0; errors name the argument."""
    v = V.number(value, f"loraplus.optimizer: {name}")
    if v < 0 or (positive and v == 0):
        raise ValueError(f"loraplus.optimizer: {name} must be a finite number {want}, got {v}")
    return v
