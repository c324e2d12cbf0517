"""Small reference models bundled for the demo, tests and benchmarks (no downloads)."""

from lora_jax.models.gpt import GPT
from lora_jax.models.gpt import GPTConfig
from lora_jax.models.llama import Llama
from lora_jax.models.llama import LlamaConfig

__all__ = ["GPT", "GPTConfig", "Llama", "LlamaConfig"]
