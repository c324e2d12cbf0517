"""lora_jax: LoRA, AdaLoRA and QLoRA for JAX/Flax parameter pytrees.

The core (``init``, ``apply``, ``merge``, ``quantize``, ``trace``, ``adalora``, the optax
helpers) loads with the package; the edge modules (``checkpoint`` with orbax, ``peft`` with
safetensors, ``sharding``, ``nnx``, ``models``, ``demo``) load on first use.
"""

import importlib

from lora_jax import adalora
from lora_jax.layouts import Layouts
from lora_jax.layouts import WeightLayout
from lora_jax.layouts import trace
from lora_jax.leaves import LoraWeight
from lora_jax.initializers import init
from lora_jax.merging import merge
from lora_jax.merging import unmerge
from lora_jax.paths import Rule
from lora_jax.quant import FORMATS
from lora_jax.quant import QuantizedArray
from lora_jax.quant import dequantize_tree
from lora_jax.quant import is_quantized
from lora_jax.quant import quantize
from lora_jax.quant import quantize_array
from lora_jax.quant import quantized_bytes
from lora_jax.summaries import Summary
from lora_jax.summaries import base_param_count
from lora_jax.summaries import param_count
from lora_jax.summaries import summary
from lora_jax.train import combine
from lora_jax.train import optimizer
from lora_jax.train import split
from lora_jax.train import trainable_mask
from lora_jax.transform import LoraFallbackError
from lora_jax.transform import Report
from lora_jax.transform import Use
from lora_jax.transform import WeightReport
from lora_jax.transform import apply
from lora_jax.transform import report

__version__ = "0.1.0"

_EDGE_MODULES = ("checkpoint", "demo", "models", "nnx", "peft", "sharding")


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
    "init",
    "is_quantized",
    "merge",
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
    "summary",
    "trace",
    "trainable_mask",
    "unmerge",
]
