"""DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"): :class:`DoraWeight`.

The adapted kernel is ``W' = m · V / ‖V‖`` with ``V = W0 + s·A·B`` and the norm taken per
output unit, over the kernel's input axes (PEFT ``DoraLinearLayer``: ``torch.linalg.norm(V,
dim=1)`` of the ``(out, in)`` weight). As in PEFT and the paper's §4.3, the norm is a
constant in the backward pass (``stop_gradient``): A and B get gradients through ``V`` only.

The leaf works on any layout and any base (dense or quantized): ``m`` has the shape
``(*stack, *out)``. Under :func:`lora_jax.apply` the matmul is the LoRA one (merged forward,
dW-free backward) followed by a per-output-unit rescale ``m / ‖V‖``; the norm comes from
``‖W0‖² + 2s·⟨W0, A·B⟩ + s²·‖A·B‖²`` per output unit, with only thin matmuls beside the
frozen weight (no second kernel-sized array).

A unit whose ``V`` is zero (a pruned or zero-initialised output column with no update yet)
would divide 0 by 0. Here the norm is clamped, ``max(‖V‖, NORM_EPS)``, in the fast path, the
merged kernel, :func:`lora_jax.merge` and :func:`unmerge`: such a unit outputs zero (its
magnitude starts at 0 too) and every gradient stays finite (zero for that unit, so it stays
off while ``m`` is 0); other units are unaffected. (PEFT divides by the norm itself and gives
NaN there.)

>>> import jax, jax.numpy as jnp, lora_jax
>>> w = jax.random.normal(jax.random.key(0), (6, 4))
>>> lora = lora_jax.init({"kernel": w}, r=2, key=jax.random.key(1), dora=True)
>>> leaf = lora["kernel"]
>>> leaf.kind, leaf.m.shape, bool(jnp.allclose(lora_jax.merge({"kernel": w}, lora)["kernel"], w))
('DoRA', (4,), True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lora_jax import layouts as Lay
from lora_jax import paths as P
from lora_jax import protocols
from lora_jax.leaves import AlphaScaled, LoraWeight, LowRankLeaf, from_leaves, leaves

PyTree = Any

#: The smallest norm DoRA divides by: ``m / max(‖V‖, NORM_EPS)`` per output unit.
NORM_EPS = 1e-12


@struct.dataclass
class DoraWeight(AlphaScaled, LowRankLeaf):
    """A DoRA adapter for one kernel: ``W' = m · (W0 + s·A·B) / ‖W0 + s·A·B‖`` per output unit.

    Attributes:
      a: ``(*stack, *in_dims, r)`` factor (PEFT's ``lora_A.weight`` transposed).
      b: ``(*stack, r, *out_dims)`` factor (PEFT's ``lora_B.weight`` transposed; zeros at init).
      m: ``(*stack, *out_dims)`` magnitude (PEFT's ``lora_magnitude_vector``); at init the
        base kernel's norms per output unit, so the model starts unchanged.
      alpha, rslora, in_axes, stack_axes, dropout, roles, residual_init: as
        :class:`lora_jax.LoraWeight`.
    """

    a: jax.Array
    b: jax.Array
    m: jax.Array
    alpha: float = struct.field(pytree_node=False, default=1.0)
    rslora: bool = struct.field(pytree_node=False, default=False)
    in_axes: int = struct.field(pytree_node=False, default=1)
    stack_axes: int = struct.field(pytree_node=False, default=0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    roles: str = struct.field(pytree_node=False, default="")
    residual_init: str = struct.field(pytree_node=False, default="")

    kind: ClassVar[str] = "DoRA"
    peft_config: ClassVar[dict[str, Any]] = {"use_dora": True}
    field_roles: ClassVar[dict[str, str]] = {"a": "in", "b": "out", "m": "unit"}


    def check(self, where: str) -> None:
        super().check(where)
        want = self.stack_shape + self.out_shape
        if tuple(self.m.shape) != want:
            raise ValueError(f"{where}: m has shape {tuple(self.m.shape)}, expected {want} "
                             "(stack axes + output axes: one magnitude per output unit)")

    def peft_matrices(self, index: tuple[int, ...]) -> dict[str, np.ndarray]:
        """PEFT's ``lora_A``, ``lora_B`` and ``lora_magnitude_vector`` ``(out,)``."""
        out = super().peft_matrices(index)
        out["lora_magnitude_vector"] = np.asarray(self.m[index]).reshape(-1)
        return out

    def linear_part(self) -> LowRankLeaf:
        """The plain LoRA update ``s·A·B`` of this adapter (before the rescale)."""
        return LoraWeight(a=self.a, b=self.b, alpha=self.alpha, rslora=self.rslora,
                          in_axes=self.in_axes, stack_axes=self.stack_axes,
                          dropout=self.dropout, roles=self.roles,
                          residual_init=self.residual_init)

    def _units(self, x: jax.Array, order) -> jax.Array:
        """``x`` ``(*stack, *out)`` broadcastable against the kernel in axis ``order``
        (size 1 on the input axes)."""
        layout = self.layout
        stack, _, outs = Lay.split(layout, range(len(layout)))
        unit_axes = stack + outs
        want = tuple(range(len(layout))) if order is None else tuple(order)
        kept = [k for k in want if layout[k] != Lay.IN]
        x = jnp.transpose(x, [unit_axes.index(k) for k in kept])
        shape = iter(x.shape)
        return x.reshape(tuple(1 if layout[k] == Lay.IN else next(shape) for k in want))

    def merged(self, w: jax.Array, order=None) -> jax.Array:
        """``m · V / ‖V‖`` for a dense base ``w`` (in the kernel's axis order, or ``order``);
        the norm is constant under differentiation (PEFT ``DoraLinearLayer.forward``)."""
        v = super().merged(w, order)
        want = tuple(range(v.ndim)) if order is None else tuple(order)
        ins = tuple(j for j, k in enumerate(want) if self.layout[k] == Lay.IN)
        norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=ins, keepdims=True))
        return v * (self._units(self.m, order).astype(v.dtype) / _clamped(norm))

    def unmerged(self, w: jax.Array) -> jax.Array:
        raise ValueError(
            "DoRA's merged kernel does not determine the base alone (one scale per output unit "
            "is folded away); use lora_jax.dora.unmerge(merged, lora, norms) with norms = "
            "lora_jax.dora.norms(base, lora) taken before merging")

    def output_scale(self, w0: jax.Array) -> jax.Array:
        """``m / ‖W0 + s·A·B‖`` ``(*stack, *out)`` for a dense base ``w0`` (kernel order),
        the norm (constant under differentiation) from ``‖W0‖² + 2s·⟨W0, AB⟩ + s²·‖AB‖²``:
        a reduction over ``w0`` and thin matmuls, no second kernel-sized array."""
        return self.m / _clamped(_norm(self, w0))


def lax_stop(x):
    return jax.lax.stop_gradient(x)


def _clamped(norm: jax.Array) -> jax.Array:
    """``max(‖V‖, NORM_EPS)``, a constant under differentiation."""
    return lax_stop(jnp.maximum(norm, NORM_EPS))


def _norm(leaf: DoraWeight, w0: jax.Array) -> jax.Array:
    """``‖W0 + s·A·B‖`` per output unit, ``(*stack, *out)``, by the expanded square."""
    layout = leaf.layout
    s, ins, outs = leaf.stack_shape, leaf.in_shape, leaf.out_shape
    n_in, n_out, r = math.prod(ins), math.prod(outs), leaf.r
    f32 = jnp.promote_types(w0.dtype, jnp.float32)
    w = jnp.transpose(w0, Lay.to_canonical(layout)).reshape(s + (n_in, n_out)).astype(f32)
    a = leaf.a.reshape(s + (n_in, r)).astype(f32)
    b = leaf.b.reshape(s + (r, n_out)).astype(f32)
    sc = leaf.scale
    w2 = jnp.sum(jnp.square(w), axis=-2)  # ‖W0‖² per output unit
    atw = jnp.einsum("...ir,...io->...ro", a, w)  # Aᵀ·W0, (r, out)
    ata = jnp.einsum("...ir,...is->...rs", a, a)  # Aᵀ·A, (r, r)
    cross = jnp.sum(b * atw, axis=-2)  # ⟨W0, A·B⟩ per output unit
    ab2 = jnp.sum(b * jnp.einsum("...rs,...so->...ro", ata, b), axis=-2)  # ‖A·B‖²
    n2 = w2 + 2.0 * sc * cross + sc * sc * ab2
    return jnp.sqrt(jnp.maximum(n2, 0.0)).reshape(s + outs)


def magnitude(leaf: LowRankLeaf, w0: jax.Array) -> jax.Array:
    """The norms of ``W0 + s·A·B`` per output unit, ``(*stack, *out)`` (DoRA's initial m)."""
    tmp = DoraWeight(a=leaf.factors()[0], b=leaf.factors()[1],
                     m=jnp.zeros(leaf.stack_shape + leaf.out_shape), **_meta(leaf))
    v = LowRankLeaf.merged(tmp, w0.astype(jnp.promote_types(w0.dtype, jnp.float32)))
    ins = tuple(k for k, c in enumerate(tmp.layout) if c == Lay.IN)
    n = jnp.sqrt(jnp.sum(jnp.square(v), axis=ins))  # kernel order without the input axes
    stack, _, outs = Lay.split(tmp.layout, range(len(tmp.layout)))
    kept = [k for k in range(len(tmp.layout)) if tmp.layout[k] != Lay.IN]
    return jnp.transpose(n, [kept.index(k) for k in stack + outs])


def _meta(leaf: LowRankLeaf) -> dict[str, Any]:
    hp = leaf.hparams()
    return dict(alpha=float(hp.get("alpha", leaf.scale * leaf.r)), rslora=bool(hp.get("rslora")),
                in_axes=leaf.in_axes, stack_axes=leaf.stack_axes, dropout=leaf.dropout,
                roles=leaf.roles, residual_init=getattr(leaf, "residual_init", ""))


def from_lora(leaf: LowRankLeaf, w0: Any, m: jax.typing.ArrayLike | None = None,
              dtype: Any = None) -> DoraWeight:
    """A DoRA leaf with ``leaf``'s factors and magnitude ``m`` (default: the norms of
    ``W0 + s·A·B`` per output unit, so the adapted kernel equals ``W0 + s·A·B`` direction-
    and length-wise: PEFT's init). ``w0``: the base kernel (dense or quantized)."""
    a, b = leaf.factors()
    if m is None:
        m = magnitude(leaf, protocols.dense(w0, jnp.float32))
    m = jnp.asarray(m, dtype or a.dtype)
    return DoraWeight(a=a, b=b, m=m, **_meta(leaf))


def norms(base: PyTree, lora: PyTree) -> dict[str, jax.Array]:
    """``{path: ‖W0 + s·A·B‖ per output unit}`` of a DoRA tree over its base: what
    :func:`unmerge` needs to undo :func:`lora_jax.merge` (PEFT caches the same norms)."""
    from lora_jax.merging import check_fits

    targets = check_fits(base, lora, where="dora.norms")
    return {p: magnitude(x, protocols.dense(targets[p], jnp.float32))
            for p, x in leaves(lora).items() if isinstance(x, DoraWeight)}


def unmerge(merged: PyTree, lora: PyTree, norms: dict[str, jax.Array]) -> PyTree:
    """The base of ``merged = lora_jax.merge(base, lora)`` for a tree with DoRA leaves:
    ``W0 = W' · ‖V‖ / m − s·A·B`` (PEFT ``DoraLinearVariant.unmerge``); ``norms`` from
    :func:`norms` (plain LoRA leaves are unmerged as usual). A unit with ``‖V‖ = 0`` comes
    back as ``−s·A·B``; one with ``m = 0`` and ``‖V‖ > 0`` cannot come back (an error).

    Raises:
      ValueError: ``lora`` does not fit ``merged``; ``norms`` lacks a DoRA path, has a path
        that is not one, or a norm of the wrong shape (naming the path and both shapes).

    >>> import jax, jax.numpy as jnp, lora_jax
    >>> base = {"kernel": jax.random.normal(jax.random.key(0), (6, 4))}
    >>> lora = lora_jax.init(base, r=2, key=jax.random.key(1), dora=True, init="gaussian")
    >>> lora = jax.tree.map(lambda x: x + 0.1, lora)
    >>> back = unmerge(lora_jax.merge(base, lora), lora, norms(base, lora))
    >>> bool(jnp.allclose(back["kernel"], base["kernel"], atol=1e-5))
    True
    """
    from lora_jax.merging import check_fits
    from lora_jax.merging import unmerge as plain_unmerge

    lmap = leaves(lora)
    plain = from_leaves({p: x for p, x in lmap.items() if not isinstance(x, DoraWeight)})
    targets = check_fits(merged, lora, where="dora.unmerge")
    if not isinstance(norms, Mapping):
        raise TypeError(f"dora.unmerge: norms must be the dict from dora.norms(base, lora), got "
                        f"a {type(norms).__name__}")
    dora_paths = {p for p, x in lmap.items() if isinstance(x, DoraWeight)}
    extra = sorted(set(norms) - dora_paths)
    if extra:
        raise ValueError(f"dora.unmerge: norms has {extra[0]!r}, which is not a DoRA adapter of "
                         f"lora (those are {sorted(dora_paths)[:4]})")
    for path in sorted(dora_paths):
        if path not in norms:
            raise ValueError(f"dora.unmerge: no norm for {path!r}; pass dora.norms(base, lora)")
        x = lmap[path]
        want, got = x.stack_shape + x.out_shape, tuple(jnp.shape(norms[path]))
        if got != want:
            raise ValueError(f"dora.unmerge: norms[{path!r}] has shape {got}, expected {want} "
                             "(stack axes + output axes: one norm per output unit)")
    out = plain_unmerge(merged, plain) if plain else merged

    def f(path, w):
        x = lmap.get(path)
        if not isinstance(x, DoraWeight):
            return w
        wd = protocols.dense(targets[path])
        wf = wd.astype(jnp.promote_types(wd.dtype, jnp.float32))
        n = jnp.asarray(norms[path], wf.dtype)
        m = x.m.astype(wf.dtype)
        lost = (m == 0) & (n > 0)  # m = 0 folded V away: the merged kernel has no trace of it
        if not isinstance(lost, jax.core.Tracer) and bool(jnp.any(lost)):
            raise ValueError(f"dora.unmerge: {path!r} has {int(jnp.sum(lost))} output unit(s) "
                             "with magnitude m = 0 and a non-zero ‖V‖: the merged kernel is zero "
                             "there and does not determine the base")
        ratio = jnp.where(lost, jnp.nan, jnp.maximum(n, NORM_EPS) / jnp.where(m == 0, 1.0, m))
        v = wf * x._units(ratio, None)  # V = W'·max(‖V‖, eps)/m; zero where ‖V‖ = 0
        return (v - x.delta()).astype(wd.dtype)

    return P.map_with_path(f, out)
