"""Random tiny Llama checkpoints saved by transformers, with their logits (tests/test_hf_config.py).

Run with the reference environment (torch, transformers, safetensors):

    /work/refenv/bin/python tests/data/generators/make_llama_config_refs.py tests/data/llama_config

Each case is a ``LlamaForCausalLM`` (vocab 64, hidden 32, 2 layers, 4 heads, 2 key/value heads)
whose ``LlamaConfig`` differs from the plain one in one math-changing key. Weights are drawn with a
fixed seed from N(0, 0.15) (norm weights 1 + N(0, 0.2), biases N(0, 0.2)) so that attention is far
from uniform and every config key moves the logits well beyond the tests' tolerance. Each case's
folder holds ``save_pretrained``'s ``config.json`` and ``model.safetensors`` plus ``io.npz``:
``input_ids`` (2, 24) int64 and ``logits`` (2, 24, 64) float32 from ``model(input_ids)``
(eval mode).
"""

import json
import os
import sys

import numpy as np
import torch
import transformers

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                          "rope_theta": 10000.0})
CASES = {
    "default": {},
    "rope_theta_1e6": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    # original_max_position_embeddings 16 < the 24 test positions: the llama3 scaling matters
    "rope_llama3": {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    "rope_linear": {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0,
                                        "factor": 4.0}},
    # original 256, untruncated: the ramp between beta_fast and beta_slow is fractional
    "rope_yarn": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                      "original_max_position_embeddings": 256,
                                      "truncate": False},
                  "max_position_embeddings": 1024},
    "gelu": {"hidden_act": "gelu"},
    "gelu_pytorch_tanh": {"hidden_act": "gelu_pytorch_tanh"},
    "biases": {"attention_bias": True, "mlp_bias": True},
    "head_dim_16": {"head_dim": 16},
    "untied": {"tie_word_embeddings": False},
}
SEQ = (2, 24)


def build(name: str, overrides: dict, out: str) -> None:
    torch.manual_seed(1000 + sorted(CASES).index(name))
    cfg = transformers.LlamaConfig(**{**BASE, **overrides})
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif pname.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
        ids = torch.randint(0, BASE["vocab_size"], SEQ, generator=torch.Generator().manual_seed(7))
        logits = model(ids).logits.float()
    folder = os.path.join(out, name)
    model.save_pretrained(folder)
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(folder, extra)):
            os.remove(os.path.join(folder, extra))
    np.savez(os.path.join(folder, "io.npz"), input_ids=ids.numpy(), logits=logits.numpy())
    print(name, tuple(logits.shape), f"max|logit| {logits.abs().max():.3f}")


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/data/llama_config"
    torch.set_num_threads(1)
    for name, overrides in CASES.items():
        build(name, overrides, out)
    with open(os.path.join(out, "versions.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__}, f,
                  indent=1)


if __name__ == "__main__":
    main()
