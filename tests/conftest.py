"""Shared fixtures: small random models of every kind the transform must handle."""

import jax
import jax.numpy as jnp
import pytest


def randomize(lora, key, scale=0.1):
    """Gives B (and every factor) fresh non-zero values so that LoRA changes the output."""
    leaves, tree = jax.tree.flatten(lora)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    )


def max_rel_err(a_tree, b_tree):
    errs = []
    for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)):
        a = jnp.asarray(a, jnp.float32)
        b = jnp.asarray(b, jnp.float32)
        errs.append(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30)))
    return max(errs)


@pytest.fixture
def key():
    return jax.random.key(0)
