"""lora_jax: LoRA, AdaLoRA and QLoRA for JAX/Flax parameter pytrees.

The core (``init``, ``apply``, ``merge``, ``quantize``, ``trace``, ``adalora``, the optax
helpers) loads with the package; the edge modules (``checkpoint`` with orbax, ``peft`` with
safetensors, ``sharding``, ``nnx``, ``models``, ``demo``) load on first use.
"""

import importlib

from lora_jax import adalora, dora, loftq, loraplus
from lora_jax.initializers import init
from lora_jax.layouts import Layouts, WeightLayout, trace
from lora_jax.leaves import LoraWeight
from lora_jax.merging import merge, unmerge
from lora_jax.multi import stack, unstack
from lora_jax.paths import Rule
from lora_jax.quant import (
    FORMATS,
    QuantizedArray,
    dequantize_tree,
    is_quantized,
    quantize,
    quantize_array,
    quantized_bytes,
)
from lora_jax.summaries import Summary, base_param_count, param_count, summary
from lora_jax.train import combine, optimizer, split, trainable_mask
from lora_jax.transform import LoraFallbackError, Report, Use, WeightReport, apply, report

__version__ = "0.1.0"

_EDGE_MODULES = ("checkpoint", "demo", "interop", "models", "nnx", "peft", "sharding")


def __getattr__(name: str):
    """Loads an edge module on first use (``lora_jax.checkpoint``, ``lora_jax.peft``, ...)."""
    if name in _EDGE_MODULES:
        return importlib.import_module(f"lora_jax.{name}")
    raise AttributeError(f"module 'lora_jax' has no attribute {name!r}")


__all__ = [
    "FORMATS",
    "Layouts",
    "LoraFallbackError",
    "LoraWeight",
    "QuantizedArray",
    "Report",
    "Rule",
    "Summary",
    "Use",
    "WeightLayout",
    "WeightReport",
    "adalora",
    "apply",
    "base_param_count",
    "checkpoint",
    "combine",
    "dequantize_tree",
    "dora",
    "init",
    "interop",
    "is_quantized",
    "loftq",
    "loraplus",
    "merge",
    "multi",
    "nnx",
    "optimizer",
    "param_count",
    "peft",
    "quantize",
    "quantize_array",
    "quantized_bytes",
    "report",
    "sharding",
    "split",
    "stack",
    "summary",
    "trace",
    "trainable_mask",
    "unmerge",
    "unstack",
]
