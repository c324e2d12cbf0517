"""lora_jax: LoRA, AdaLoRA and QLoRA for JAX/Flax parameter pytrees."""

from lora_jax import adalora
from lora_jax import checkpoint
from lora_jax import nnx
from lora_jax import peft
from lora_jax import sharding
from lora_jax.layouts import Layouts
from lora_jax.layouts import WeightLayout
from lora_jax.layouts import trace
from lora_jax.lora import LoraWeight
from lora_jax.lora import base_param_count
from lora_jax.lora import init
from lora_jax.lora import merge
from lora_jax.lora import param_count
from lora_jax.lora import summary
from lora_jax.lora import unmerge
from lora_jax.paths import Rule
from lora_jax.quant import FORMATS
from lora_jax.quant import QuantizedArray
from lora_jax.quant import dequantize_tree
from lora_jax.quant import is_quantized
from lora_jax.quant import quantize
from lora_jax.quant import quantize_array
from lora_jax.quant import quantized_bytes
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

__all__ = [
    "FORMATS",
    "Layouts",
    "LoraFallbackError",
    "LoraWeight",
    "QuantizedArray",
    "Report",
    "Rule",
    "Use",
    "WeightLayout",
    "WeightReport",
    "adalora",
    "checkpoint",
    "peft",
    "apply",
    "base_param_count",
    "combine",
    "dequantize_tree",
    "init",
    "is_quantized",
    "merge",
    "nnx",
    "optimizer",
    "param_count",
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
