"""What :func:`lora_jax.report` returns: every use of every weight, and its route."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Use:
    """One use of a weight in the traced function, and how ``apply`` computes it.

    Attributes:
      primitive: the JAX primitive that reads the weight (``"dot_general"``, ``"gather"``,
        ``"scan"``, ...).
      route: ``"fast"`` (the dW-free LoRA matmul: one matmul with the merged weight, or
        ``x·W0 + s·(x·A)·B`` unmerged where the use has so few rows that merging costs more,
        see :func:`lora_jax.fast_dot.few_rows`), ``"fast-dropout"`` (its unmerged form with
        LoRA dropout), ``"fast-unmerged"`` (the unmerged form for per-example adapters),
        any of them with
        ``"+rescale"`` for a kind that rescales output units after it (DoRA), ``"grouped"``
        / ``"grouped-dropout"`` (a ``ragged_dot_general`` over a stack of experts as grouped
        matmuls, the adapter never merged), ``"gather"`` (``A[ids]·B`` for an embedding
        lookup),
        ``"dequantize"`` (a quantized base weight without adapter, dequantized at use, in a
        ``dot_general`` or ``ragged_dot_general``) or
        ``"fallback"`` (the merged weight ``W0 + s·A·B`` for this use: correct, slower).
      reason: why a use fell back; ``None`` otherwise.
    """

    primitive: str
    route: str
    reason: str | None = None

    def __str__(self) -> str:
        if self.route == "fallback":
            return f"fallback (merged weight) at {self.primitive}: {self.reason}"
        return f"{self.route}: {self.primitive}"


@dataclasses.dataclass(frozen=True)
class WeightReport:
    """How ``apply`` computes every use of one weight.

    Attributes:
      path: the parameter path.
      roles: the adapter's layout (``None`` for a quantized base weight without adapter).
      uses: every use, in program order; empty if the function never reads the weight.
    """

    path: str
    roles: str | None
    uses: tuple[Use, ...]

    @property
    def routes(self) -> list[str]:
        return [u.route for u in self.uses]

    @property
    def fast(self) -> bool:
        """True if the weight is used and no use falls back to the merged weight."""
        return bool(self.uses) and all(u.route != "fallback" for u in self.uses)

    def __str__(self) -> str:
        uses = "; ".join(str(u) for u in self.uses) or "unused"
        roles = "" if self.roles is None else f" [{self.roles}]"
        return f"{self.path}{roles}: {uses}"


@dataclasses.dataclass(frozen=True)
class Report:
    """What :func:`report` returns: ``weights[path]`` is a :class:`WeightReport` for every
    adapted weight and every quantized base weight the function reads."""

    weights: dict[str, WeightReport]

    def __getitem__(self, path: str) -> WeightReport:
        return self.weights[path]

    def __iter__(self):
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)

    @property
    def fallbacks(self) -> list[tuple[str, Use]]:
        """``(path, use)`` of every use computed with the merged weight."""
        return [(p, u) for p, w in self.weights.items() for u in w.uses if u.route == "fallback"]

    @property
    def unused(self) -> list[str]:
        """Adapted weights the function never reads."""
        return [p for p, w in self.weights.items() if not w.uses]

    def __str__(self) -> str:
        n_fast = sum(w.fast for w in self.weights.values())
        head = (f"{len(self.weights)} weights: {n_fast} on the fast path, "
                f"{len(self.fallbacks)} fallback uses, {len(self.unused)} unused")
        return "\n".join([head] + ["  " + str(w) for w in self.weights.values()])
