"""Small reference models bundled for the demo, tests and benchmarks (no downloads)."""

from lora_jax.models.gpt import GPT
from lora_jax.models.gpt import GPTConfig

__all__ = ["GPT", "GPTConfig"]
