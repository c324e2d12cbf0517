"""The control: a plain Flax Linen MLP of ``nn.Dense`` layers (the layout lora_jax grew up on).

=========================  ========  =====
path                        shape     roles
=========================  ========  =====
params/Dense_0/kernel       (12, 32)  i o
params/Dense_1/kernel       (32, 32)  i o
params/Dense_2/kernel       (32, 5)   i o
=========================  ========  =====

Float input (B, T, 12), so gradients with respect to the input can be checked too.
``make(key)`` gives ``(model.apply, params, (x,))``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax


class MLP(nn.Module):
    features: Sequence[int] = (32, 32, 5)

    @nn.compact
    def __call__(self, x):
        for i, feat in enumerate(self.features):
            x = nn.Dense(feat)(x)
            if i != len(self.features) - 1:
                x = nn.relu(x)
        return x


def make(key, batch: int = 4, seq: int = 6):
    """``(model.apply, params, (x,))``."""
    model = MLP()
    x = jax.random.normal(jax.random.fold_in(key, 1), (batch, seq, 12))
    params = jax.jit(model.init)(key, x)
    return model.apply, params, (x,)
