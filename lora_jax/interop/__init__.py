"""Adapters for other runtimes: llama.cpp's GGUF LoRA files (:mod:`.gguf_lora`) and qwix's
LoRA parameters (:mod:`.qwix`).

An edge package: nothing in the core imports it, and each module imports its third-party
package (``gguf``, ``qwix``) only when used. PEFT folders for vLLM/SGLang are written by
:func:`lora_jax.peft.save`.
"""
