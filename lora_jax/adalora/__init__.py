"""AdaLoRA: SVD-shaped adapters whose rank budget is allocated during training.

Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (ICLR 2023,
arXiv 2303.10512), with Hugging Face PEFT's ``AdaLoraModel``/``RankAllocator`` as the reference
behaviour. Each targeted kernel gets ``delta = scale * P @ diag(E) @ Q`` at a fixed maximum rank
``init_r``; pruning zeroes entries of ``E`` (the paper's Lambda), so shapes never change and a
jitted train step never recompiles. :func:`finalize` then cuts every module to its surviving rank
and returns a plain :class:`lora_jax.LoraWeight` tree.

Where PEFT (``peft/tuners/adalora``) is followed: the scaling ``alpha / (init_r + 1e-5)``
(``SVDLinear.forward``), the init, the budget schedule, the importance EMAs and the masking
rule (``RankAllocator``), the phases (``AdaLoraModel.update_and_allocate``) and the default
regulariser (``AdaLoraModel.forward``). Beyond PEFT: a target budget equal to the initial one
prunes nothing (``torch.kthvalue`` with k = 0 raises), and ``Allocator(sticky=True)`` keeps
pruned triplets pruned.

>>> import jax, jax.numpy as jnp, optax
>>> from lora_jax import adalora
>>> params = {"fc": {"kernel": jnp.ones((6, 4))}, "out": {"kernel": jnp.ones((4, 3))}}
>>> lora = adalora.init(params, init_r=3, target_r=1, key=jax.random.key(0))
>>> alloc = adalora.Allocator(total_steps=6, tinit=1, tfinal=2, delta_t=1)
>>> state = alloc.init(lora)
>>> def loss(l):  # a stand-in for the task loss
...     d = l["fc"]["kernel"].delta() @ l["out"]["kernel"].delta()
...     return jnp.sum((d - 1.0) ** 2) + 0.5 * adalora.orth_reg(l)
>>> opt = optax.adam(1e-2); opt_state = opt.init(lora)
>>> @jax.jit
... def train_step(lora, opt_state, state, step):
...     grads = jax.grad(loss)(lora)
...     updates, opt_state = opt.update(grads, opt_state)
...     lora = optax.apply_updates(lora, updates)
...     lora, state = alloc.update(lora, state, grads, step)
...     return lora, opt_state, state
>>> for step in range(6):
...     lora, opt_state, state = train_step(lora, opt_state, state, step)
>>> final, ranks = adalora.finalize(lora, state)
>>> sum(ranks.values())   # the target budget: target_r per module
2
"""

from lora_jax.adalora.allocator import Allocator, AllocatorState, apply_mask
from lora_jax.adalora.final import finalize
from lora_jax.adalora.leaf import AdaLoraWeight, init
from lora_jax.adalora.regularizer import orth_reg

__all__ = [
    "AdaLoraWeight",
    "Allocator",
    "AllocatorState",
    "apply_mask",
    "finalize",
    "init",
    "orth_reg",
]
