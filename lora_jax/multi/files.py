"""Stacks on disk: one PEFT adapter folder per name, or one orbax checkpoint.

>>> import jax, jax.numpy as jnp, lora_jax, tempfile, os
>>> p = {"w": {"kernel": jnp.ones((4, 3))}}
>>> s = lora_jax.stack({"x": lora_jax.init(p, r=2, key=jax.random.key(0))})
>>> d = tempfile.mkdtemp()
>>> save_peft(d, s); sorted(os.listdir(d))
['x']
>>> lora_jax.multi.names(load_peft(d, p))
('x',)
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

from lora_jax.leaves import leaves
from lora_jax.multi.stack import is_stacked, stack, unstack
from lora_jax.multi.stack import names as stack_names

PyTree = Any


def save_peft(directory: str | os.PathLike, tree: PyTree, **kwargs) -> None:
    """Writes each adapter of the stack as a PEFT adapter folder ``directory/NAME``
    (padding cut off; ``kwargs`` go to :func:`lora_jax.peft.save`: ``name_map``, ...)."""
    from lora_jax import peft

    for name, lora in unstack(tree).items():
        peft.save(pathlib.Path(directory) / name, lora, **kwargs)


def load_peft(directory: str | os.PathLike, params: PyTree, names: Sequence[str] | None = None,
              **kwargs) -> PyTree:
    """A stack of the PEFT adapter folders ``directory/NAME`` (every subfolder with an
    ``adapter_config.json``, sorted, unless ``names`` are given); ``kwargs`` go to
    :func:`lora_jax.peft.load`."""
    from lora_jax import peft

    root = pathlib.Path(directory)
    if names is None:
        names = sorted(p.name for p in root.iterdir() if (p / "adapter_config.json").is_file())
    if not names and (root / "adapter_config.json").is_file():
        raise FileNotFoundError(f"load_peft: {str(root)!r} is one PEFT adapter folder, not a "
                                "folder of them; load it with lora_jax.peft.load (or stack "
                                "it: lora_jax.stack({name: lora_jax.peft.load(...)}))")
    if not names:
        raise FileNotFoundError(f"load_peft: no PEFT adapter folders in {str(root)!r}")
    return stack({n: peft.load(root / n, params, **kwargs) for n in names})


def save(path: str | os.PathLike, tree: PyTree, **kwargs) -> None:
    """One orbax checkpoint of the stack (:func:`lora_jax.checkpoint.save_adapter`)."""
    from lora_jax import checkpoint

    stack_names(tree)  # a stack, or a clear error
    checkpoint.save_adapter(path, tree, **kwargs)


def load(path: str | os.PathLike, **kwargs) -> PyTree:
    """The stack saved by :func:`save` (:func:`lora_jax.checkpoint.load_adapter`).

    Raises:
      ValueError: ``path`` holds a single adapter, not a stack (load that with
        :func:`lora_jax.checkpoint.load_adapter`).
    """
    from lora_jax import checkpoint

    tree = checkpoint.load_adapter(path, **kwargs)
    if not any(is_stacked(x) for x in leaves(tree).values()):
        raise ValueError(f"multi.load: {str(path)!r} holds a single adapter, not a stack of "
                         "them; load it with lora_jax.checkpoint.load_adapter (and stack it "
                         "with lora_jax.stack({name: adapter}) if you want a stack)")
    return tree
