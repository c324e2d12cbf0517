"""Counting adapter parameters, and a summary for logs that is data first.

>>> import jax, jax.numpy as jnp, lora_jax
>>> p = {"a": {"kernel": jnp.ones((16, 16))}, "b": {"kernel": jnp.ones((16, 8))}}
>>> s = summary(lora_jax.init(p, r=2, key=jax.random.key(0)), p)
>>> s.trainable, s.base, s.ranks
(112, 384, {2: 2})
>>> print(s)
LoRA: 112 trainable params (29.17% of 384 base) in 2 modules, r=2 x2, scale 1
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from lora_jax import paths as P
from lora_jax.leaves import leaves

PyTree = Any


def param_count(lora: PyTree) -> int:
    """Number of trainable adapter parameters (array elements) in a LoRA tree."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(lora)))


def base_param_count(params: PyTree) -> int:
    """Number of parameters in a base tree (quantized leaves count their logical size)."""
    return int(sum(math.prod(getattr(x, "shape", ())) for _, x in P.flatten(params)))


@dataclasses.dataclass(frozen=True)
class ModuleSummary:
    """One adapted kernel: its path, method, rank, layout, kernel shape, scale, parameters."""

    path: str
    kind: str
    r: int
    roles: str
    kernel_shape: tuple[int, ...]
    scale: float
    params: int

    def __str__(self) -> str:
        return (f"{self.path}: r={self.r} kernel {self.kernel_shape} roles {self.roles} "
                f"scale {self.scale:g} params {self.params:,}")


@dataclasses.dataclass(frozen=True)
class Summary:
    """What :func:`summary` returns; ``str()`` is the one-line log summary (one more line per
    module with ``verbose``).

    Attributes:
      kind: the adapters' method ("LoRA", "AdaLoRA"; "mixed" if several).
      trainable: adapter parameters.
      base: base parameters, if a base was given.
      modules: a :class:`ModuleSummary` per adapted kernel.
      verbose: whether ``str()`` lists the modules.
    """

    kind: str
    trainable: int
    base: int | None
    modules: tuple[ModuleSummary, ...]
    verbose: bool = False

    @property
    def ranks(self) -> dict[int, int]:
        """``{rank: number of modules}``."""
        out: dict[int, int] = {}
        for m in self.modules:
            out[m.r] = out.get(m.r, 0) + 1
        return out

    @property
    def percent_of_base(self) -> float | None:
        return None if self.base is None else 100.0 * self.trainable / max(self.base, 1)

    def __str__(self) -> str:
        head = f"{self.kind}: " if self.modules else ""
        line = f"{head}{self.trainable:,} trainable params"
        if self.base is not None:
            line += f" ({self.percent_of_base:.2f}% of {self.base:,} base)"
        ranks = ", ".join(f"r={r} x{c}" for r, c in sorted(self.ranks.items(), reverse=True))
        scales = ", ".join(f"{s:g}" for s in sorted({m.scale for m in self.modules}))
        line = f"{line} in {len(self.modules)} modules, {ranks}, scale {scales}"
        if not self.verbose:
            return line
        return "\n".join([line] + [f"  {m}" for m in self.modules])


def summary(lora: PyTree, base: PyTree | None = None, *, verbose: bool = False) -> Summary:
    """Trainable parameters, share of the base, modules, ranks and scales, as data.

    ``str(summary(...))`` is a one-line summary for logs; with ``verbose=True`` a line per
    module follows.
    """
    lmap = leaves(lora)
    kinds = {x.kind for x in lmap.values()}
    modules = tuple(
        ModuleSummary(path=p, kind=x.kind, r=x.r, roles=x.layout,
                      kernel_shape=tuple(x.kernel_shape), scale=float(x.scale),
                      params=int(sum(math.prod(a.shape) for a in jax.tree.leaves(x))))
        for p, x in lmap.items())
    return Summary(kind=kinds.pop() if len(kinds) == 1 else "mixed" if kinds else "",
                   trainable=param_count(lora),
                   base=None if base is None else base_param_count(base),
                   modules=modules, verbose=verbose)
