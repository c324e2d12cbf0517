"""``init``: a LoRA tree for a parameter tree, with PEFT's init schemes and PiSSA.

>>> import jax, jax.numpy as jnp
>>> lora = init({"w": {"kernel": jnp.ones((4, 3))}}, r=2, key=jax.random.key(0))
>>> lora["w"]["kernel"].a.shape, float(abs(lora["w"]["kernel"].b).sum())
((4, 2), 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax import dora as dora_mod
from lora_jax import init_schemes as schemes
from lora_jax import layouts as Lay
from lora_jax import paths as P
from lora_jax import protocols
from lora_jax import validation as V
from lora_jax.leaves import LoraWeight, LowRankLeaf, from_leaves
from lora_jax.targets import resolve_targets

PyTree = Any


#: The init schemes registered when the library loads (all of them: ``init_schemes.names()``).
INIT_SCHEMES = schemes.names()


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
    dora: bool = False,
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
      init: a scheme of :mod:`lora_jax.init_schemes`: ``"default"`` (PEFT: A kaiming-uniform
        with a=sqrt(5), B zeros), ``"gaussian"`` (PEFT: A ~ N(0, (1/r)^2), B zeros),
        ``"pissa"`` (A, B from the top-r SVD of the kernel), ``"olora"`` (PEFT's OLoRA:
        ``A = Rᵣ``, ``B = Qᵣ`` from the QR decomposition of the PyTorch-layout ``(out, in)``
        kernel), or ``"zeros"`` (both zero; for tests and loading). PiSSA and OLoRA change
        the base: use ``init_schemes.residual_base(params, lora)`` (``W − s·A·B``, PEFT's
        adjusted base; ``unmerge(params, lora)`` without DoRA) as the frozen base so the
        model starts unchanged; they need dense kernels. ``"loftq"`` builds a quantized base
        with the factors: call :func:`lora_jax.loftq.init`.
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
        NaN/Inf, an unknown init scheme (listing the registered ones), ``"loftq"``, or a
        decomposing scheme on a quantized kernel. TypeError: a non-float target.

    >>> import jax, jax.numpy as jnp, lora_jax
    >>> p = {"attn": {"q": {"kernel": jnp.ones((8, 8))}}, "mlp": {"kernel": jnp.ones((8, 4))}}
    >>> lora = lora_jax.init(p, key=jax.random.key(0),
    ...                      rules=[lora_jax.Rule(pattern=".*attn.*", r=4, alpha=8)])
    >>> sorted(lora_jax.lora.leaves(lora)), lora["attn"]["q"]["kernel"].scale
    (['attn/q/kernel'], 2.0)
    """
    scheme = schemes.get(init, "init")
    if scheme.factors is None:
        raise ValueError(f"init: init={init!r} builds the base together with the factors; call "
                         f"{scheme.builder}(params, ...), which returns (base, lora)")
    r, alpha, dropout, in_axes, stack_axes = V.init_args(
        "init", params, r, key, alpha, targets, exclude, rules, dtype, dropout, in_axes,
        stack_axes, layouts=layouts)
    spec = resolve_targets(
        params, r=r, alpha=alpha, targets=targets, exclude=exclude, rules=rules,
        in_axes=in_axes, stack_axes=stack_axes, layouts=layouts,
    )
    out: dict[str, LowRankLeaf] = {}
    for path, s in spec.items():
        if not scheme.quantized_base and protocols.is_base_leaf(s["leaf"]):
            raise ValueError(
                f"init: init={init!r} decomposes the dense kernel, but {path!r} is quantized: "
                "run it on the dense params, then quantize the residual base "
                "(lora_jax.init_schemes.residual_base(params, lora))")
        k = P.path_key(key, path)
        out[path] = _init_leaf(k, s, scheme, rslora, dtype, dropout, path)
        if dora:  # m: the norms of the adapted kernel, so the model starts unchanged
            w0 = protocols.dense(s["leaf"], jnp.float32)
            if scheme.changes_base:  # the adapted kernel is the residual base's
                w0 = out[path].unmerged(w0)
            out[path] = dora_mod.from_lora(out[path], w0, dtype=dtype)
    return from_leaves(out)


def _init_leaf(key, s, scheme: schemes.InitScheme, rslora, dtype, dropout, path) -> LoraWeight:
    shape, rr, roles = s["shape"], s["r"], s["roles"]
    stack, in_dims, out_dims = Lay.split(roles, shape)
    canonical = roles == Lay.canonical(len(shape), len(in_dims), len(stack))
    scale = s["alpha"] / math.sqrt(rr) if rslora else s["alpha"] / rr  # as LoraWeight.scale
    spec = schemes.LeafSpec(
        kernel=s["leaf"], roles=roles, stack=stack, n_in=math.prod(in_dims),
        n_out=math.prod(out_dims), r=rr, a_shape=stack + in_dims + (rr,),
        b_shape=stack + (rr,) + out_dims, scale=scale)
    assert scheme.factors is not None  # checked by init
    a, b = scheme.factors(key, spec, dtype)
    return LoraWeight(a=a, b=b, alpha=s["alpha"], rslora=rslora, in_axes=len(in_dims),
                      stack_axes=len(stack), dropout=dropout, roles="" if canonical else roles,
                      residual_init=scheme.name if scheme.changes_base else "")
