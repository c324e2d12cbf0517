"""The demos' data: texts that ship with Python, as byte tokens, in random and held-out batches.

Nothing is downloaded: the pretraining text is the Python language reference
(``pydoc_data.topics``) and the adaptation text the docstrings of a set of stdlib modules. The
built-in GPT reads them byte by byte (:func:`split_tokens`); SmolLM2 tokenizes
:func:`pretrain_text` itself. Benchmarks use the same batches.
"""

from __future__ import annotations

import inspect

import jax.numpy as jnp
import numpy as np

ADAPT_MODULES = ("json", "csv", "argparse", "textwrap", "itertools", "functools", "collections",
                 "pathlib", "shutil", "string", "heapq", "bisect", "difflib", "statistics")


def pretrain_text() -> bytes:
    """The Python language reference shipped with every Python install."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics)).encode("utf-8")


def adapt_text(modules: tuple[str, ...] = ADAPT_MODULES) -> bytes:
    """Docstrings of stdlib modules and their public functions: a different style of text."""
    import importlib

    parts = []
    for name in modules:
        mod = importlib.import_module(name)
        parts.append(inspect.getdoc(mod) or "")
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(mod, attr, None))
            if doc and len(doc) > 80:
                parts.append(f"{name}.{attr}: {doc}")
    return "\n\n".join(dict.fromkeys(parts)).encode("utf-8")


def split_tokens(text: bytes, held_out: float = 0.1):
    """Bytes as int32 tokens, split into ``(train, held_out)``; the last fraction is held out."""
    arr = np.frombuffer(text, np.uint8).astype(np.int32)
    n = int(len(arr) * (1 - held_out))
    return arr[:n], arr[n:]


def batches(tokens: np.ndarray, batch: int, seq: int, seed: int):
    """An endless, seeded stream of ``(batch, seq)`` windows at random offsets."""
    rng = np.random.default_rng(seed)
    while True:
        idx = rng.integers(0, len(tokens) - seq, batch)
        yield jnp.asarray(np.stack([tokens[i : i + seq] for i in idx]))


def eval_batches(tokens: np.ndarray, batch: int, seq: int, n: int = 4):
    """``n`` batches of evenly spaced windows: the same held-out set on every run."""
    starts = np.linspace(0, len(tokens) - seq - 1, batch * n).astype(int)
    rows = np.stack([tokens[i : i + seq] for i in starts])
    return [jnp.asarray(rows[i * batch : (i + 1) * batch]) for i in range(n)]
