"""``python -m lora_jax.demo_llm``: the SmolLM2 fine-tune, now :mod:`lora_jax.demo.llm`."""

from lora_jax.demo.llm import PROMPT  # noqa: F401
from lora_jax.demo.llm import cli
from lora_jax.demo.llm import main  # noqa: F401
from lora_jax.demo.llm import perplexity  # noqa: F401

if __name__ == "__main__":
    cli()
