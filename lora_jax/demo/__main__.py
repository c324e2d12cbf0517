"""``python -m lora_jax.demo``: the command line of :mod:`lora_jax.demo.cli`."""

from lora_jax.demo.cli import main

main()
