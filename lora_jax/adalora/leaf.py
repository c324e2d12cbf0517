"""The AdaLoRA adapter leaf, :class:`AdaLoraWeight`, and :func:`init` of an AdaLoRA tree.

Each targeted kernel gets ``delta = scale * P @ diag(E) @ Q`` at a fixed maximum rank
``init_r`` (PEFT's ``SVDLinear``); :func:`flatten` lists the leaves of a tree for the
allocator, the regulariser and :func:`lora_jax.adalora.finalize`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lora_jax import init_schemes as schemes
from lora_jax import layouts as Lay
from lora_jax import lora as L
from lora_jax import paths as P
from lora_jax import validation as V

PyTree = Any

# PEFT adds 1e-5 to the rank in the denominator of its scaling (SVDLinear.forward/get_delta_weight:
# ``scaling / (ranknum + 1e-5)``, with ranknum = init_r for the whole of training).
_RANK_EPS = 1e-5


@struct.dataclass
class AdaLoraWeight(L.LowRankLeaf):
    """An AdaLoRA adapter for one kernel: ``delta = scale * tensordot(p * e, q, 1)``.

    Attributes:
      p: ``(*stack, *in_dims, r)``, input-side singular vectors (PEFT's ``lora_A`` transposed).
      e: ``(*stack, r)``, the singular values Lambda (PEFT's ``lora_E``); zero at init.
      q: ``(*stack, r, *out_dims)``, output-side vectors (PEFT's ``lora_B`` transposed).
      alpha: PEFT's ``lora_alpha`` (static); ``scale = alpha / (init_r + 1e-5)`` as in PEFT.
      target_r: the average rank the allocator prunes to (static).
      in_axes: how many kernel axes (after the stack axes) are the input (static).
      stack_axes: leading axes that stack layers (static); every slice is its own module.
      dropout: dropout rate on the adapter's input path (static).
      roles: the kernel's layout (static; see :class:`lora_jax.LoraWeight`).
    """

    p: jax.Array
    e: jax.Array
    q: jax.Array
    alpha: float = struct.field(pytree_node=False, default=1.0)
    target_r: int = struct.field(pytree_node=False, default=0)
    in_axes: int = struct.field(pytree_node=False, default=1)
    stack_axes: int = struct.field(pytree_node=False, default=0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    roles: str = struct.field(pytree_node=False, default="")

    kind: ClassVar[str] = "AdaLoRA"
    peft_type: ClassVar[str] = "ADALORA"
    field_roles: ClassVar[dict[str, str]] = {"p": "in", "e": "rank", "q": "out"}

    def hparams(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "target_r": self.target_r}

    def check(self, where: str) -> None:
        V.leaf_arrays(self, where)
        sa = V.integer(self.stack_axes, f"{where}: stack_axes", low=0)
        want = tuple(self.p.shape[:sa]) + tuple(self.p.shape[-1:])
        if tuple(self.e.shape) != want:  # one singular value per rank
            raise ValueError(f"{where}: e has shape {tuple(self.e.shape)}, expected {want} "
                             f"(stack axes + the rank of p {tuple(self.p.shape)})")
        super().check(where)

    def peft_matrices(self, index: tuple[int, ...]) -> dict[str, np.ndarray]:
        """PEFT's ``lora_A`` ``(r, in)`` = Pᵀ, ``lora_B`` ``(out, r)`` = Qᵀ and ``lora_E``
        ``(r, 1)`` at one stack index."""
        p, e, q = (np.asarray(x[index]) for x in (self.p, self.e, self.q))
        r = p.shape[-1]
        return {"lora_A": p.reshape(-1, r).T, "lora_B": q.reshape(r, -1).T,
                "lora_E": e.reshape(r, 1)}

    def factors(self) -> tuple[jax.Array, jax.Array]:
        """``(P * E, Q)``: E broadcast over the input axes, so ``delta = scale * A @ B``."""
        e = self.e.reshape(self.e.shape[:-1] + (1,) * len(self.in_shape) + self.e.shape[-1:])
        return self.p * e.astype(self.p.dtype), self.q

    @property
    def scale(self) -> float:
        return self.alpha / (self.r + _RANK_EPS)

    # Shapes from the stored arrays, without forming P * E.
    @property
    def r(self) -> int:
        return self.p.shape[-1]

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.p.shape[: self.stack_axes])

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.p.shape[self.stack_axes : -1])

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape[self.stack_axes + 1 :])


def init(
    params: PyTree,
    init_r: int = 12,
    target_r: int = 8,
    *,
    key: jax.Array,
    alpha: float | None = None,
    targets: P.Pattern | None = None,
    exclude: P.Pattern | None = None,
    rules: Sequence[P.Rule] | None = None,
    in_axes: int | Mapping[str, int] | None = None,
    stack_axes: int | Mapping[str, int] | None = None,
    dtype=jnp.float32,
    dropout: float = 0.0,
    layouts: Mapping[str, Any] | None = None,
    init: str = "default",
) -> dict:
    """Creates an AdaLoRA tree for ``params`` (PEFT ``AdaLoraLayer.reset_lora_parameters``).

    ``P`` and ``Q`` start as N(0, 0.02^2) and ``E`` at zero, so the model is unchanged at init.
    Target selection, per-module rules and validation are those of :func:`lora_jax.init`;
    a rule's ``r`` sets that module's ``init_r``.

    Args:
      params: a parameter pytree.
      init_r: the starting (maximum) rank of every module.
      target_r: the average rank after pruning; the global final budget is
        ``target_r`` times the number of modules (PEFT ``RankAllocator.target_bgt``).
      key: a PRNG key; each leaf uses ``fold_in(key, crc32(path))``.
      alpha: PEFT's ``lora_alpha``; ``None`` or ``0`` mean ``init_r`` (PEFT uses ``r`` when
        ``lora_alpha`` is 0; note PEFT's config default is 8).
      targets, exclude, rules, in_axes, stack_axes, layouts: as in :func:`lora_jax.init`
        (P spans the input axes, Q the output axes).
      dtype: dtype of P, E and Q.
      dropout: PEFT's ``lora_dropout`` on the adapter input path.
      init: an init scheme of :mod:`lora_jax.init_schemes` that AdaLoRA supports:
        ``"default"`` (PEFT's, above) or ``"zeros"`` (P, E, Q all zero; for loading).

    Returns:
      A nested dict with an :class:`AdaLoraWeight` at every targeted path.

    Raises:
      ValueError: ``target_r > init_r``, a bad pattern, a rank above ``min(in, out)``, an
        init scheme AdaLoRA does not support.

    >>> import jax, jax.numpy as jnp
    >>> from lora_jax import adalora
    >>> w = adalora.init({"kernel": jnp.ones((8, 4))}, init_r=3, target_r=2,
    ...                  key=jax.random.key(0))["kernel"]
    >>> w.p.shape, w.e.shape, w.q.shape, round(w.scale, 4)
    ((8, 3), (3,), (3, 4), 1.0)
    """
    scheme = schemes.get(init, "adalora.init")
    draw = scheme.adalora
    if draw is None:
        ok = [n for n in schemes.names() if schemes.get(n, "adalora.init").adalora is not None]
        raise ValueError(f"adalora.init: init={init!r} is not supported by AdaLoRA (P·diag(E)·Q "
                         f"starts with E = 0); AdaLoRA supports {ok}")
    target_r = V.integer(target_r, "adalora.init: target_r", low=0)
    init_r, alpha, dropout, in_axes, stack_axes = V.init_args(
        "adalora.init", params, init_r, key, alpha, targets, exclude, rules, dtype, dropout,
        in_axes, stack_axes, alpha_zero_means="init_r, as PEFT", layouts=layouts)
    if target_r > init_r:
        raise ValueError(f"target_r={target_r} must not exceed init_r={init_r}")
    spec = L.resolve_targets(
        params, r=init_r, alpha=alpha, targets=targets, exclude=exclude, rules=rules,
        in_axes=in_axes, stack_axes=stack_axes, layouts=layouts,
    )
    out = {}
    for path, s in spec.items():
        k = P.path_key(key, path)
        kp, kq = jax.random.split(k)
        shape, r, roles = s["shape"], s["r"], s["roles"]
        stack, in_dims, out_dims = Lay.split(roles, shape)
        canonical = roles == Lay.canonical(len(shape), len(in_dims), len(stack))
        out[path] = AdaLoraWeight(
            p=draw(kp, stack + in_dims + (r,), dtype),
            e=jnp.zeros(stack + (r,), dtype),
            q=draw(kq, stack + (r,) + out_dims, dtype),
            alpha=float(s["alpha"] or r), target_r=target_r, in_axes=len(in_dims),
            stack_axes=len(stack), dropout=dropout, roles="" if canonical else roles,
        )
    return L.from_leaves(out)


def flatten(lora: PyTree):
    """``(paths, AdaLoraWeight leaves, treedef)`` of an AdaLoRA tree."""
    pairs, tdef = jax.tree_util.tree_flatten_with_path(lora, is_leaf=L.is_lowrank)
    paths, ws = [P.path_str(p) for p, _ in pairs], [x for _, x in pairs]
    for path, x in zip(paths, ws):
        if not isinstance(x, AdaLoraWeight):
            raise TypeError(f"AdaLoRA tree entry {path!r} is a {type(x).__name__}, "
                            "expected lora_jax.adalora.AdaLoraWeight")
    if not ws:
        raise ValueError("the tree holds no AdaLoraWeight leaf")
    return paths, ws, tdef
