"""Many adapters on one base: stacks, per-example routing, training K at once, combining.

>>> import jax, jax.numpy as jnp, lora_jax
>>> p = {"w": {"kernel": jax.random.normal(jax.random.key(0), (4, 3))}}
>>> s = lora_jax.stack({"x": lora_jax.init(p, r=2, key=jax.random.key(1)),
...                     "y": lora_jax.init(p, r=1, key=jax.random.key(2))})
>>> f = lora_jax.apply(lambda p, x: x @ p["w"]["kernel"])
>>> f(p, s, jnp.ones((3, 4)), adapter_ids=["x", "__base__", "y"]).shape
(3, 3)
"""

from lora_jax.multi.combine import METHODS, combine
from lora_jax.multi.files import load, load_peft, save, save_peft
from lora_jax.multi.leaf import ROUTINGS, StackedLora
from lora_jax.multi.optim import adam, scale_by_slot
from lora_jax.multi.stack import (
    BASE,
    adapter_ids,
    add,
    is_stacked,
    names,
    remove,
    replace,
    stack,
    unstack,
    unstack_untrimmed,
)

__all__ = [
    "BASE",
    "METHODS",
    "ROUTINGS",
    "StackedLora",
    "adam",
    "adapter_ids",
    "combine",
    "add",
    "is_stacked",
    "load",
    "load_peft",
    "names",
    "remove",
    "replace",
    "save",
    "save_peft",
    "scale_by_slot",
    "stack",
    "unstack",
    "unstack_untrimmed",
]
