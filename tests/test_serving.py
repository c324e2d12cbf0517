"""PEFT folders that inference servers load: ``lora_jax.peft.save(..., for_servers=True)``.

The requirements below are read from the servers' loaders (vLLM and SGLang are not installed
here, so the test checks the written folder against them and redoes their arithmetic):

* vLLM ``vllm/lora/models.py`` (``LoRAModel.from_local_checkpoint``): the folder holds
  ``adapter_config.json`` and ``adapter_model.safetensors``; it reads ``r`` and
  ``lora_alpha``.
* vLLM ``vllm/lora/peft_helper.py`` (``PEFTHelper.from_dict``): ``r``, ``lora_alpha``,
  ``target_modules`` are required; ``modules_to_save`` must be empty and ``use_dora`` false;
  one scale for every module, ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``); no
  ``rank_pattern``/``alpha_pattern`` in the scale (a module's rank comes from its tensors).
* vLLM ``vllm/lora/utils.py`` (``parse_fine_tuned_lora_name``): tensor names
  ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``; ``<module>``'s last
  part must be one of the model's LoRA modules (Llama: ``q_proj`` ... ``down_proj``).
* SGLang ``python/sglang/srt/lora/lora_config.py`` (``LoRAConfig``): ``peft_type`` is
  ``"lora"`` (any case), ``target_modules``, ``r``, ``lora_alpha`` present; and
  ``python/sglang/srt/lora/lora.py`` (``LoRAAdapter``): ``scaling = lora_alpha / r`` for every
  module, ``use_rslora`` not read.
* llama.cpp ``convert_lora_to_gguf.py``: reads ``base_model_name_or_path`` to find the base
  config when ``--base`` is not given, and ``lora_alpha``.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as st

import lora_jax
from lora_jax import peft
from lora_jax.models import llama as L

CFG = L.LlamaConfig(vocab=64, d=32, layers=2, heads=4, kv_heads=2, ffn=48)
LLAMA_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                      "down_proj"}


def random_lora(seed=0, rslora=True):
    """Mixed ranks, alphas and an rsLoRA module: what a single server scale gets wrong."""
    base = jax.eval_shape(L.Llama(CFG).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    base = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), base)
    rules = [lora_jax.Rule(pattern=r".*layers_0/self_attn/q_proj/kernel", r=2, alpha=16.0),
             lora_jax.Rule(pattern=r".*v_proj/kernel", r=4, alpha=4.0)]
    lora = lora_jax.init(base, r=4, alpha=8.0, key=jax.random.key(seed), rules=rules,
                         targets=r".*(q_proj|v_proj|down_proj)/kernel")
    down = lora["params"]["layers_1"]["mlp"]["down_proj"]
    down["kernel"] = down["kernel"].replace(rslora=rslora)
    rng = np.random.default_rng(seed)
    return base, jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), lora)


def server_deltas(folder, honour_rslora):
    """Each module's update as vLLM/SGLang compute it: one scale from the config."""
    cfg = json.load(open(folder / "adapter_config.json"))
    tensors = st.load_file(str(folder / "adapter_model.safetensors"))
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / np.sqrt(r) if (honour_rslora and cfg.get("use_rslora")) else alpha / r
    out = {}
    for name, a in tensors.items():
        if name.endswith(".lora_A.weight"):
            module = name[len("base_model.model."): -len(".lora_A.weight")]
            b = tensors[name.replace(".lora_A.", ".lora_B.")]
            out[module] = scale * (b.astype(np.float64) @ a.astype(np.float64))  # (out, in)
    return out


def wanted_deltas(lora):
    return {"model." + p.removeprefix("params/").removesuffix("/kernel").replace("/", ".")
            .replace("layers_", "layers."): np.asarray(leaf.delta(), np.float64).T
            for p, leaf in lora_jax.lora.leaves(lora).items()}


def max_rel(got, want):
    assert set(got) == set(want)
    return max(float(np.max(np.abs(got[k] - want[k])) / np.max(np.abs(want[k]))) for k in want)


def test_folder_meets_the_servers_checklist(tmp_path):
    _, lora = random_lora()
    cfg = peft.save(tmp_path, lora, name_map="llama", for_servers=True,
                    base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    written = json.load(open(tmp_path / "adapter_config.json"))
    assert written == json.loads(json.dumps(cfg))
    tensors = st.load_file(str(tmp_path / "adapter_model.safetensors"))
    checklist = {
        # vllm/lora/models.py, vllm/lora/peft_helper.py
        "vLLM: r, lora_alpha, target_modules": all(k in written for k in (
            "r", "lora_alpha", "target_modules")),
        "vLLM: modules_to_save empty": not written.get("modules_to_save"),
        "vLLM: use_dora false": written.get("use_dora") is False,
        "vLLM: bias none": written.get("bias") == "none",
        # vllm/lora/utils.py parse_fine_tuned_lora_name
        "vLLM: tensor names": all(
            n.startswith("base_model.model.") and n.endswith((".lora_A.weight", ".lora_B.weight"))
            for n in tensors),
        "vLLM: module names end in the model's LoRA modules": all(
            n.split(".")[-3] in LLAMA_LORA_MODULES for n in tensors),
        # python/sglang/srt/lora/lora_config.py
        "SGLang: peft_type lora": str(written.get("peft_type")).lower() == "lora",
        "SGLang: no rsLoRA (not read)": written.get("use_rslora") is False,
        # convert_lora_to_gguf.py
        "llama.cpp: base_model_name_or_path":
            written.get("base_model_name_or_path") == "HuggingFaceTB/SmolLM2-135M-Instruct",
        "task_type CAUSAL_LM": written.get("task_type") == "CAUSAL_LM",
    }
    assert all(checklist.values()), {k: v for k, v in checklist.items() if not v}
    # the servers' one scale gives every module its own update (vLLM honours use_rslora,
    # SGLang does not: with use_rslora false both read the same)
    want = wanted_deltas(lora)
    assert max_rel(server_deltas(tmp_path, honour_rslora=True), want) < 1e-6
    assert max_rel(server_deltas(tmp_path, honour_rslora=False), want) < 1e-6


def test_peft_reads_the_server_folder_as_the_same_adapter(tmp_path):
    base, lora = random_lora(1)
    peft.save(tmp_path, lora, name_map="llama", for_servers=True)
    back = peft.load(tmp_path, base, name_map="llama")
    got = {p: np.asarray(x.delta(), np.float64) for p, x in lora_jax.lora.leaves(back).items()}
    for p, leaf in lora_jax.lora.leaves(lora).items():
        want = np.asarray(leaf.delta(), np.float64)
        assert float(np.max(np.abs(got[p] - want)) / np.max(np.abs(want))) < 1e-6, p


def test_plain_save_is_what_servers_misread(tmp_path):
    """Why for_servers exists: the PEFT folder's per-module patterns and rsLoRA flag are
    exact for PEFT, but the servers' single scale gets these modules wrong."""
    _, lora = random_lora(2, rslora=False)  # plain save refuses mixed rsLoRA
    peft.save(tmp_path, lora, name_map="llama")
    assert max_rel(server_deltas(tmp_path, honour_rslora=True), wanted_deltas(lora)) > 0.1


def test_for_servers_refuses_dora(tmp_path):
    base, _ = random_lora()
    dora = lora_jax.init(base, r=2, key=jax.random.key(0), targets=r".*q_proj/kernel", dora=True)
    with pytest.raises(ValueError, match=r"for_servers.*DoRA"):
        peft.save(tmp_path, dora, name_map="llama", for_servers=True)
