"""``AdaLoRA``: :class:`lora_jax.nnx.LoRA` with AdaLoRA adapters and the rank allocator as NNX
state.

The allocator's importance EMAs, masks, budget and step counter are :class:`AdaLoraState`
variables of the module, so ``lm.update(grads)`` (PEFT's ``update_and_allocate``, after the
optimizer step, with that step's gradients) runs inside ``nnx.jit`` and its state is
checkpointed with the module's.

>>> import jax, jax.numpy as jnp, optax, lora_jax
>>> from flax import nnx
>>> model = nnx.Sequential(nnx.Linear(6, 6, rngs=nnx.Rngs(0)), nnx.relu,
...                        nnx.Linear(6, 4, rngs=nnx.Rngs(1)))
>>> alloc = lora_jax.adalora.Allocator(total_steps=6, tinit=1, tfinal=2, delta_t=1)
>>> lm = lora_jax.nnx.AdaLoRA(model, init_r=3, target_r=1, allocator=alloc, rngs=nnx.Rngs(2))
>>> opt = nnx.Optimizer(lm, optax.adam(1e-2), wrt=lora_jax.nnx.LoraParam)
>>> x, y = jax.random.normal(jax.random.key(3), (8, 6)), jnp.ones((8, 4))
>>> @nnx.jit
... def step(lm, opt):
...     loss_fn = lambda lm: jnp.mean((lm(x) - y) ** 2) + 0.1 * lm.orth_reg()
...     loss, grads = nnx.value_and_grad(loss_fn)(lm)
...     opt.update(lm, grads)
...     lm.update(grads)                   # importance, budget, masks: all inside the jit
...     return loss
>>> for _ in range(6):
...     _ = step(lm, opt)
>>> final, ranks = lm.finalize()          # a plain LoRA tree at the allocated ranks
>>> sum(ranks.values())                   # the target budget: target_r per module
2
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax import adalora, merging
from lora_jax.leaves import leaves
from lora_jax.nnx.module import LoRA, _split
from lora_jax.nnx.variables import AdaLoraState, assign, unpack

PyTree = Any


class AdaLoRA(LoRA):
    """An NNX model with AdaLoRA adapters (P·diag(E)·Q) and their rank allocator.

    Train it like :class:`LoRA` (the adapters are :class:`LoraParam` variables), add
    ``lm.orth_reg()`` to the loss, and call ``lm.update(grads)`` after each optimizer step.
    ``lm.finalize()`` gives the plain LoRA tree at the allocated ranks; ``lm.merge()`` folds
    the masked adapters into the model.

    Args:
      model: the ``nnx.Module`` to adapt.
      init_r: the starting rank of every module.
      target_r: the average rank after pruning.
      allocator: a :class:`lora_jax.adalora.Allocator` (``total_steps``, ``tinit``,
        ``tfinal``, ``delta_t``, ...).
      rngs: ``nnx.Rngs``, as for :class:`LoRA`.
      **kwargs: as for :class:`LoRA` (``alpha``, ``quantize``, ``targets``, ``exclude``,
        ``rules``, ``dropout``, ``layouts``, ``strict``, ...); the output head is adapted
        by default, as there. ``init``: a scheme AdaLoRA supports (see
        :func:`lora_jax.adalora.init`).

    Raises:
      TypeError: ``allocator`` is not an ``Allocator``; as for :class:`LoRA` otherwise.
      ValueError: ``dora=True``, or an init scheme AdaLoRA does not support.
    """

    def __init__(self, model: nnx.Module, init_r: int = 12, target_r: int = 8, *,
                 allocator: adalora.Allocator, rngs: nnx.Rngs, alpha: float | None = None,
                 quantize: str | None = None, block_size: int = 64, double_quant: bool = True,
                 strict: bool = False, compute_dtype: Any = None, method: Any = "__call__",
                 modules_to_save: Any = None, **kwargs: Any):
        if not isinstance(allocator, adalora.Allocator):
            raise TypeError(f"AdaLoRA: allocator must be a lora_jax.adalora.Allocator, got a "
                            f"{type(allocator).__name__}")
        if kwargs.get("dora"):
            raise ValueError("AdaLoRA: dora=True is not supported: AdaLoRA adapters are "
                             "P·diag(E)·Q without DoRA's magnitude (use lora_jax.nnx.LoRA)")
        kwargs.pop("dora", None)
        graphdef, params, rest = _split(model, rngs, "AdaLoRA")
        lora = adalora.init(params, init_r, target_r, key=rngs.params(), alpha=alpha, **kwargs)
        self._wrap(graphdef, params, rest, lora, rngs, quantize=quantize, block_size=block_size,
                   double_quant=double_quant, layouts=kwargs.get("layouts"), strict=strict,
                   compute_dtype=compute_dtype, method=method, modules_to_save=modules_to_save)
        self.allocator = allocator
        state = allocator.init(lora)
        arrays, self.state_def = jax.tree.flatten(state)
        self.allocator_arrays = nnx.data([AdaLoraState(x) for x in arrays])
        self.step = AdaLoraState(jnp.zeros((), jnp.int32))

    def allocator_state(self) -> adalora.AllocatorState:
        """The allocator's state as :class:`lora_jax.adalora.AllocatorState` (for
        ``adalora.finalize``, or a ``checkpoint.Manager``)."""
        return jax.tree.unflatten(self.state_def, [v.get_value() for v in self.allocator_arrays])

    def set_allocator_state(self, state: adalora.AllocatorState,
                            step: jax.typing.ArrayLike | None = None) -> None:
        """Loads an allocator state (from a checkpoint, to resume), and the step counter.

        Raises:
          ValueError: ``state`` does not fit this module's adapters.
        """
        arrays, tdef = jax.tree.flatten(state)
        if tdef != self.state_def:
            raise ValueError(f"set_allocator_state: the state does not fit this module's "
                             f"adapters: {tdef} != {self.state_def}")
        for v, x in zip(self.allocator_arrays, arrays):
            if tuple(jnp.shape(x)) != tuple(v.get_value().shape):
                raise ValueError(f"set_allocator_state: an array of shape {jnp.shape(x)} where "
                                 f"the state has {v.get_value().shape}")
            v.set_value(jnp.asarray(x))
        if step is not None:
            self.step.set_value(jnp.asarray(step, jnp.int32))

    def update(self, grads: Any, step: jax.typing.ArrayLike | None = None) -> None:
        """One allocation step (PEFT's ``update_and_allocate``), after the optimizer step.

        Args:
          grads: the gradients of that step: the ``nnx.State`` that ``nnx.grad`` returned for
            this module, or a plain LoRA tree of gradients.
          step: the step number; default the module's own counter (``lm.step``), which starts
            at 0 and counts the calls.

        Raises:
          ValueError: ``grads`` do not fit the adapters, naming the path.
        """
        g = self._grad_tree(grads)
        s = self.step.get_value() if step is None else jnp.asarray(step, jnp.int32)
        lora, state = self.allocator.update(self.adapters(), self.allocator_state(), g, s)
        self._set_lora(lora)
        for v, x in zip(self.allocator_arrays, jax.tree.leaves(state)):
            v.set_value(x)
        self.step.set_value(s + 1)

    def orth_reg(self, kind: str = "peft") -> jax.Array:
        """:func:`lora_jax.adalora.orth_reg` of the adapters, to add to the loss."""
        return adalora.orth_reg(self.adapters(), kind=kind)

    def finalize(self) -> tuple[dict, dict[str, int]]:
        """:func:`lora_jax.adalora.finalize`: ``(plain LoRA tree, {path: rank})``."""
        return adalora.finalize(self.adapters(), self.allocator_state())

    def _set_lora(self, lora: PyTree) -> None:
        assign(self.lora, self.lora_defs, lora)

    def _grad_tree(self, grads: Any) -> PyTree:
        if _lora_leaves(grads):
            merging.check_fits(self.base(), grads, where="AdaLoRA.update: grads")
            return grads
        try:
            sub = grads["lora"]
        except (KeyError, TypeError):
            raise ValueError("AdaLoRA.update: grads must be the nnx.State that nnx.grad returned"
                             " for this module (with its 'lora' adapters), or a LoRA tree of "
                             f"gradients; got a {type(grads).__name__}") from None
        return unpack(sub, self.lora_defs)


def _lora_leaves(tree: Any) -> dict:
    try:
        return leaves(tree)
    except TypeError:
        return {}


__all__ = ["AdaLoRA"]
