"""Writes tests/data/peft_config_fields.json: the fields of PEFT's LoraConfig and AdaLoraConfig.

Run with the reference environment (torch, peft), from the repository root:
    /work/refenv/bin/python tests/data/generators/peft_config_fields.py

For each config class: ``defaults`` (every dataclass field and its default, ``repr`` of values
JSON cannot hold) and ``saved`` (the ``adapter_config.json`` that ``save_pretrained`` writes for
a small MLP). tests/test_bad_inputs_files.py checks lora_jax.peft.config.FIELDS against them.
"""

import dataclasses
import json
import os
import tempfile

import peft
import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model

OUT = os.path.join(os.path.dirname(__file__), "..", "peft_config_fields.json")


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = jsonable(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = jsonable(f.default_factory())
        else:
            out[f.name] = "<required>"
    return out


def saved(config) -> dict:
    torch.manual_seed(0)
    model = get_peft_model(MLP(), config)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        with open(os.path.join(folder, "adapter_config.json")) as f:
            return json.load(f)


def main():
    data = {
        "peft_version": peft.__version__,
        "LORA": {"class": "LoraConfig", "defaults": defaults(LoraConfig),
                 "saved": saved(LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))},
        "ADALORA": {"class": "AdaLoraConfig", "defaults": defaults(AdaLoraConfig),
                    "saved": saved(AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                                 target_modules=["fc1", "fc2"]))},
    }
    with open(OUT, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
