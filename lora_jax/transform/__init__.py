"""``apply``: run unchanged model code with a frozen base plus adapters, the fast way.

``apply(fn)`` traces ``fn`` to a jaxpr (``jax.make_jaxpr``) and evaluates it with an
interpreter that follows every targeted weight through casts, reshapes and transposes. Where a
``dot_general`` consumes one, it emits :func:`lora_jax.fast_dot.lora_dot_general`, a custom-VJP
matmul that never forms the dense weight gradient. Calls, ``remat``, ``custom_jvp``, ``scan``
(stacked layers), ``cond`` and ``while`` are entered recursively; embedding lookups (``gather``)
get ``A[ids] @ B``. Any other use of a targeted weight gets the merged weight ``W0 + s·A·B``
for that use only (correct, slower), or an error with ``strict=True``.

>>> import jax, jax.numpy as jnp, flax.linen as nn, lora_jax
>>> model = nn.Dense(3)
>>> x = jnp.ones((2, 4))
>>> params = model.init(jax.random.key(0), x)
>>> lora = lora_jax.init(params, r=2, key=jax.random.key(1))
>>> f = lora_jax.apply(model.apply)
>>> bool(jnp.allclose(f(params, lora, x), model.apply(lora_jax.merge(params, lora), x)))
True
"""

# The rules register themselves with the interpreter when imported.
from lora_jax.transform import control_flow as _control_flow  # noqa: F401
from lora_jax.transform import rules as _rules  # noqa: F401
from lora_jax.transform.api import apply, report
from lora_jax.transform.interpreter import LoraFallbackError
from lora_jax.transform.report import Report, Use, WeightReport

__all__ = [
    "LoraFallbackError",
    "Report",
    "Use",
    "WeightReport",
    "apply",
    "report",
]
