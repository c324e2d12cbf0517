"""Init schemes, each declared once: its name, how it draws the factors, and what it does to
the base.

Every wrapper (:func:`lora_jax.init`, ``lora_jax.nnx.LoRA``/``AdaLoRA``,
:func:`lora_jax.adalora.init`, :func:`lora_jax.stack`) asks this registry instead of testing
names: whether the model only starts unchanged on a *residual* base (PiSSA, OLoRA: the frozen
base becomes ``W − s·A·B``; LoftQ: a quantized base fitted with the factors), whether the
scheme runs on an already quantized kernel, and whether AdaLoRA can start from it.

>>> get("olora", "example").changes_base, get("default", "example").changes_base
(True, False)
>>> get("svd", "example")
Traceback (most recent call last):
...
ValueError: example: unknown init scheme 'svd'; registered: ['default', 'gaussian', ...]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lora_jax import layouts as Lay
from lora_jax import protocols


class LeafSpec(NamedTuple):
    """What a factor function gets for one kernel: its arrays' shapes and the LoRA scale."""

    kernel: Any  # the base leaf (dense array or a quantized BaseLeaf)
    roles: str  # one of "s"/"i"/"o" per kernel axis
    stack: tuple[int, ...]
    n_in: int  # the input axes, flattened
    n_out: int  # the output axes, flattened
    r: int
    a_shape: tuple[int, ...]  # (*stack, *in, r)
    b_shape: tuple[int, ...]  # (*stack, r, *out)
    scale: float  # alpha / r (alpha / sqrt(r) with rsLoRA)


#: ``factors(key, spec, dtype) -> (A, B)`` in the shapes of ``spec``.
Factors = Callable[[jax.Array, LeafSpec, Any], tuple[jax.Array, jax.Array]]
#: ``draw(key, shape, dtype) -> array``: AdaLoRA's P or Q (its E starts at zero).
Draw = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class InitScheme:
    """One init scheme and the facts the wrappers need about it.

    Attributes:
      name: the value of ``init=``.
      factors: draws ``(A, B)`` for one kernel; ``None`` for a scheme that builds its own
        base together with the factors (``builder`` names the function to call instead).
      changes_base: the model starts unchanged only on a residual base (``W − s·A·B``, or a
        base the scheme returns): such an adapter is only right on that base.
      quantized_base: the scheme runs on an already quantized kernel and the model starts as
        the quantized model (a decomposition of the kernel needs the dense weight instead).
      adalora: how AdaLoRA (``P·diag(E)·Q``, E = 0 at init) draws P and Q under this
        scheme; ``None``: AdaLoRA does not support it.
      builder: for ``factors=None``: the function that returns ``(base, lora)``.
    """

    name: str
    factors: Factors | None
    changes_base: bool = False
    quantized_base: bool = True
    adalora: Draw | None = None
    builder: str = ""


_SCHEMES: dict[str, InitScheme] = {}


def register(scheme: InitScheme) -> InitScheme:
    """Adds ``scheme`` to the registry.

    Raises:
      TypeError: not an :class:`InitScheme`. ValueError: its name is registered already, or
        it has neither ``factors`` nor ``builder``.
    """
    if not isinstance(scheme, InitScheme):
        raise TypeError(f"init_schemes.register: expected an InitScheme, got a "
                        f"{type(scheme).__name__}")
    if not isinstance(scheme.name, str) or not scheme.name:
        raise ValueError(f"init_schemes.register: name must be a non-empty string, got "
                         f"{scheme.name!r}")
    if scheme.name in _SCHEMES:
        raise ValueError(f"init_schemes.register: init scheme {scheme.name!r} is registered "
                         "already")
    if scheme.factors is None and not scheme.builder:
        raise ValueError(f"init_schemes.register: {scheme.name!r} needs factors or a builder")
    _SCHEMES[scheme.name] = scheme
    return scheme


def names() -> tuple[str, ...]:
    """The registered scheme names, sorted."""
    return tuple(sorted(_SCHEMES))


def get(name: Any, where: str) -> InitScheme:
    """The scheme registered as ``name``; errors start with ``where``.

    Raises:
      TypeError: ``name`` is not a string. ValueError: no such scheme (listing the
        registered ones).
    """
    if not isinstance(name, str):
        raise TypeError(f"{where}: init must be a string naming an init scheme, got "
                        f"{name!r} ({type(name).__name__}); registered: {list(names())}")
    scheme = _SCHEMES.get(name)
    if scheme is None:
        raise ValueError(f"{where}: unknown init scheme {name!r}; registered: {list(names())}")
    return scheme


def of_leaf(leaf: Any) -> InitScheme | None:
    """The scheme that changed the base of an adapter leaf (its static ``residual_init``
    field), or ``None`` if it records none: the adapter works on the model's own base (or was
    built by hand, loaded from a PEFT file or an older checkpoint)."""
    name = getattr(leaf, "residual_init", "")
    return _SCHEMES.get(name) if name else None


def require_shared_base(leaf: Any, name: str, path: str, where: str) -> None:
    """Raises if ``leaf`` was initialised by a scheme that changed the base: it is right only
    on its own residual base, so sharing a base with other adapters (a stack, a combination)
    would be silently wrong."""
    scheme = of_leaf(leaf)
    if scheme is not None and scheme.changes_base:
        raise ValueError(
            f"{where}: adapter {name!r} at {path!r} was initialised with init={scheme.name!r}, "
            "which changed the base (it is only right on its own residual base), while the "
            "adapters here share one base. Fold it in first: lora_jax.merge(its_base, adapter) "
            "gives a plain model to use as the base")


def peft_residual_init(value: Any) -> str:
    """The registered base-changing scheme a PEFT config's ``init_lora_weights`` names
    (``"pissa"``, ``"pissa_niter_4"``, ``"olora"``), or ``""``."""
    if not isinstance(value, str):
        return ""
    scheme = _SCHEMES.get(value.split("_")[0])
    return scheme.name if scheme is not None and scheme.changes_base else ""


# ----------------------------------------------------------------------------------------
# The built-in schemes


def _flat(key, shape, dtype, draw):
    # Drawn flat, then reshaped: one compiled sampler per size, not per shape.
    return draw(key, (math.prod(shape),), dtype).reshape(shape)


def _default(key, s: LeafSpec, dtype):
    """PEFT's default: A kaiming-uniform with a = √5 (bound 1/√fan_in), B zeros."""
    bound = 1.0 / math.sqrt(s.n_in)
    draw = lambda k, shape, dt: jax.random.uniform(k, shape, dt, -bound, bound)  # noqa: E731
    return _flat(key, s.a_shape, dtype, draw), jnp.zeros(s.b_shape, dtype)


def _gaussian(key, s: LeafSpec, dtype):
    """PEFT's ``"gaussian"``: A ~ N(0, (1/r)²), B zeros."""
    return _flat(key, s.a_shape, dtype, jax.random.normal) / s.r, jnp.zeros(s.b_shape, dtype)


def _zeros(key, s: LeafSpec, dtype):
    return jnp.zeros(s.a_shape, dtype), jnp.zeros(s.b_shape, dtype)


def _adalora_normal(key, shape, dtype):
    """PEFT ``AdaLoraLayer.reset_lora_parameters``: N(0, 0.02²)."""
    return 0.02 * _flat(key, shape, dtype, jax.random.normal)


def _adalora_zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def _matrix(s: LeafSpec) -> jax.Array:
    """The kernel as ``(*stack, in, out)`` float32 matrices."""
    w = jnp.transpose(protocols.dense(s.kernel, jnp.float32), Lay.to_canonical(s.roles))
    return w.reshape(s.stack + (s.n_in, s.n_out))


def _olora(key, s: LeafSpec, dtype):
    """Büyükakyüz 2024 (PEFT ``LoraLayer.olora_init`` on the ``(out, in)`` weight):
    ``A = Rᵣ``, ``B = Qᵣ`` of its QR decomposition."""
    q, r_ = jnp.linalg.qr(jnp.swapaxes(_matrix(s), -1, -2))  # q (out, k), r (k, in)
    a = jnp.swapaxes(r_[..., : s.r, :], -1, -2).reshape(s.a_shape).astype(dtype)
    b = jnp.swapaxes(q[..., :, : s.r], -1, -2).reshape(s.b_shape).astype(dtype)
    return a, b


def _pissa(key, s: LeafSpec, dtype):
    """Meng et al. 2024 (PEFT ``"pissa"``): the top-r SVD of the kernel, √(S/scale) on each
    side, so that ``scale·A·B`` is that rank-r part."""
    u, sv, vt = jnp.linalg.svd(_matrix(s), full_matrices=False)
    root = jnp.sqrt(sv[..., : s.r] / s.scale)
    a = (u[..., :, : s.r] * root[..., None, :]).reshape(s.a_shape).astype(dtype)
    b = (root[..., :, None] * vt[..., : s.r, :]).reshape(s.b_shape).astype(dtype)
    return a, b


register(InitScheme("default", _default, adalora=_adalora_normal))
register(InitScheme("gaussian", _gaussian))
register(InitScheme("zeros", _zeros, adalora=_adalora_zeros))
register(InitScheme("pissa", _pissa, changes_base=True, quantized_base=False))
register(InitScheme("olora", _olora, changes_base=True, quantized_base=False))
register(InitScheme("loftq", None, changes_base=True, quantized_base=False,
                    builder="lora_jax.loftq.init"))


def residual_base(params: Any, lora: Any) -> Any:
    """The base an adapter tree starts unchanged on: ``W − s·A·B`` at every path whose leaf's
    scheme changed the base (PiSSA, OLoRA; for DoRA leaves the linear part ``s·A·B``), other
    paths as they are. A LoftQ base comes from :func:`lora_jax.loftq.init` instead.

    Call it on the tree ``init`` returned, before training: the residual is ``W`` minus the
    *initial* update, which trained factors no longer give."""
    from lora_jax.leaves import from_leaves, leaves
    from lora_jax.merging import unmerge

    moved = {}
    for path, leaf in leaves(lora).items():
        scheme = of_leaf(leaf)
        if scheme is not None and scheme.changes_base:
            if scheme.factors is None:
                raise ValueError(f"residual_base: {path!r} was initialised with "
                                 f"init={scheme.name!r}, whose base {scheme.builder} returns")
            moved[path] = leaf.linear_part()
    return unmerge(params, from_leaves(moved)) if moved else params
