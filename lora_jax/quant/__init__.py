"""Quantized base weights for QLoRA: NF4, FP4, int4 and int8 block quantization.

A :class:`QuantizedArray` is a pytree leaf holding packed codes and per-block scales. NF4 and
FP4 follow bitsandbytes 0.50 byte for byte on float32 input (the rules, and the known limits
of the match, are listed in :mod:`lora_jax.quant.bnb`). "int4" (codes -7..7, stored as nibble
code + 8, value ``code / 7 * absmax``) and "int8" (codes -127..127, one signed byte each, value
``code / 127 * absmax``) are this library's symmetric formats, scaled like the 4-bit codes and
optionally double quantized too.

Storage of the 4-bit codes: "packed" (default) is the bitsandbytes byte layout, two codes
per uint8; "native" keeps one code per element of a 4-bit XLA type (``jnp.uint4``, or
``jnp.int4`` for "int4"), which backends that pack sub-byte types store two per byte. Both
dequantize to the same bits.

The files, one idea each:

- ``array.py``: the :class:`QuantizedArray` leaf (a :class:`lora_jax.protocols.BaseLeaf`);
- ``bnb.py``: constants and numerics reproduced from bitsandbytes and PyTorch;
- ``kernels.py``: the jitted quantize/dequantize kernels and the 4-bit packing;
- ``tree.py``: :func:`quantize_array`, :func:`quantize` over a tree, and back.
"""

from lora_jax.quant.array import FORMATS, STORAGES, QuantizedArray, is_quantized
from lora_jax.quant.tree import BLOCKS, dequantize_tree, quantize, quantize_array, quantized_bytes

__all__ = [
    "BLOCKS",
    "FORMATS",
    "STORAGES",
    "QuantizedArray",
    "dequantize_tree",
    "is_quantized",
    "quantize",
    "quantize_array",
    "quantized_bytes",
]
