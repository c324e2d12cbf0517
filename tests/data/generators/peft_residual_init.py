"""Reference data for PiSSA/OLoRA adapters in PEFT files (tests/test_init_wrappers.py).

Run with the reference environment (torch, peft), from the repository root:

    /work/refenv/bin/python tests/data/generators/peft_residual_init.py

For each of ``init_lora_weights="pissa"`` and ``"olora"``: a small MLP (fc1: 8 -> 16, relu,
out: 16 -> 10; seed 5) gets ``get_peft_model`` with r=3, lora_alpha=6 (PEFT turns the base
weights into the residual), the LoRA factors are moved by ``0.05·randn`` (a "trained"
adapter), and the adapter is written with ``save_pretrained`` (its config keeps the init).
``peft_residual_init.npz`` holds the original weights, the residual PEFT made, an input and
the PEFT model's output.
"""

import json
import pathlib

import numpy as np
import peft
import torch

OUT = pathlib.Path(__file__).resolve().parents[1]
MODULES = ("fc1", "out")


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.out = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.out(torch.relu(self.fc1(x)))


def main():
    arrays = {}
    torch.manual_seed(5)
    x = torch.randn(4, 8)
    arrays["x"] = x.numpy()
    for init in ("pissa", "olora"):
        torch.manual_seed(5)
        model = MLP()
        for name in MODULES:
            layer = getattr(model, name)
            arrays[f"base/{name}.weight"] = layer.weight.detach().numpy().copy()
            arrays[f"base/{name}.bias"] = layer.bias.detach().numpy().copy()
        cfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=list(MODULES),
                              init_lora_weights=init)
        pm = peft.get_peft_model(model, cfg)
        torch.manual_seed(11)
        with torch.no_grad():
            for name in MODULES:
                layer = getattr(pm.base_model.model, name)
                arrays[f"{init}/residual/{name}.weight"] = (
                    layer.base_layer.weight.detach().numpy().copy())
                for factor in (layer.lora_A["default"], layer.lora_B["default"]):
                    factor.weight.add_(0.05 * torch.randn_like(factor.weight))
        pm.eval()
        with torch.no_grad():
            arrays[f"{init}/y"] = pm(x).numpy()
        pm.save_pretrained(OUT / "peft_residual_init" / init)
        (OUT / "peft_residual_init" / init / "README.md").unlink(missing_ok=True)  # a model card
    np.savez(OUT / "peft_residual_init.npz", **arrays)
    versions = {"torch": torch.__version__, "peft": peft.__version__}
    print(json.dumps(versions))


if __name__ == "__main__":
    main()
