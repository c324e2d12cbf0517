"""LoftQ (Li et al. 2023): a quantized base and LoRA factors initialised together.

For each targeted kernel ``W``, alternately quantize and fit the residual with a rank-r SVD
(PEFT ``utils.loftq_utils.loftq_init``)::

    res = W
    repeat num_iter times:
        Q = dequantize(quantize(res))
        s·A·B = the top-r SVD of W − Q
        res = W − s·A·B

so that ``Q + s·A·B`` approximates ``W`` better than ``Q`` alone (the first iteration's Q is
plain quantization). The quantizer is this library's (:func:`lora_jax.quantize_array`: NF4
bit-exact with bitsandbytes, FP4, int4, int8), with blocks along the kernel's input axes as
bitsandbytes blocks a PyTorch weight. Unlike PEFT, the factors are divided by the LoRA
scale, so ``Q + scale·A·B`` is the approximation whatever ``alpha`` is (PEFT copies
``√S·V`` and ``U·√S`` as they are, exact only at ``lora_alpha = r``).

>>> import jax, jax.numpy as jnp, lora_jax
>>> w = jax.random.normal(jax.random.key(0), (128, 64))
>>> qbase, lora = init({"kernel": w}, r=8, key=jax.random.key(1), num_iter=2)
>>> q = qbase["kernel"].dequantize()
>>> err_q = jnp.linalg.norm(w - lora_jax.dequantize_tree(lora_jax.quantize({"kernel": w},
...     "nf4", double_quant=False))["kernel"])
>>> bool(jnp.linalg.norm(w - lora_jax.merge(qbase, lora)["kernel"]) < err_q)
True
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax import layouts as Lay
from lora_jax import paths as P
from lora_jax import protocols
from lora_jax import validation as V
from lora_jax.leaves import LoraWeight, from_leaves
from lora_jax.quant import quantize_array
from lora_jax.targets import resolve_targets

PyTree = Any


def init(
    params: PyTree,
    r: int = 8,
    *,
    key: jax.Array,
    num_iter: int = 1,
    format: str = "nf4",
    block_size: int = 64,
    double_quant: bool = False,
    storage: str = "packed",
    blocks: str = "input",
    alpha: float | None = None,
    rslora: bool = False,
    targets: P.Pattern | None = None,
    exclude: P.Pattern | None = None,
    rules: Sequence[P.Rule] | None = None,
    dtype=jnp.float32,
    in_axes: int | Mapping[str, int] | None = None,
    stack_axes: int | Mapping[str, int] | None = None,
    dropout: float = 0.0,
    layouts: Mapping[str, Any] | None = None,
) -> tuple[PyTree, PyTree]:
    """LoftQ: ``(quantized base, LoRA tree)`` with ``Q + scale·A·B ≈ W`` at every target.

    Args:
      params: a dense parameter tree.
      r, alpha, rslora, dropout: as :func:`lora_jax.init` (the rank and scale).
      targets, exclude, rules, dtype, in_axes, stack_axes, layouts: as :func:`lora_jax.init`
        (which weights, in which layout).
      key: unused by the algorithm (it is deterministic); kept for :func:`lora_jax.init`'s
        signature.
      num_iter: alternating steps (PEFT's ``loftq_iter``, default 1).
      format, block_size, double_quant, storage: the quantizer (:func:`lora_jax.quantize`);
        PEFT's LoftQ uses NF4 blocks of 64 without double quantization.
      blocks: ``"input"`` (bitsandbytes' blocking of the PyTorch weight) or ``"row-major"``.

    Returns:
      The base with every target a :class:`lora_jax.QuantizedArray` of its last ``Q`` (other
      leaves unchanged: quantize them with :func:`lora_jax.quantize`, which keeps these), and
      a tree of :class:`lora_jax.LoraWeight`.
    """
    num_iter = V.integer(num_iter, "loftq.init: num_iter", low=1)
    if blocks not in ("input", "row-major"):
        raise ValueError(f"loftq.init: blocks must be 'input' or 'row-major', got {blocks!r}")
    r, alpha, dropout, in_axes, stack_axes = V.init_args(
        "loftq.init", params, r, key, alpha, targets, exclude, rules, dtype, dropout, in_axes,
        stack_axes, layouts=layouts)
    spec = resolve_targets(params, r=r, alpha=alpha, targets=targets, exclude=exclude,
                           rules=rules, in_axes=in_axes, stack_axes=stack_axes, layouts=layouts)
    quant, out = {}, {}
    for path, s in spec.items():
        if protocols.is_base_leaf(s["leaf"]):
            raise TypeError(f"loftq.init: {path!r} is already quantized; LoftQ needs the "
                            "dense weight")
        roles = s["roles"]
        stack, in_dims, _ = Lay.split(roles, s["shape"])
        canonical = roles == Lay.canonical(len(roles), len(in_dims), len(stack))
        leaf = LoraWeight(a=jnp.zeros(stack + in_dims + (s["r"],), dtype),
                          b=jnp.zeros(stack + (s["r"],) + Lay.split(roles, s["shape"])[2], dtype),
                          alpha=s["alpha"], rslora=rslora, in_axes=len(in_dims),
                          stack_axes=len(stack), dropout=dropout,
                          roles="" if canonical else roles, residual_init="loftq")
        order = Lay.block_order(roles) if blocks == "input" else None
        q, a, b = _loftq(jnp.asarray(s["leaf"]), leaf, num_iter, format, block_size,
                         double_quant, storage, None if order is None else tuple(order), path)
        quant[path] = q
        out[path] = leaf.replace(a=a.astype(dtype), b=b.astype(dtype))
    qbase = P.map_with_path(lambda p, x: quant.get(p, x), params)
    return qbase, from_leaves(out)


def _loftq(w, leaf, num_iter, fmt, block_size, double_quant, storage, order, path):
    quantize_array(w, fmt, block_size=block_size, path=path)  # NaN/Inf check, outside jit
    meta = (tuple(leaf.a.shape), tuple(leaf.b.shape), leaf.alpha, leaf.rslora, leaf.in_axes,
            leaf.stack_axes, leaf.roles)
    return _compiled(meta, num_iter, fmt, block_size, double_quant, storage, order)(w)


@functools.lru_cache(maxsize=64)
def _compiled(meta, num_iter, fmt, block_size, double_quant, storage, order):
    """The jitted LoftQ loop for one kernel layout (shared by kernels of the same shape)."""
    a_shape, b_shape, alpha, rslora, in_axes, stack_axes, roles = meta
    leaf = LoraWeight(a=jnp.zeros(a_shape), b=jnp.zeros(b_shape), alpha=alpha, rslora=rslora,
                      in_axes=in_axes, stack_axes=stack_axes, roles=roles)
    qz = functools.partial(quantize_array, format=fmt, block_size=block_size,
                           double_quant=double_quant, storage=storage, order=order)

    @jax.jit
    def run(w):
        res, a, b, q = w, None, None, None
        for i in range(num_iter):
            q = qz(res)
            a, b = _svd_factors(w.astype(jnp.float32) - q.dequantize(jnp.float32), leaf)
            if i < num_iter - 1:
                res = (w.astype(jnp.float32)
                       - leaf.replace(a=a, b=b).delta()).astype(w.dtype)
        return q, a, b

    return run


def _svd_factors(err, leaf):
    """``(A, B)`` with ``scale·A·B`` the best rank-r approximation of ``err`` (kernel order),
    ``√S`` on each side as PEFT's ``_low_rank_decomposition``."""
    s, ins, outs = leaf.stack_shape, leaf.in_shape, leaf.out_shape
    e = jnp.transpose(err, Lay.to_canonical(leaf.layout)).reshape(
        s + (math.prod(ins), math.prod(outs)))
    u, sv, vt = jnp.linalg.svd(e, full_matrices=False)
    r = leaf.r
    root = jnp.sqrt(sv[..., :r] / leaf.scale)
    a = (u[..., :, :r] * root[..., None, :]).reshape(s + ins + (r,))
    b = (root[..., :, None] * vt[..., :r, :]).reshape(s + (r,) + outs)
    return a, b
