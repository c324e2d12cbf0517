"""The orthogonality regulariser on AdaLoRA's P and Q, :func:`orth_reg` (paper Eq. 4, PEFT)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.adalora.leaf import flatten

PyTree = Any


def orth_reg(lora: PyTree, *, kind: str = "peft") -> jax.Array:
    """The orthogonality penalty on P and Q, to add to the loss (times a weight, PEFT: 0.5).

    ``kind="peft"`` (default) follows ``AdaLoraModel.forward``: the plain Frobenius norms
    ``||P^T P - I||`` and ``||Q Q^T - I||`` (PEFT's ``lora_A @ lora_A.T`` and
    ``lora_B.T @ lora_B``), averaged over all P and Q matrices. ``kind="paper"`` is the paper's
    Eq. 4 summed over modules: ``sum ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2``. Each stacked
    slice counts as one module. Computed in float32.

    >>> import jax, jax.numpy as jnp
    >>> from lora_jax import adalora
    >>> q = jnp.eye(2, 3) * jnp.array([[2.0], [1.0]])     # Q Q^T - I = diag(3, 0)
    >>> w = adalora.AdaLoraWeight(p=jnp.eye(4, 2), e=jnp.ones(2), q=q)
    >>> float(adalora.orth_reg({"k": w})), float(adalora.orth_reg({"k": w}, kind="paper"))
    (1.5, 9.0)
    """
    if kind not in ("peft", "paper"):
        raise ValueError(f"orth_reg kind must be 'peft' or 'paper', got {kind!r}")
    sq = []
    for w in flatten(lora)[1]:
        s, r = w.stack_shape, w.r
        p = w.p.astype(jnp.float32).reshape(s + (-1, r))
        q = w.q.astype(jnp.float32).reshape(s + (r, -1))
        for m in (jnp.matmul(jnp.swapaxes(p, -1, -2), p, precision="highest"),
                  jnp.matmul(q, jnp.swapaxes(q, -1, -2), precision="highest")):
            sq.append(jnp.sum((m - jnp.eye(r)) ** 2, axis=(-2, -1)).reshape(-1))
    sq = jnp.concatenate(sq)
    if kind == "paper":
        return jnp.sum(sq)
    pos = sq > 0  # sqrt with a zero (not NaN) gradient at an exactly orthonormal factor
    return jnp.mean(jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0))
