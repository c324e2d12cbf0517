"""The main job runs end to end (tiny settings), writes its table, plot and adapters."""

import json
import os

from lora_jax import demo


def test_demo_all_methods_tiny(tmp_path, capsys):
    rows = demo.main(["--pretrain-steps", "3", "--steps", "6", "--d", "32", "--layers", "1",
                      "--batch", "2", "--seq", "16", "--quiet", "--out", str(tmp_path)])
    assert [r[0] for r in rows] == ["full", "lora", "adalora", "qlora"]
    out = capsys.readouterr().out
    assert "loss before" in out and f"output folder: {tmp_path}" in out
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
    cfg = json.loads((tmp_path / "lora" / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    ada = json.loads((tmp_path / "adalora" / "peft" / "adapter_config.json").read_text())
    assert ada["peft_type"] == "LORA"  # finalized AdaLoRA is a plain LoRA with a rank pattern
    for _, n, size, t, peak, before, after in rows:
        assert n > 0 and size > 0 and t > 0 and peak > 0 and before > 0 and after > 0
    assert rows[1][1] < rows[0][1]  # LoRA trains fewer parameters than full fine-tuning
    assert os.path.isdir(tmp_path / "full")


def test_demo_multi_tiny(capsys):
    out = demo.main(["--method", "multi", "--pretrain-steps", "2", "--steps", "3", "--d", "16",
                     "--layers", "1", "--seq", "16", "--quiet"])
    text = capsys.readouterr().out
    assert "together" in text and "generated from one mixed batch" in text
    for name, (base, together, alone) in ((k, v) for k, v in out.items() if k != "generated"):
        assert abs(together - alone) < 1e-3 and together < base, name
    assert len(out["generated"]) == 5  # four adapters and the base alone


def test_demo_variants_tiny(tmp_path):
    # DoRA (a leaf kind of its own) and LoftQ (a base of its own) end to end; LoRA+ and
    # OLoRA change only the optimizer and the init, which lora_jax.demo.variants sets up.
    rows = demo.main(["--method", "dora,loftq", "--pretrain-steps", "2", "--steps", "3", "--d",
                      "32", "--layers", "1", "--batch", "2", "--seq", "16", "--quiet", "--out",
                      str(tmp_path)])
    assert [r[0] for r in rows] == ["dora", "loftq"]
    cfg = json.loads((tmp_path / "dora" / "peft" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    for _, n, size, t, peak, before, after in rows:
        assert n > 0 and size > 0 and t > 0 and peak > 0 and before > 0 and after > 0
    assert rows[0][1] > rows[1][1]  # DoRA's magnitudes on top of LoRA's factors


def test_demo_moe_tiny(tmp_path, capsys):
    rows = demo.main(["--model", "moe", "--pretrain-steps", "3", "--steps", "6", "--d", "32",
                      "--layers", "1", "--batch", "2", "--seq", "16", "--quiet", "--out",
                      str(tmp_path)])
    assert [r[0] for r in rows] == ["full", "lora", "qlora"]
    out = capsys.readouterr().out
    assert "loss before" in out and f"output folder: {tmp_path}" in out
    # d=32, 4 experts, expert_ffn=32, r=8, 1 layer: gate_up A (4,32,8) + B (4,8,64),
    # down A (4,32,8) + B (4,8,32) -> 1024 + 2048 + 1024 + 1024
    assert "5,120 of them on the 2 expert kernels" in out, out
    cfg = json.loads((tmp_path / "lora" / "peft" / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == ["model.layers.0.mlp.experts.down_proj",
                                                "model.layers.0.mlp.experts.gate_up_proj"]
    assert "mlp.gate" not in json.dumps(cfg["target_modules"])  # the router stays frozen
    from safetensors.numpy import load_file

    for method in ("lora", "qlora"):  # the experts' B factors (zero at init) were trained
        tensors = load_file(tmp_path / method / "peft" / "adapter_model.safetensors")
        expert_b = [v for k, v in tensors.items() if ".experts." in k and "lora_B" in k]
        assert len(expert_b) == 2 and all(abs(v).max() > 0 for v in expert_b), method
    for _, n, size, t, peak, before, after in rows:
        assert n > 0 and size > 0 and t > 0 and peak > 0 and before > 0 and after > 0
    assert rows[1][1] < rows[0][1]  # LoRA trains fewer parameters than full fine-tuning
    assert rows[1][1] == rows[2][1]  # QLoRA: the same adapters on an NF4 base
