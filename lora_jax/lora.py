"""LoRA leaves, ``init``, ``merge`` and ``unmerge``.

A LoRA tree mirrors the parameter tree, holding a :class:`LoraWeight` at every targeted path
and nothing elsewhere. A kernel's axes are its stack, input and output axes (its *roles*, see
:mod:`lora_jax.layouts`: learned from the model by :func:`lora_jax.trace`, or from names).
Each leaf stores the factors with those axes in the kernel's own order within each group:

* ``a``: ``(*stack, *in_dims, r)``  (PEFT's ``lora_A.weight`` transposed)
* ``b``: ``(*stack, r, *out_dims)`` (PEFT's ``lora_B.weight`` transposed)

so that ``kernel + scale * tensordot(a, b, 1)``, laid out in the kernel's axis order, is the
adapted kernel, with ``scale = alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA).

>>> import jax, jax.numpy as jnp, lora_jax
>>> params = {"params": {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}}
>>> lora = lora_jax.init(params, r=2, key=jax.random.key(0))
>>> lora["params"]["Dense_0"]["kernel"].a.shape, lora["params"]["Dense_0"]["kernel"].b.shape
((4, 2), (2, 3))
"""

from __future__ import annotations

import difflib
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lora_jax import layouts as Lay
from lora_jax import protocols
from lora_jax import paths as P
from lora_jax import validation as V

PyTree = Any


class LowRankLeaf:
    """What the library needs from an adapter leaf (LoRA, AdaLoRA, ...).

    A subclass is a ``flax.struct.dataclass`` whose array fields all carry the stack axes
    first, and which provides:

    * ``factors() -> (A, B)`` with ``A: (*stack, *in_dims, r)`` and ``B: (*stack, r, *out_dims)``
      such that the weight update is ``scale * tensordot(A, B, 1)`` (batched over stack axes),
      laid out in the kernel's axes by :attr:`layout`;
    * static ``in_axes``, ``stack_axes`` (how many input and stack axes), ``roles`` (the
      kernel's layout, see :mod:`lora_jax.layouts`; ``""`` for the canonical
      ``(*stack, *in, *out)``), ``dropout``, and a ``scale`` property.
    """

    in_axes: int
    stack_axes: int
    roles: str
    dropout: float
    kind: ClassVar[str] = "LoRA"  # name shown by summary()
    peft_type: ClassVar[str] = "LORA"
    field_roles: ClassVar[dict[str, str]] = {}  # array field -> "in" | "out" | "rank"

    def hparams(self) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def check(self, where: str) -> None:
        """Raises if the leaf is not self-consistent: array fields, axis counts, the factors'
        chain, the roles string and every numeric hyperparameter."""
        V.leaf_arrays(self, where)
        sa = V.integer(self.stack_axes, f"{where}: stack_axes", low=0)
        ia = V.integer(self.in_axes, f"{where}: in_axes", low=1)
        for name, value in self.hparams().items():
            if not isinstance(value, bool):  # flags aside, hyperparameters are finite numbers
                V.number(value, f"{where}: {name}")
        V.dropout(self.dropout, f"{where}: dropout")
        a, b = jax.eval_shape(lambda leaf: leaf.factors(), self)
        V.factor_chain(where, tuple(a.shape), tuple(b.shape), sa, ia)
        try:
            self.layout  # the roles string fits the factors' stack/in/out axis counts
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def peft_matrices(self, index: tuple[int, ...]) -> dict[str, np.ndarray]:
        """The update's factors at one stack index as PEFT's matrices: ``lora_A`` ``(r, in)``
        and ``lora_B`` ``(out, r)`` with the input and output axes flattened."""
        a, b = (np.asarray(x[index]) for x in self.factors())
        r = a.shape[-1]
        return {"lora_A": a.reshape(-1, r).T, "lora_B": b.reshape(r, -1).T}

    def factors(self) -> tuple[jax.Array, jax.Array]:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def scale(self) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def r(self) -> int:
        return self.factors()[0].shape[-1]

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.factors()[0].shape[: self.stack_axes])

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.factors()[0].shape[self.stack_axes : -1])

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.factors()[1].shape[self.stack_axes + 1 :])

    @property
    def layout(self) -> str:
        """One role per kernel axis: ``"s"`` stack, ``"i"`` input, ``"o"`` output."""
        n = self.stack_axes + self.in_axes + len(self.out_shape)
        if not self.roles:
            return Lay.canonical(n, self.in_axes, self.stack_axes)
        r = self.roles
        if len(r) != n or r.count(Lay.STACK) != self.stack_axes or r.count(Lay.IN) != self.in_axes:
            raise ValueError(f"adapter roles {r!r} do not fit factors with {self.stack_axes} "
                             f"stack, {self.in_axes} input and {len(self.out_shape)} output axes")
        return r

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        s, i, o = iter(self.stack_shape), iter(self.in_shape), iter(self.out_shape)
        pick = {Lay.STACK: s, Lay.IN: i, Lay.OUT: o}
        return tuple(next(pick[c]) for c in self.layout)

    def delta(self, dtype=None) -> jax.Array:
        """The dense weight update ``scale * A @ B`` in the kernel's shape and axis order."""
        a, b = self.factors()
        s = self.stack_shape
        a2 = a.reshape(s + (math.prod(self.in_shape), a.shape[-1]))
        b2 = b.reshape(s + (b.shape[self.stack_axes], math.prod(self.out_shape)))
        d = (self.scale * jnp.matmul(a2, b2)).reshape(s + self.in_shape + self.out_shape)
        if self.roles and self.roles != Lay.canonical(d.ndim, self.in_axes, self.stack_axes):
            d = jnp.transpose(d, Lay.from_canonical(self.roles))
        return d if dtype is None else d.astype(dtype)

    def unstack_leading(self):
        """This adapter's metadata for one index of the kernel's first axis (a stack axis):
        the adapter of one layer inside a ``scan``, whose arrays the scan slices. Reads no
        array shapes, so it applies to the sliced leaf too."""
        if (self.roles and self.roles[0] != Lay.STACK) or (not self.roles and self.stack_axes < 1):
            raise ValueError(f"the kernel's first axis is not a stack axis (roles {self.roles!r}, "
                             f"{self.stack_axes} stack axes)")
        return self.replace(stack_axes=self.stack_axes - 1, roles=self.roles[1:])


@struct.dataclass
class LoraWeight(LowRankLeaf):
    """A LoRA adapter for one kernel: ``delta = scale * tensordot(a, b, 1)``.

    Attributes:
      a: ``(*stack, *in_dims, r)`` factor.
      b: ``(*stack, r, *out_dims)`` factor (zeros at init).
      alpha: LoRA alpha (static).
      rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r`` (static).
      in_axes: how many kernel axes are the input (static).
      stack_axes: how many kernel axes are stack axes, e.g. from ``nn.scan`` (static).
      dropout: dropout rate on the LoRA input path, as PEFT's ``lora_dropout`` (static).
      roles: the kernel's layout, one of ``"s"``/``"i"``/``"o"`` per kernel axis (static; see
        :mod:`lora_jax.layouts`); ``""`` means ``(*stack, *in, *out)``.
    """

    a: jax.Array
    b: jax.Array
    alpha: float = struct.field(pytree_node=False, default=1.0)
    rslora: bool = struct.field(pytree_node=False, default=False)
    in_axes: int = struct.field(pytree_node=False, default=1)
    stack_axes: int = struct.field(pytree_node=False, default=0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    roles: str = struct.field(pytree_node=False, default="")

    field_roles: ClassVar[dict[str, str]] = {"a": "in", "b": "out"}

    def factors(self):
        return self.a, self.b

    @property
    def scale(self) -> float:
        r = self.a.shape[-1]
        return self.alpha / math.sqrt(r) if self.rslora else self.alpha / r

    def hparams(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "rslora": self.rslora}


def is_lowrank(x: Any) -> bool:
    """True for an adapter leaf (LoRA, AdaLoRA, ...)."""
    return isinstance(x, LowRankLeaf)


def leaves(lora: PyTree) -> dict[str, LowRankLeaf]:
    """``{path: adapter leaf}`` of a LoRA tree."""
    out = {}
    for path, x in P.flatten(lora, is_leaf=is_lowrank):
        if x is None:
            continue
        if not is_lowrank(x):
            raise TypeError(
                f"LoRA tree entry {path!r} is a {type(x).__name__}, expected an adapter leaf "
                "such as lora_jax.LoraWeight"
            )
        out[path] = x
    return out


def from_leaves(items: Mapping[str, Any]) -> dict:
    """Builds a nested-dict LoRA tree from ``{path: leaf}``."""
    tree: dict = {}
    for path, x in items.items():
        node = tree
        keys = path.split("/")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = x
    return tree


# ----------------------------------------------------------------------------------------
# Target resolution


def resolve_targets(
    params: PyTree,
    *,
    r: int,
    alpha: float | None,
    targets: P.Pattern | None,
    exclude: P.Pattern | None,
    rules: Sequence[P.Rule] | None,
    in_axes: int | Mapping[str, int] | None,
    stack_axes: int | Mapping[str, int] | None,
    layouts: Mapping[str, Any] | None = None,
) -> dict[str, dict]:
    """Chooses the targeted paths and their settings; raises on bad input.

    A target's layout (its roles string) comes from, in order: a matching rule's ``roles``;
    explicit ``in_axes``/``stack_axes`` (argument or rule); ``layouts`` (from
    :func:`lora_jax.trace`); the parameter's name (:func:`lora_jax.layouts.from_names`).

    Returns ``{path: dict(shape, leaf, r, alpha, roles, in_axes, stack_axes)}``.
    """
    flat = P.flatten(params)
    target_pats = P.as_patterns(targets)
    exclude_pats = P.as_patterns(exclude)
    rules = tuple(rules or ())
    for pat in target_pats + exclude_pats:
        P.check_pattern(pat, "target pattern")
    if layouts is not None and not isinstance(layouts, Mapping):
        raise TypeError(f"layouts must be the result of lora_jax.trace(fn, params, *args), got "
                        f"a {type(layouts).__name__}")

    if target_pats:
        for pat in target_pats:
            if not any(P.matches(path, (pat,)) for path, _ in flat):
                raise ValueError(
                    f"target pattern {pat!r} matches no parameter; paths look like "
                    f"{_examples(flat)}"
                )
        cands = [(p, x) for p, x in flat if P.matches(p, target_pats)]
    else:
        if layouts is not None:
            dense = {p for p, w in layouts.items() if w.kind == "dense"}
            cands = [(p, x) for p, x in flat if p in dense]
            what = "weights that the traced function reads with a matmul"
        else:
            cands = [(p, x) for p, x in flat if P.is_default_target(p, x)]
            what = "float weights named " + "/".join(P.KERNEL_NAMES) + " with >= 2 axes"
        if not cands:
            raise ValueError(
                f"no parameter selected for LoRA: the default targets are {what}, and "
                f"there are none; paths look like {_examples(flat)}. Pass targets= (regexes "
                "over these paths)" + ("" if layouts is not None else
                                       " or layouts=lora_jax.trace(fn, params, *args)"))
        if rules:
            for rule in rules:
                if rule.r != 0 and not any(P.matches(p, (rule.pattern,)) for p, _ in cands):
                    raise ValueError(
                        f"rule pattern {rule.pattern!r} matches no kernel; kernels are "
                        f"{_examples(cands)}"
                    )
            cands = [(p, x) for p, x in cands if any(P.matches(p, (ru.pattern,)) for ru in rules)]
    cands = [(p, x) for p, x in cands if not P.matches(p, exclude_pats)]
    if not cands:
        raise ValueError(
            "no parameter selected for LoRA (targets="
            f"{targets!r}, exclude={exclude!r}); paths look like {_examples(flat)}"
        )

    out = {}
    for path, x in cands:
        rule = next((ru for ru in rules if P.matches(path, (ru.pattern,))), None)
        rr = r if rule is None or rule.r is None else rule.r
        if rr == 0:
            continue
        aa = rule.alpha if rule is not None and rule.alpha is not None else alpha
        aa = float(rr if aa is None else aa)
        shape = tuple(getattr(x, "shape", ()))
        dtype = getattr(x, "dtype", None)
        if not P.is_float(x):
            raise TypeError(f"LoRA target {path!r} has dtype {dtype}, expected a float kernel")
        roles = _roles_for(path, shape, rule, in_axes, stack_axes, layouts)
        stack, ins, outs = Lay.split(roles, shape)
        n_in, n_out = math.prod(ins), math.prod(outs)
        if not isinstance(rr, (int, np.integer)) or isinstance(rr, bool) or not (
                1 <= rr <= min(n_in, n_out)):
            raise ValueError(
                f"LoRA target {path!r} (shape {shape}, roles {roles!r}): rank r={rr!r} must be "
                f"an integer between 1 and min(in, out) = min({n_in}, {n_out}) = "
                f"{min(n_in, n_out)}"
            )
        _check_finite(path, x)
        out[path] = dict(leaf=x, shape=shape, r=int(rr), alpha=aa, roles=roles,
                         in_axes=len(ins), stack_axes=len(stack))
    if not out:
        raise ValueError("every selected parameter has rank 0: no LoRA target left")
    return out


def _roles_for(path, shape, rule, in_axes, stack_axes, layouts) -> str:
    """A target's roles; see :func:`resolve_targets` for the order of precedence."""
    if rule is not None and rule.roles is not None:
        return Lay.check(rule.roles, shape, f"Rule {rule.pattern!r} at {path!r}")
    sa = P.setting_for(stack_axes, path, rule.stack_axes if rule else None, None)
    ia = P.setting_for(in_axes, path, rule.in_axes if rule else None, None)
    traced = layouts.get(path) if layouts is not None else None
    if sa is None and ia is None and traced is not None and traced.roles is not None:
        return Lay.check(traced.roles, shape, f"traced layout of {path!r}")
    sa = sa or 0
    if len(shape) - sa < 2:
        raise ValueError(
            f"LoRA target {path!r} has shape {shape} ({sa} stack axes), expected a kernel "
            "with at least two axes"
        )
    if ia is None:
        ia = P.default_in_axes(path, shape, sa)
    core = shape[sa:]
    if not 1 <= ia < len(core):
        raise ValueError(
            f"LoRA target {path!r}: in_axes={ia} does not split kernel shape {core} into "
            "input and output axes"
        )
    return Lay.canonical(len(shape), ia, sa)


def _examples(flat, n=4) -> str:
    names = [p for p, _ in flat[:n]]
    return repr(names) + (" ..." if len(flat) > n else "")


def _check_finite(path: str, x: Any) -> None:
    concrete = isinstance(x, (np.ndarray, np.generic, jax.Array))
    if not concrete or protocols.is_base_leaf(x) or isinstance(x, jax.core.Tracer):
        return  # abstract (ShapeDtypeStruct), traced or quantized: nothing to read
    arr = np.asarray(x, dtype=np.float32) if "bfloat16" in str(x.dtype) else np.asarray(x)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(f"base parameter {path!r} contains {bad} NaN/Inf values")


# ----------------------------------------------------------------------------------------
# init


INIT_SCHEMES = ("default", "gaussian", "pissa", "zeros")


def init(
    params: PyTree,
    r: int = 8,
    *,
    key: jax.Array,
    alpha: float | None = None,
    targets: P.Pattern | None = None,
    exclude: P.Pattern | None = None,
    rules: Sequence[P.Rule] | None = None,
    init: str = "default",
    rslora: bool = False,
    dtype=jnp.float32,
    in_axes: int | Mapping[str, int] | None = None,
    stack_axes: int | Mapping[str, int] | None = None,
    dropout: float = 0.0,
    layouts: Mapping[str, Any] | None = None,
) -> dict:
    """Creates a LoRA tree for ``params``.

    Args:
      params: a parameter pytree (Linen variables, NNX ``State``, or any nested dict).
      r: default rank.
      key: a PRNG key; each leaf uses ``fold_in(key, crc32(path))``.
      alpha: default LoRA alpha; ``None`` means ``alpha = r`` (scale 1).
      targets: regex or list of regexes (``re.fullmatch`` over '/'-joined paths) choosing the
        adapted parameters. Default: with ``layouts``, every weight the model reads with a
        matmul (not embeddings); without, every float weight named ``kernel``, ``w`` or
        ``weight`` with two or more axes.
      exclude: regex or list of regexes removed from the targets.
      rules: :class:`Rule` list with per-module rank/alpha; the first matching rule wins.
        Without ``targets``, only kernels matched by some rule are adapted.
      init: ``"default"`` (PEFT: A kaiming-uniform with a=sqrt(5), B zeros), ``"gaussian"``
        (PEFT: A ~ N(0, (1/r)^2), B zeros), ``"pissa"`` (A, B from the top-r SVD of the
        kernel; use ``unmerge(params, lora)`` as the frozen base so the model is unchanged),
        or ``"zeros"`` (both zero; for tests and loading).
      rslora: scale by ``alpha/sqrt(r)`` instead of ``alpha/r``.
      dtype: dtype of the factors (float32 by default, whatever the base dtype).
      in_axes: number of leading kernel axes that are the input, as an int or
        ``{regex: int}``; defaults follow Flax (see :func:`lora_jax.paths.default_in_axes`).
      stack_axes: leading axes that stack layers (``nn.scan`` params), int or ``{regex: int}``.
      dropout: PEFT's ``lora_dropout`` on the LoRA input path (needs ``lora_rng`` at apply).
      layouts: from :func:`lora_jax.trace` (``trace(model.apply, params, x)``): each
        target's input, output and stack axes as the model uses them, wherever they sit in
        the kernel (einsum attention, fused projections, block-diagonal weights). Without
        it, layouts follow ``in_axes``/``stack_axes`` and Flax's naming conventions.

    Returns:
      A nested dict with a :class:`LoraWeight` at every targeted path.

    Raises:
      ValueError: a pattern matches nothing, a rank exceeds ``min(in, out)``, a kernel has
        NaN/Inf, or an unknown init scheme. TypeError: a non-float target.

    >>> import jax, jax.numpy as jnp, lora_jax
    >>> p = {"attn": {"q": {"kernel": jnp.ones((8, 8))}}, "mlp": {"kernel": jnp.ones((8, 4))}}
    >>> lora = lora_jax.init(p, key=jax.random.key(0),
    ...                      rules=[lora_jax.Rule(pattern=".*attn.*", r=4, alpha=8)])
    >>> sorted(lora_jax.lora.leaves(lora)), lora["attn"]["q"]["kernel"].scale
    (['attn/q/kernel'], 2.0)
    """
    if init not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {init!r}; expected one of {INIT_SCHEMES}")
    r, alpha, dropout, in_axes, stack_axes = V.init_args(
        "init", params, r, key, alpha, targets, exclude, rules, dtype, dropout, in_axes,
        stack_axes, layouts=layouts)
    spec = resolve_targets(
        params, r=r, alpha=alpha, targets=targets, exclude=exclude, rules=rules,
        in_axes=in_axes, stack_axes=stack_axes, layouts=layouts,
    )
    out = {}
    for path, s in spec.items():
        k = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
        out[path] = _init_leaf(k, s, init, rslora, dtype, dropout, path)
    return from_leaves(out)


def _init_leaf(key, s, scheme, rslora, dtype, dropout, path) -> LoraWeight:
    shape, rr, roles = s["shape"], s["r"], s["roles"]
    stack, in_dims, out_dims = Lay.split(roles, shape)
    n_in, n_out = math.prod(in_dims), math.prod(out_dims)
    a_shape, b_shape = stack + in_dims + (rr,), stack + (rr,) + out_dims
    canonical = roles == Lay.canonical(len(shape), len(in_dims), len(stack))
    meta = dict(alpha=s["alpha"], rslora=rslora, in_axes=len(in_dims), stack_axes=len(stack),
                dropout=dropout, roles="" if canonical else roles)
    if scheme == "default":
        # torch kaiming_uniform_(a=sqrt(5)) on lora_A (r, in): bound = 1/sqrt(fan_in).
        bound = 1.0 / math.sqrt(n_in)
        # Drawn flat, then reshaped: one compiled sampler per size, not per shape.
        a = jax.random.uniform(key, (math.prod(a_shape),), dtype, -bound, bound).reshape(a_shape)
        b = jnp.zeros(b_shape, dtype)
    elif scheme == "gaussian":
        a = jax.random.normal(key, (math.prod(a_shape),), dtype).reshape(a_shape) / rr  # PEFT
        b = jnp.zeros(b_shape, dtype)
    elif scheme == "zeros":
        a, b = jnp.zeros(a_shape, dtype), jnp.zeros(b_shape, dtype)
    else:  # pissa (Meng et al. 2024; PEFT init_lora_weights="pissa")
        w = jnp.transpose(protocols.dense(s["leaf"], jnp.float32), Lay.to_canonical(roles))
        u, sv, vt = jnp.linalg.svd(w.reshape(stack + (n_in, n_out)), full_matrices=False)
        tmp = LoraWeight(a=jnp.zeros(a_shape), b=jnp.zeros(b_shape), **meta)
        root = jnp.sqrt(sv[..., :rr] / tmp.scale)
        a = (u[..., :, :rr] * root[..., None, :]).reshape(a_shape).astype(dtype)
        b = (root[..., :, None] * vt[..., :rr, :]).reshape(b_shape).astype(dtype)
    return LoraWeight(a=a, b=b, **meta)


# ----------------------------------------------------------------------------------------
# merge / unmerge


def check_fits(base: PyTree, lora: PyTree, *, where: str = "check_fits") -> dict[str, Any]:
    """Checks that ``lora`` fits ``base``; returns ``{path: base leaf}`` of the targets.

    Raises:
      ValueError: a LoRA path missing from the base, or a factor shape that does not fit
        the kernel.
    """
    V.params_tree(base, where, "the base tree")
    base_flat = dict(P.flatten(base))
    out = {}
    for path, leaf in leaves(lora).items():
        V.adapter_leaf(path, leaf, where)
        if path not in base_flat:
            # The base paths most like it, compared by path component (a module renamed or
            # dropped from the path is one component off), so that the culprit is shown.
            parts = path.split("/")
            near = sorted((p for p in base_flat if p.rsplit("/", 1)[-1] == parts[-1]),
                          key=lambda p: -difflib.SequenceMatcher(None, parts, p.split("/")).ratio())
            raise ValueError(
                f"LoRA tree has {path!r}, which the base tree lacks"
                + (f"; base has e.g. {near[:3]}" if near else "")
            )
        w = base_flat[path]
        wshape = tuple(getattr(w, "shape", ()))
        if wshape != leaf.kernel_shape:
            raise ValueError(
                f"LoRA factors at {path!r} fit a kernel of shape {leaf.kernel_shape} "
                f"(a {tuple(leaf.factors()[0].shape)}, b {tuple(leaf.factors()[1].shape)}), "
                f"but the base kernel has shape {wshape}"
            )
        out[path] = w
    return out


def merge(base: PyTree, lora: PyTree, *, dtype=None, requantize: bool = False,
          int_rounding: str | None = None):
    """``base`` with every targeted kernel replaced by ``kernel + scale * A @ B``.

    Quantized base leaves are dequantized (to ``dtype``, default their original dtype);
    merged kernels keep the base dtype unless ``dtype`` is given.

    Args:
      base: the base tree (dense, or with quantized leaves).
      lora: a LoRA tree fitting ``base``.
      dtype: output dtype of merged and dequantized leaves.
      requantize: quantize each merged, quantized target again in its own format. Merging
        a small update into 4-bit weights loses much of it (the update is often below the
        quantization step): the added error is measured and returned, not hidden.
      int_rounding: how a merged kernel goes back to an integer dtype (an int8 kernel, or
        an integer ``dtype``): ``None`` (default) refuses, since a cast would silently truncate
        the update; ``"nearest"`` rounds half to even and clips to the dtype's range.

    Returns:
      The merged tree; with ``requantize=True``, ``(quantized tree, errors)`` where
      ``errors[path]`` has ``"weight_rel_error"`` (``|Q(W) - W| / |W|`` for the merged W) and
      ``"update_rel_error"`` (how much of the LoRA update is lost: ``|(Q(W) - W0) - ΔW| /
      |ΔW|`` with ``W0`` the dequantized base).

    Raises:
      ValueError: ``lora`` does not fit ``base`` (a missing path, a shape), or a leaf whose
        factors do not chain. TypeError: an integer kernel or ``dtype`` without
        ``int_rounding``, a bool kernel, a base holding adapter leaves.

    >>> import jax, jax.numpy as jnp, lora_jax
    >>> p = {"kernel": jnp.ones((4, 3))}
    >>> lora = lora_jax.init(p, r=2, key=jax.random.key(0))
    >>> bool(jnp.allclose(lora_jax.merge(p, lora)["kernel"], 1.0))   # B = 0 at init
    True
    """
    targets = check_fits(base, lora, where="merge")
    V.merge_dtypes(targets, dtype, int_rounding, "merge")
    lmap = leaves(lora)
    errors: dict[str, dict[str, float]] = {}

    def f(path, w):
        if path in targets:
            wd = protocols.dense(w)
            delta = lmap[path].delta()
            merged = wd.astype(jnp.promote_types(wd.dtype, jnp.float32)) + delta
            if requantize and protocols.is_base_leaf(w):
                q = w.requantize(merged, path=path)
                qd = q.dequantize(jnp.float32)
                nrm = lambda v: float(jnp.linalg.norm(v))  # noqa: E731
                errors[path] = {
                    "weight_rel_error": nrm(qd - merged) / max(nrm(merged), 1e-30),
                    "update_rel_error": nrm(qd - wd.astype(jnp.float32) - delta)
                    / max(nrm(delta), 1e-30),
                }
                return q
            return V.cast_merged(merged, dtype or wd.dtype, int_rounding)
        if protocols.is_base_leaf(w):
            return w if requantize else V.dense_as(w, dtype, int_rounding)
        return w

    out = P.map_with_path(f, base)
    return (out, errors) if requantize else out


def unmerge(merged: PyTree, lora: PyTree, *, int_rounding: str | None = None) -> PyTree:
    """Inverse of :func:`merge`: ``kernel - scale * A @ B`` at every targeted path.

    Also gives PiSSA's residual base: ``base = unmerge(params, init(params, init="pissa"))``.
    ``int_rounding`` is as in :func:`merge` (integer kernels are refused without it).
    """
    targets = check_fits(merged, lora, where="unmerge")
    V.merge_dtypes(targets, None, int_rounding, "unmerge")
    lmap = leaves(lora)

    def f(path, w):
        if path in targets:
            wd = protocols.dense(w)
            return V.cast_merged(
                wd.astype(jnp.promote_types(wd.dtype, jnp.float32)) - lmap[path].delta(),
                wd.dtype, int_rounding)
        return w

    return P.map_with_path(f, merged)


# ----------------------------------------------------------------------------------------
# Counting and summaries


def param_count(lora: PyTree) -> int:
    """Number of trainable adapter parameters (array elements) in a LoRA tree."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(lora)))


def base_param_count(params: PyTree) -> int:
    """Number of parameters in a base tree (quantized leaves count their logical size)."""
    return int(sum(math.prod(getattr(x, "shape", ())) for _, x in P.flatten(params)))


def summary(lora: PyTree, base: PyTree | None = None, *, verbose: bool = False) -> str:
    """A one-line summary for logs: trainable params, % of base, modules and ranks.

    With ``verbose=True`` a line per module follows.

    >>> import jax, jax.numpy as jnp, lora_jax
    >>> p = {"a": {"kernel": jnp.ones((16, 16))}, "b": {"kernel": jnp.ones((16, 8))}}
    >>> lora_jax.summary(lora_jax.init(p, r=2, key=jax.random.key(0)), p)
    'LoRA: 112 trainable params (29.17% of 384 base) in 2 modules, r=2 x2, scale 1'
    """
    lmap = leaves(lora)
    n = param_count(lora)
    head = f"{next(iter(lmap.values())).kind}: " if lmap else ""
    parts = [f"{head}{n:,} trainable params"]
    if base is not None:
        nb = base_param_count(base)
        parts[0] += f" ({100.0 * n / max(nb, 1):.2f}% of {nb:,} base)"
    counts: dict[int, int] = {}
    scales = set()
    for leaf in lmap.values():
        counts[leaf.r] = counts.get(leaf.r, 0) + 1
        scales.add(float(leaf.scale))
    ranks = ", ".join(f"r={r} x{c}" for r, c in sorted(counts.items(), reverse=True))
    sc = ", ".join(f"{s:g}" for s in sorted(scales))
    line = f"{parts[0]} in {len(lmap)} modules, {ranks}, scale {sc}"
    if verbose:
        rows = [line] + [
            f"  {p}: r={x.r} kernel {x.kernel_shape} scale {x.scale:g} params "
            f"{sum(math.prod(a.shape) for a in jax.tree.leaves(x)):,}"
            for p, x in lmap.items()
        ]
        return "\n".join(rows)
    return line
