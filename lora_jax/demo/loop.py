"""The demos' small training loop and its readouts: steps, progress, compiled memory, files.

:func:`make_step` builds a jitted optimizer step from a loss, :func:`train` runs it with a
progress bar, :func:`peak_bytes` reads the compiled step's memory (the benchmarks use it too)
and :func:`save_tree` writes a tree's arrays to disk. The progress bar needs tqdm, which is in
the ``demo`` extra, not a dependency of ``lora_jax`` itself (:func:`require`).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time

import jax
import numpy as np
import optax

import lora_jax

DEMO_EXTRA = 'pip install "lora-jax[demo]"'


def require(*modules: str) -> None:
    """Raises a clear error when the demo's optional dependencies are not installed.

    Raises:
      ModuleNotFoundError: naming the missing modules and the extra that installs them.
    """
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(
            f"the lora_jax demo needs {' and '.join(missing)}, which lora_jax itself does not "
            f"install: {DEMO_EXTRA} (from a checkout: pip install \".[demo]\")",
            name=missing[0])


def make_step(tx, loss_of, post=None):
    """A jitted ``step(trainable, opt, *extra, base, tok) -> (trainable, opt, *extra, loss)``.

    ``loss_of(trainable, base, tok)`` is differentiated with respect to ``trainable``; ``post``
    (AdaLoRA's allocator) maps ``(trainable, grads, *extra)`` to ``(trainable, extra)`` after
    the update. The trainable tree and the optimizer state are donated.
    """
    def step(trainable, opt, *rest):
        *extra, base, tok = rest  # base and tok are read-only arguments, not constants
        loss, g = jax.value_and_grad(loss_of)(trainable, base, tok)
        upd, opt = tx.update(g, opt, trainable)
        trainable = optax.apply_updates(trainable, upd)
        if post is not None:
            trainable, extra = post(trainable, g, *extra)
        return (trainable, opt, *extra, loss)

    return jax.jit(step, donate_argnums=(0, 1))


def train(step, state, data, steps, desc, quiet=False, const=()):
    """Runs ``*state, loss = step(*state, *const, batch)``; returns state, losses, median s."""
    require("tqdm")
    from tqdm.auto import tqdm

    times, losses = [], []
    bar = tqdm(range(steps), desc=desc, disable=quiet, leave=True, ncols=88, mininterval=1.0)
    for _ in bar:
        tok = next(data)
        t0 = time.perf_counter()
        *state, loss = step(*state, *const, tok)
        loss = float(loss)  # blocks until the step is done
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    return state, losses, statistics.median(times[2:] if len(times) > 4 else times)


def peak_bytes(compiled) -> float:
    """Arguments + temporaries + outputs − aliased bytes of a compiled program.

    NaN where the backend gives no ``memory_analysis()``.
    """
    mem = compiled.memory_analysis()
    if mem is None:
        return float("nan")
    return (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes)


def save_tree(path: str, tree) -> int:
    """Saves the arrays of a tree as safetensors; returns bytes on disk."""
    from safetensors.numpy import save_file

    from lora_jax.checkpoint import disk_size

    flat = {p: np.asarray(x) for p, x in lora_jax.paths.flatten(tree, is_leaf=lambda x: False)}
    os.makedirs(path, exist_ok=True)
    save_file(flat, os.path.join(path, "weights.safetensors"))
    return disk_size(path)
