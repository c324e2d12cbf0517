"""Reference data for tests/test_moe_model.py: a tiny random Qwen3-MoE and a PEFT expert adapter.

Run with the reference environment (torch, transformers 5.x, peft 0.21), from the repository root:

    /work/refenv/bin/python tests/data/generators/make_moe_refs.py

Writes under ``tests/data/moe/``:

* ``model/``: ``Qwen3MoeForCausalLM.save_pretrained`` (config.json, model.safetensors, float32) of
  a random model: vocab 48, hidden 32, 3 layers (layer 1 a dense MLP of width 32 via
  ``mlp_only_layers``), 4 query / 2 key-value heads of head_dim 12, 8 experts, top-2 with
  ``norm_topk_prob``, moe_intermediate 16. Weights are redrawn larger than the default init
  (std 0.02) so that the routing and the logits depend visibly on every weight; q/k norms are
  not all ones.
* ``peft_lora/``: ``PeftModel.save_pretrained`` of ``LoraConfig(r=4, lora_alpha=8,
  target_modules=["q_proj", "v_proj"], target_parameters=["mlp.experts.gate_up_proj",
  "mlp.experts.down_proj"], init_lora_weights=False)`` with every lora_B redrawn (non-zero).
* ``io.npz``: ``input_ids`` (2, 12) int64, ``logits`` (2, 12, 48) float32 of the base model,
  ``peft_logits`` of the adapted model, ``route_gap``: the smallest gap between the k-th and the
  (k+1)-th router probability over all tokens and MoE layers (so that float32 rounding cannot
  change which experts a token goes to).

``make_moe_refs.py --check FOLDER`` instead loads the adapter folder FOLDER (written by
``lora_jax.peft.save``) with ``PeftModel.from_pretrained`` on the reference model and compares
its logits for ``io.npz``'s ids with ``FOLDER/logits.npy`` (lora_jax's logits of the same
adapter), printing the largest difference relative to max |logit|.

``make_moe_refs.py --legacy FOLDER`` writes an adapter in older transformers' per-expert module
layout (``mlp.experts.{j}.{gate,up,down}_proj`` and the dense layer's ``mlp.{gate,up,down}_proj``,
r=2, lora_alpha=6, random factors) to FOLDER and PEFT's logits for it
(``FOLDER/peft_logits.npy``): PEFT 0.21 converts it for transformers 5's fused experts.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import peft
import torch
import transformers
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "moe")


def tiny_config() -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=48, hidden_size=32, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, moe_intermediate_size=16,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[1], rms_norm_eps=1e-6, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
        tie_word_embeddings=False)


def randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif "mlp.gate." in name:  # the router: decisive routing
                p.copy_(0.6 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)


def route_gap(model, ids) -> float:
    """The smallest (k-th minus (k+1)-th) router probability over tokens and MoE layers."""
    gaps = []

    def hook(module, args, out):
        probs = torch.softmax(out[0].float(), dim=-1)
        top = torch.topk(probs, module.top_k + 1, dim=-1).values
        gaps.append(float((top[:, -2] - top[:, -1]).min()))

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if type(m).__name__ == "Qwen3MoeTopKRouter"]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return min(gaps)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    cfg = tiny_config()
    model = Qwen3MoeForCausalLM(cfg).eval()
    randomize(model, 1)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(ids).logits.float().numpy()
    gap = route_gap(model, ids)
    model.save_pretrained(os.path.join(OUT, "model"), safe_serialization=True)
    os.remove(os.path.join(OUT, "model", "generation_config.json"))  # not read

    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           target_parameters=["mlp.experts.gate_up_proj",
                                              "mlp.experts.down_proj"],
                           init_lora_weights=False)
    pmodel = peft.get_peft_model(model, lcfg).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pmodel.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        peft_logits = pmodel(ids).logits.float().numpy()
    pmodel.save_pretrained(os.path.join(OUT, "peft_lora"))
    os.remove(os.path.join(OUT, "peft_lora", "README.md"))  # PEFT's model card template
    np.savez(os.path.join(OUT, "io.npz"), input_ids=ids.numpy(), logits=logits,
             peft_logits=peft_logits, route_gap=np.float32(gap))
    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                      "peft": peft.__version__, "route_gap": gap,
                      "max_logit": float(np.abs(logits).max()),
                      "peft_change": float(np.abs(peft_logits - logits).max())}),
          file=sys.stderr)


def check(folder: str) -> None:
    model = Qwen3MoeForCausalLM.from_pretrained(os.path.join(OUT, "model")).eval()
    pmodel = peft.PeftModel.from_pretrained(model, folder).eval()
    ids = torch.from_numpy(np.load(os.path.join(OUT, "io.npz"))["input_ids"])
    with torch.no_grad():
        got = pmodel(ids).logits.float().numpy()
    want = np.load(os.path.join(folder, "logits.npy"))
    with torch.no_grad(), pmodel.disable_adapter():
        base = pmodel(ids).logits.float().numpy()
    scale = np.abs(want).max()
    print(json.dumps({"rel_err": float(np.abs(got - want).max() / scale),
                      "adapter_change": float(np.abs(base - want).max() / scale)}))


def legacy(folder: str) -> None:
    from safetensors.torch import save_file

    model = Qwen3MoeForCausalLM.from_pretrained(os.path.join(OUT, "model")).eval()
    cfg = model.config
    gen = torch.Generator().manual_seed(11)
    f, d, ffn = cfg.moe_intermediate_size, cfg.hidden_size, cfg.intermediate_size
    tensors = {}
    for i in range(cfg.num_hidden_layers):
        if i in cfg.mlp_only_layers:
            mods = {f"model.layers.{i}.mlp.{p}": s
                    for p, s in (("gate_proj", (ffn, d)), ("up_proj", (ffn, d)),
                                 ("down_proj", (d, ffn)))}
        else:
            mods = {f"model.layers.{i}.mlp.experts.{j}.{p}": s for j in range(cfg.num_experts)
                    for p, s in (("gate_proj", (f, d)), ("up_proj", (f, d)),
                                 ("down_proj", (d, f)))}
        for name, (n_out, n_in) in mods.items():
            key = "base_model.model." + name
            tensors[key + ".lora_A.weight"] = 0.3 * torch.randn((2, n_in), generator=gen)
            tensors[key + ".lora_B.weight"] = 0.3 * torch.randn((n_out, 2), generator=gen)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as fh:
        json.dump({"peft_type": "LORA", "r": 2, "lora_alpha": 6, "lora_dropout": 0.0,
                   "target_modules": ["gate_proj", "up_proj", "down_proj"], "bias": "none"}, fh)
    pmodel = peft.PeftModel.from_pretrained(model, folder).eval()
    ids = torch.from_numpy(np.load(os.path.join(OUT, "io.npz"))["input_ids"])
    with torch.no_grad():
        np.save(os.path.join(folder, "peft_logits.npy"), pmodel(ids).logits.float().numpy())
    conv = pmodel.peft_config["default"]
    print(json.dumps({"target_modules": sorted(conv.target_modules or []),
                      "target_parameters": sorted(conv.target_parameters or [])}))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        check(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "--legacy":
        legacy(sys.argv[2])
    else:
        main()
