"""Hugging Face PEFT's adapter format: adapters that move between PyTorch and JAX.

:func:`save` writes ``adapter_config.json`` and ``adapter_model.safetensors`` that
``peft.PeftModel.from_pretrained`` loads (``peft_type`` LORA or ADALORA); :func:`load` reads one
into a LoRA tree for the matching Flax model; :func:`save_merged` exports the merged weights as a
PyTorch-layout safetensors checkpoint. Only JSON and safetensors are read or written (no pickle).

Layouts (PEFT ``tuners/lora/layer.py``, ``tuners/adalora/layer.py``): a Flax kernel is
``(*in, *out)``, the transpose of a ``torch.nn.Linear`` weight ``(out, in)``, with multi-axis
kernels flattened row-major into the ``(in, out)`` matrix that the torch ``Linear`` sees. So

* LoRA ``lora_A.weight (r, in) = a.T`` and ``lora_B.weight (out, r) = b.T``;
* Conv kernels ``(*spatial, cin, cout)``: ``lora_A.weight (r, cin, *spatial)``, ``lora_B.weight
  (cout, r, 1, ...)`` (PEFT's ConvNd LoRA: a conv, then a 1x1 conv);
* Embeddings ``(vocab, d)``: ``lora_embedding_A (r, vocab) = a.T``, ``lora_embedding_B (d, r) =
  b.T``;
* AdaLoRA: ``lora_A (r, in) = P.T``, ``lora_B (out, r) = Q.T``, ``lora_E (r, 1)``.

Module names come from a *name map* from Flax parameter paths ("params/fc1/kernel") to torch
module names ("fc1"): a callable, a dict (exact path or ``re.fullmatch`` regex -> replacement,
expanded with the match's groups), the name of an entry of :data:`NAME_MAPS`, or ``None`` for
:func:`default_name_map`. A name may hold ``{i}`` (and ``{j}``, ``{k}``) for the stacked axes of
``nn.scan`` parameters, one module per layer. An entry may map one fused Flax kernel to a list of
``(module name, slice of the flattened output axis)``: PEFT modules that share ``lora_A``, each
with its slice of ``lora_B`` (a fused qkv kernel saved as ``q_proj``, ``k_proj``, ``v_proj``).

The package: ``names.py`` (name maps), ``modules.py`` (the PEFT modules of each Flax
parameter), ``config.py`` (``adapter_config.json`` and PEFT's option rules), ``save.py``,
``load.py`` and ``build.py`` (module tensors to adapter leaves), ``export.py``
(:func:`save_merged`).

>>> import tempfile, jax, jax.numpy as jnp, lora_jax
>>> from lora_jax import peft
>>> params = {"params": {"fc1": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}}
>>> lora = lora_jax.init(params, r=2, alpha=4, key=jax.random.key(0))
>>> d = tempfile.mkdtemp()
>>> cfg = peft.save(d, lora)
>>> cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["target_modules"]
('LORA', 2, 4, ['fc1'])
>>> back = peft.load(d, params)
>>> bool(jnp.array_equal(back["params"]["fc1"]["kernel"].a, lora["params"]["fc1"]["kernel"].a))
True
"""

from __future__ import annotations

from lora_jax.peft import config
from lora_jax.peft.config import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from lora_jax.peft.export import save_merged
from lora_jax.peft.load import load
from lora_jax.peft.modules import module_names
from lora_jax.peft.names import NAME_MAPS, NameMap, default_name_map
from lora_jax.peft.save import save

__all__ = [
    "CONFIG_NAME",
    "NAME_MAPS",
    "PREFIX",
    "WEIGHTS_NAME",
    "NameMap",
    "config",
    "default_name_map",
    "load",
    "module_names",
    "save",
    "save_merged",
]
