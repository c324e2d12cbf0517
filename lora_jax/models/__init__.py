"""Small reference models bundled for the demo, tests and benchmarks (no downloads)."""

from lora_jax.models.gpt import GPT, GPTConfig
from lora_jax.models.llama import Llama, LlamaConfig
from lora_jax.models.moe import MoeConfig, MoeModel

__all__ = ["GPT", "GPTConfig", "Llama", "LlamaConfig", "MoeConfig", "MoeModel"]
