"""Small models written in other codebases' styles, to test lora_jax on code it did not shape.

Each module builds a random-initialised tiny float32 model and exposes ``make(key)`` returning
``(fn, params, args)`` with ``fn(params, *args)`` the forward pass. None of them imports
lora_jax: they are written as their originals are, and the tests adapt them from outside.

* :mod:`styles.gemma_style`: Google's gemma library (Linen, ``Einsum`` modules over ``w``,
  heads-first kernels, fused kv/qkv, GQA, gated MLP, tied embedder, RoPE, a KV cache).
* :mod:`styles.griffin_style`: RecurrentGemma's Griffin (RG-LRU with block-diagonal gates, a
  temporal Conv1D, Dense projections, an einsum MLP over a stacked ``w``).
* :mod:`styles.scan_style`: a MaxText-like decoder, layers stacked with ``nn.scan`` over
  ``nn.remat``, Dense projections with a fused qkv.
* :mod:`styles.nnx_style`: a Flax NNX model, used through ``nnx.split``/``nnx.merge``.
* :mod:`styles.mlp_style`: a plain Dense MLP (the control).
"""
