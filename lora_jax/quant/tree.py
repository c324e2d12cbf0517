"""Quantizing arrays and parameter trees: :func:`quantize_array`, :func:`quantize` and back.

:func:`quantize_array` checks one array and runs the kernels of
:mod:`lora_jax.quant.kernels` on it; :func:`quantize` chooses the leaves of a tree to quantize
(the default-target rule of :func:`lora_jax.init`, or ``targets``/``layouts``) and the axis
order their blocks run along (``blocks``); :func:`dequantize_tree` and :func:`quantized_bytes`
read quantized trees.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import layouts as _lay
from lora_jax import paths as _paths
from lora_jax import validation as V
from lora_jax.quant import kernels
from lora_jax.quant.array import FORMATS, QuantizedArray, check_storage, is_quantized, normal_order

BLOCKS = ("input", "row-major")


def check_config(format: str, block_size: int | np.integer, where: str,
                 storage: str = "packed") -> int:
    """``block_size`` as an int, after checking the format, block size and storage."""
    if format not in FORMATS:
        raise ValueError(
            f"{where}: unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    ok = isinstance(block_size, (int, np.integer)) and not isinstance(block_size, bool)
    if not ok or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"{where}: block_size must be a power of two >= 16, got {block_size!r}")
    check_storage(format, storage, where)
    return int(block_size)


def quantize_array(
    x: jax.typing.ArrayLike,
    format: str = "nf4",
    *,
    block_size: int = 64,
    double_quant: bool = False,
    storage: str = "packed",
    path: str = "<array>",
    order: Sequence[int] | None = None,
) -> QuantizedArray:
    """Block-quantizes one floating-point array (jittable; shapes and options are static).

    Args:
      x: a bf16, f16, f32 or f64 array of any shape.
      format: "nf4", "fp4" (both as bitsandbytes 0.50), "int4" or "int8".
      block_size: elements per absmax block, a power of two >= 16.
      double_quant: also quantize the absmax (8-bit dynamic codes per 256 blocks).
      storage: "packed" (two 4-bit codes per uint8, bitsandbytes' layout) or "native" (one
        ``jnp.uint4``/``jnp.int4`` element per code, see :class:`QuantizedArray`); the values
        are the same. "int8" has only "packed".
      path: the parameter's name, used in error messages.
      order: flatten ``x`` in this axis order (``x.transpose(order)``, row-major) before
        blocking; ``None`` for ``x``'s own order. ``dequantize`` undoes it.

    Returns:
      A :class:`QuantizedArray`.

    Raises:
      ValueError: unknown format or storage, "native" with "int8", bad block size, empty
        ``x``, or NaN/Inf in ``x``. NaN/Inf are detected only outside ``jax.jit``; under a
        trace they silently give NaN blocks.
      TypeError: ``x`` has an integer or boolean dtype.

    >>> q = quantize_array(jnp.arange(128.0).reshape(2, 64), "nf4")
    >>> q.codes.shape, q.absmax.tolist()
    ((64,), [63.0, 127.0])
    >>> n = quantize_array(jnp.arange(128.0).reshape(2, 64), "nf4", storage="native")
    >>> str(n.codes.dtype), n.codes.shape, n.nbytes
    ('uint4', (128,), 72)
    """
    block_size = check_config(format, block_size, path, storage)
    if not hasattr(x, "dtype"):
        try:
            x = jnp.asarray(x)
        except (TypeError, ValueError):
            raise TypeError(f"{path}: cannot quantize a {type(x).__name__}; expected a "
                            "floating-point array") from None
    # Python scalars, the only array-likes without a dtype, became arrays just above.
    x = cast("jax.Array | np.ndarray | np.number | np.bool_", x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{path}: cannot quantize an array of dtype {x.dtype}; "
                        "expected a floating-point array (bf16, f16, f32 or f64)")
    if math.prod(x.shape) == 0:
        raise ValueError(f"{path}: cannot quantize an empty array of shape {tuple(x.shape)}")
    # A static field, hashed and saved in checkpoints: a numpy bool (or 0/1) becomes a bool.
    double_quant = bool(double_quant)  # pyrefly: ignore[unnecessary-type-conversion]
    if order is not None:
        if sorted(order) != list(range(len(x.shape))):
            raise ValueError(f"{path}: order {tuple(order)} is not a permutation of the axes of "
                             f"shape {tuple(x.shape)}")
        order = normal_order(tuple(order))
    xt = jnp.asarray(x) if order is None else jnp.transpose(jnp.asarray(x), order)
    codes, absmax, absmax2, offset, bad = kernels.quantize_blocks(
        xt, fmt=format, block_size=block_size, double_quant=double_quant, storage=storage)
    if not isinstance(bad, jax.core.Tracer) and int(bad):  # a traced input can't be checked
        wide = " (or values beyond float32's range, which the formats compute in)" if \
            jnp.dtype(x.dtype).itemsize > 4 else ""
        raise ValueError(f"{path}: cannot quantize an array with {int(bad)} NaN or Inf "
                         f"value(s){wide}")
    return QuantizedArray(codes, absmax, absmax2, offset, shape=tuple(int(d) for d in x.shape),
                          dtype_name=jnp.dtype(x.dtype).name, block_size=block_size,
                          format=format, double_quant=double_quant, storage=storage, order=order)


def quantize(
    params: Any,
    format: str = "nf4",
    *,
    block_size: int = 64,
    double_quant: bool = True,
    targets: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    min_size: int = 0,
    storage: str = "packed",
    layouts: Mapping[str, Any] | None = None,
    blocks: str = "input",
    in_axes: int | Mapping[str, int] | None = None,
    stack_axes: int | Mapping[str, int] | None = None,
) -> Any:
    """Replaces selected leaves of a parameter tree by :class:`QuantizedArray` leaves.

    Paths are '/'-joined keys (``"params/Dense_0/kernel"``), matched with ``re.fullmatch``.
    Targets follow the rule of :func:`lora_jax.init`: with ``layouts``, every weight the
    model reads with a matmul; without, every float weight named ``kernel``, ``w`` or
    ``weight`` with two or more axes.

    Args:
      params: a pytree of arrays (Linen variables, an NNX ``State``, nested dicts...).
      format: "nf4", "fp4", "int4" or "int8".
      block_size: elements per absmax block, a power of two >= 16.
      double_quant: quantize the absmax too (QLoRA's default, ~4.127 bits per NF4 parameter).
      targets: a regex or list of regexes/paths choosing the floating-point leaves to quantize.
      exclude: a regex or list of them; matching leaves stay dense.
      min_size: leaves with fewer elements stay dense.
      storage: "packed" or "native" 4-bit codes (see :func:`quantize_array`).
      layouts: from :func:`lora_jax.trace`: targets and each kernel's input/output/stack axes.
      blocks: ``"input"`` (default): blocks run along each kernel's input axes, flattened as
        ``(*stack, *out, *in)``: for a Dense ``(in, out)`` kernel that is the blocking
        bitsandbytes applies to the PyTorch ``(out, in)`` weight, so the same model gets the
        same codes here and there. ``"row-major"``: the kernel flattened in its own order
        (blocks along the last axis; this library's layout before 0.2).
      in_axes, stack_axes: the layout of kernels ``layouts`` does not cover, as in
        :func:`lora_jax.init` (``nn.scan`` kernels need ``stack_axes=1`` without
        ``layouts``, so that each layer's blocks stay within the layer).

    Returns:
      A tree of the same structure; leaves already quantized are kept as they are.

    Raises:
      ValueError: a targets pattern matches no floating-point leaf, the selection quantizes
        nothing, or a bad format/block size/storage/blocks.

    >>> params = {"Dense_0": {"kernel": jnp.ones((64, 8)), "bias": jnp.ones(8)}}
    >>> q = quantize(params, "nf4")
    >>> is_quantized(q["Dense_0"]["kernel"]), is_quantized(q["Dense_0"]["bias"])
    (True, False)
    >>> q["Dense_0"]["kernel"].order    # blocks along the 64 inputs, as bitsandbytes
    (1, 0)
    """
    block_size = check_config(format, block_size, "quantize", storage)
    if blocks not in BLOCKS:
        raise ValueError(f"quantize: blocks must be one of {BLOCKS}, got {blocks!r}")
    V.patterns(targets, "quantize: targets")
    V.patterns(exclude, "quantize: exclude")
    min_size = V.integer(min_size, "quantize: min_size", low=0)
    targets, exclude = _paths.as_patterns(targets), _paths.as_patterns(exclude)
    _lay.check_layouts(layouts, "quantize")
    dense = None if layouts is None else {p for p, w in layouts.items() if w.kind == "dense"}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)
    used, out, seen, n_quantized = set(), [], [], 0
    for keypath, leaf in leaves:
        path = _paths.path_str(keypath)
        dtype = getattr(leaf, "dtype", None)
        if is_quantized(leaf):
            n_quantized += 1
        if is_quantized(leaf) or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            out.append(leaf)
            continue
        seen.append(path)
        if targets:
            hits = {p for p in targets if _paths.matches(path, (p,))}
            used |= hits
            selected = bool(hits)
        elif dense is not None:
            selected = path in dense
        else:
            selected = _paths.is_default_target(path, leaf)
        selected = selected and not _paths.matches(path, exclude)
        if selected and math.prod(leaf.shape) >= min_size:
            order = None
            if blocks == "input" and len(leaf.shape) >= 2:
                traced = None if layouts is None else layouts.get(path)
                sa = _paths.setting_for(stack_axes, path, None, None)
                ia = _paths.setting_for(in_axes, path, None, None)
                if traced is not None and traced.roles is not None and sa is None and ia is None:
                    roles = traced.roles
                else:
                    roles = _lay.from_names(path, leaf.shape, sa or 0, ia)
                order = _lay.block_order(roles)
            leaf = quantize_array(leaf, format, block_size=block_size, double_quant=double_quant,
                                  storage=storage, path=path, order=order)
            n_quantized += 1
        out.append(leaf)
    for p in targets:
        if p not in used:
            raise ValueError(f"quantize: targets pattern {p!r} matches no floating-point leaf; "
                             f"paths look like {seen[:4]}")
    if not n_quantized:
        rule = ("targets=" + repr(list(targets)) if targets else
                "the weights the traced function reads with a matmul" if dense is not None else
                "float weights named " + "/".join(_paths.KERNEL_NAMES) + " with >= 2 axes")
        raise ValueError(
            f"quantize selected nothing to quantize (rule: {rule}, exclude={list(exclude)}, "
            f"min_size={min_size}) among the {len(seen)} floating-point leaves "
            f"{seen[:6]}{' ...' if len(seen) > 6 else ''}; pass targets= (regexes over these "
            "paths) or layouts=lora_jax.trace(fn, params, *args)")
    return jax.tree_util.tree_unflatten(treedef, out)


def dequantize_tree(tree: Any, dtype: Any = None) -> Any:
    """Replaces every :class:`QuantizedArray` leaf by its dense array; other leaves unchanged.

    Args:
      tree: a pytree, possibly with quantized leaves.
      dtype: dtype of the dequantized leaves (default: each leaf's original dtype).

    Returns:
      A tree of plain arrays.

    >>> dense = dequantize_tree(quantize({"kernel": jnp.ones((16, 4))}))
    >>> dense["kernel"].shape
    (16, 4)
    """
    return jax.tree_util.tree_map(
        lambda x: x.dequantize(dtype) if is_quantized(x) else x, tree, is_leaf=is_quantized)


def quantized_bytes(tree: Any) -> dict[str, Any]:
    """Storage of the quantized leaves of a tree, measured from their arrays.

    Native 4-bit codes count 4 bits each (see :attr:`QuantizedArray.nbytes`), so both storages
    of the same format give the same figures.

    Returns:
      ``{"leaves": {path: bytes}, "total": bytes, "params": elements, "dense_bytes": bytes in
      the original dtypes, "bits_per_param": 8 * total / params}``, over quantized leaves only.

    >>> stats = quantized_bytes(quantize({"kernel": jnp.ones((1024, 1024))}))
    >>> round(stats["bits_per_param"], 3)
    4.127
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)
    per_leaf = {_paths.path_str(k): x.nbytes for k, x in leaves if is_quantized(x)}
    quantized = [x for _, x in leaves if is_quantized(x)]
    total = sum(per_leaf.values())
    params = sum(x.size for x in quantized)
    return {
        "leaves": per_leaf,
        "total": total,
        "params": params,
        "dense_bytes": sum(x.size * x.dtype.itemsize for x in quantized),
        "bits_per_param": 8 * total / params if params else 0.0,
    }
