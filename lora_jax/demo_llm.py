"""``python -m lora_jax.demo_llm``: the SmolLM2 fine-tune, now :mod:`lora_jax.demo.llm`."""

from lora_jax.demo.llm import (
    PROMPT,  # noqa: F401
    cli,
    main,  # noqa: F401
    perplexity,  # noqa: F401
)

if __name__ == "__main__":
    cli()
