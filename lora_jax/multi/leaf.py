"""The stacked adapter leaf: K LoRA adapters for one kernel, ranks padded to the largest.

``a`` is ``(K, *stack, *in, R)``, ``b`` is ``(K, *stack, R, *out)`` and ``scales`` ``(K,)``
holds each slot's LoRA scaling (``alpha / r``). A slot padded from rank r to R has zero
columns ``r:`` in ``a`` and zero rows in ``b``: the padded part adds nothing to the output,
and it gets zero gradients, so training keeps it zero. The scalings are arrays (not static
metadata) so that replacing a slot's adapter by one of another rank or alpha keeps the
tree structure: a jitted step or decode loop does not retrace. They are not trained
(:attr:`frozen_fields`; ``apply`` stops their gradient). The slot names are static.

As a :class:`lora_jax.protocols.LowRankLeaf` the stack is the sum of its slots (PEFT's
``cat`` combination with unit weights): ``factors()`` concatenates the slots along the rank,
so summaries, sharding, checkpoints and ``check_fits`` work unchanged. Running a model with
it needs ``adapter_ids=`` (:mod:`lora_jax.multi.routing`).

>>> import jax.numpy as jnp
>>> s = StackedLora(a=jnp.ones((2, 4, 3)), b=jnp.ones((2, 3, 5)), scales=jnp.ones(2),
...                 names=("x", "y"))
>>> s.kernel_shape, s.r, s.slots
((4, 5), 6, 2)
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from lora_jax.leaves import LoraWeight, LowRankLeaf

#: How a per-example adapter is picked out of the stack (see :meth:`StackedLora.select`).
ROUTINGS = ("gather", "onehot", "grouped")


@struct.dataclass
class StackedLora(LowRankLeaf):
    """K adapters for one kernel (see the module docstring).

    Attributes:
      a: ``(K, *stack, *in_dims, R)``.
      b: ``(K, *stack, R, *out_dims)``.
      scales: ``(K,)`` float32, each slot's scaling (not trained).
      names: the slot names (static).
      in_axes, stack_axes, dropout, roles: as :class:`lora_jax.LoraWeight` (static).
    """

    a: jax.Array
    b: jax.Array
    scales: jax.Array
    names: tuple = struct.field(pytree_node=False, default=())
    in_axes: int = struct.field(pytree_node=False, default=1)
    stack_axes: int = struct.field(pytree_node=False, default=0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    roles: str = struct.field(pytree_node=False, default="")

    kind: ClassVar[str] = "LoRA stack"
    stacked: ClassVar[bool] = True
    field_roles: ClassVar[dict[str, str]] = {"a": "in", "b": "out", "scales": "slot"}
    frozen_fields: ClassVar[tuple[str, ...]] = ("scales",)

    @classmethod
    def of(cls, slots: list, names: tuple, like: LowRankLeaf) -> StackedLora:
        """A stack of ``slots``, each ``(A, B, scale)`` or ``None`` (a zero slot), ranks
        zero-padded to the largest, with ``like``'s layout (in/stack axes, roles, dropout).
        The factors take the dtype that holds every slot's values exactly (JAX's promotion:
        a bfloat16 and a float32 adapter stack as float32), so no slot is rounded."""
        fa, fb = like.factors()
        sa = like.stack_axes
        given = [x for x in slots if x is not None]
        rmax = max(a.shape[-1] for a, _, _ in given)
        a_dtype = jnp.result_type(*(a.dtype for a, _, _ in given))
        b_dtype = jnp.result_type(*(b.dtype for _, b, _ in given))
        a_list, b_list, scales = [], [], []
        for slot in slots:
            if slot is None:
                a = jnp.zeros(fa.shape[:-1] + (rmax,), a_dtype)
                b = jnp.zeros(fb.shape[:sa] + (rmax,) + fb.shape[sa + 1:], b_dtype)
                scale = 1.0
            else:
                a, b, scale = slot
                pad = rmax - a.shape[-1]
                a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
                b = jnp.pad(b, [(0, 0)] * sa + [(0, pad)] + [(0, 0)] * (b.ndim - sa - 1))
            a_list.append(a.astype(a_dtype))
            b_list.append(b.astype(b_dtype))
            scales.append(float(scale))
        return cls(a=jnp.stack(a_list), b=jnp.stack(b_list),
                   scales=jnp.asarray(scales, jnp.float32), names=tuple(names),
                   in_axes=like.in_axes, stack_axes=sa, dropout=like.dropout,
                   roles=like.layout)

    @property
    def slots(self) -> int:
        return self.a.shape[0]

    @property
    def slot_rank(self) -> int:
        """The padded rank R of every slot."""
        return self.a.shape[-1]

    def factors(self):
        # The sum of the slots: A = [s_1·A_1, ..., s_K·A_K] along the rank, B stacked to match.
        k, r = self.slots, self.slot_rank
        s = lax.stop_gradient(self.scales).astype(self.a.dtype)
        a = self.a * s.reshape((k,) + (1,) * (self.a.ndim - 1))
        a = jnp.moveaxis(a, 0, -2)  # (*stack, *in, K, R)
        a = a.reshape(a.shape[:-2] + (k * r,))
        sa = self.stack_axes
        b = jnp.moveaxis(self.b, 0, sa)  # (*stack, K, R, *out)
        b = b.reshape(b.shape[:sa] + (k * r,) + b.shape[sa + 2:])
        return a, b

    @property
    def scale(self) -> float:
        return 1.0  # folded into factors()

    # Shapes read off the fields, so that they work on abstract leaves (ShapeDtypeStruct).
    @property
    def r(self) -> int:
        return self.slots * self.slot_rank

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.a.shape[1:1 + self.stack_axes])

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.a.shape[1 + self.stack_axes:-1])

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.b.shape[2 + self.stack_axes:])

    def hparams(self) -> dict[str, Any]:
        return {}

    def check(self, where: str) -> None:
        """The checks of every adapter leaf, and one unique string name per slot (a stack
        read from a file whose names were edited would route requests by the wrong names)."""
        super().check(where)
        names = self.names
        if (not isinstance(names, tuple) or len(names) != self.slots
                or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names)):
            raise ValueError(f"{where}: a stack of {self.slots} adapters needs {self.slots} "
                             f"unique string names, got {names!r}")

    def slot(self, k: int) -> LoraWeight:
        """Slot ``k`` as a plain adapter of the padded rank with its scaling (``alpha = s·R``)."""
        r = self.slot_rank
        return LoraWeight(a=self.a[k], b=self.b[k], alpha=float(self.scales[k]) * r,
                          in_axes=self.in_axes, stack_axes=self.stack_axes,
                          dropout=self.dropout, roles=self.roles)

    def trimmed_slot(self, k: int) -> LoraWeight | None:
        """Slot ``k`` with its padding cut off: trailing rank components zero in both factors
        removed, ``alpha = scale·r`` (the same update). ``None`` if the slot is all zero (its
        adapter did not target this kernel). Reads the arrays: not for use under ``jit``."""
        a, b = np.asarray(self.a[k]), np.asarray(self.b[k])
        sa = self.stack_axes
        a_used = np.any(a != 0, axis=tuple(range(a.ndim - 1)))
        b_used = np.any(b != 0, axis=tuple(i for i in range(b.ndim) if i != sa))
        used = np.nonzero(a_used | b_used)[0]
        if used.size == 0:
            return None
        r = int(used[-1]) + 1
        alpha = float(f"{float(self.scales[k]) * r:.7g}")  # the float32 scale times r
        return LoraWeight(a=self.a[k][..., :r], b=lax.slice_in_dim(self.b[k], 0, r, axis=sa),
                          alpha=alpha, in_axes=self.in_axes, stack_axes=sa,
                          dropout=self.dropout, roles=self.roles)

    def keep_slots(self, keep: list[int]) -> StackedLora:
        """The stack with only slots ``keep``, in that order."""
        idx = jnp.asarray(keep, jnp.int32)
        return self.replace(a=self.a[idx], b=self.b[idx], scales=self.scales[idx],
                            names=tuple(self.names[i] for i in keep))

    def set_slot(self, k: int, a: jax.Array, b: jax.Array, scale: float) -> StackedLora:
        """Slot ``k`` set to factors ``a`` ``(*stack, *in, r)``, ``b`` ``(*stack, r, *out)``
        with ``r`` ≤ the padded rank (zero-padded to it) and scaling ``scale``."""
        pad = self.slot_rank - a.shape[-1]
        if pad < 0:
            raise ValueError(f"rank {a.shape[-1]} above the stack's padded rank "
                             f"{self.slot_rank}; use remove and add")
        sa = self.stack_axes
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
        b = jnp.pad(b, [(0, 0)] * sa + [(0, pad)] + [(0, 0)] * (b.ndim - sa - 1))
        if a.shape != self.a.shape[1:] or b.shape != self.b.shape[1:]:
            raise ValueError(f"factors {a.shape}, {b.shape} do not fit the stack's "
                             f"{self.a.shape[1:]}, {self.b.shape[1:]}")
        return self.replace(a=self.a.at[k].set(a.astype(self.a.dtype)),
                            b=self.b.at[k].set(b.astype(self.b.dtype)),
                            scales=self.scales.at[k].set(scale))

    def select(self, i: jax.Array, routing: str = "gather") -> LoraWeight:
        """The adapter of slot ``i`` (a scalar; ``-1``: none) as a rank-``R`` LoRA leaf with
        scale 1, for one example. Under ``vmap`` over the examples:

        * ``"gather"``: each example's factors are gathered (Punica's BGMV): the thin
          matmuls cost what one adapter costs;
        * ``"onehot"``: every slot's factors side by side, masked by the example's one-hot
          row (sglang-jax's einsum): K times the thin matmuls, no gather.
        * ``"grouped"``: the rows sorted by slot, one ``ragged_dot`` per factor over the
          whole stack (:mod:`lora_jax.multi.grouped`), unsorted back.

        Any ``i`` outside ``0..K-1`` (``-1``, or an out-of-range id that reached here traced,
        where it could not be checked) selects no adapter: the update is zero, the example
        gets the base alone. It never falls back to another slot.
        """
        k, r = self.slots, self.slot_rank
        i = jnp.asarray(i, jnp.int32)
        scales = lax.stop_gradient(self.scales)
        if routing in ("gather", "grouped"):
            valid = (i >= 0) & (i < k)
            j = jnp.clip(i, 0, k - 1)  # a safe index; the slot is masked out unless valid
            s = jnp.where(valid, scales[j], 0.0).astype(self.a.dtype)
            a = jnp.where(valid, self.a[j] * s, jnp.zeros((), self.a.dtype))
            b = self.b[j]
            rank = r
            if routing == "grouped":
                from lora_jax.multi.grouped import GroupedLora
                # The slot axis after the kernel's stack axes, and the id on every stack
                # index, so that a scan over layers slices them as it slices a and b.
                sa = self.stack_axes
                slot_a = self.a * scales.astype(self.a.dtype).reshape(
                    (k,) + (1,) * (self.a.ndim - 1))
                return GroupedLora(a=a, b=b, alpha=float(rank), in_axes=self.in_axes,
                                   stack_axes=sa, dropout=self.dropout, roles=self.roles,
                                   slot_a=jnp.moveaxis(slot_a, 0, sa),
                                   slot_b=jnp.moveaxis(self.b, 0, sa),
                                   slot_id=jnp.broadcast_to(i, self.a.shape[1:1 + sa]))
        elif routing == "onehot":
            # one_hot is all zero for an id outside 0..K-1: no slot contributes.
            oh = jax.nn.one_hot(i, k, dtype=self.a.dtype) * scales.astype(self.a.dtype)
            a = self.a * oh.reshape((k,) + (1,) * (self.a.ndim - 1))
            a = jnp.moveaxis(a, 0, -2)
            a = a.reshape(a.shape[:-2] + (k * r,))
            sa = self.stack_axes
            b = jnp.moveaxis(self.b, 0, sa)
            b = b.reshape(b.shape[:sa] + (k * r,) + b.shape[sa + 2:])
            rank = k * r
        else:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        return LoraWeight(a=a, b=b, alpha=float(rank), in_axes=self.in_axes,
                          stack_axes=self.stack_axes, dropout=self.dropout, roles=self.roles)
