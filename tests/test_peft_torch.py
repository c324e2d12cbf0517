"""lora_jax.peft against PEFT itself (PyTorch): skipped unless ``torch`` and ``peft`` import.

Adapters written by lora_jax load with ``PeftModel.from_pretrained`` and give the JAX outputs;
adapters written by PEFT's ``save_pretrained`` load into JAX and give PEFT's outputs.
"""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

torch = pytest.importorskip("torch")
peft_torch = pytest.importorskip("peft")

import lora_jax  # noqa: E402
from lora_jax import adalora, peft  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data"
MODULES = ("fc1", "fc2", "out")


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        g = lambda h: jax.nn.gelu(h, approximate=False)  # noqa: E731
        return nn.Dense(10, name="out")(g(nn.Dense(48, name="fc2")(g(nn.Dense(64, name="fc1")(x)))))


class TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(32, 64)
        self.fc2 = torch.nn.Linear(64, 48)
        self.out = torch.nn.Linear(48, 10)

    def forward(self, x):
        g = torch.nn.functional.gelu
        return self.out(g(self.fc2(g(self.fc1(x)))))


def _state(path):
    return {k: torch.from_numpy(np.array(v)) for k, v in load_file(path).items()}


def _torch_mlp():
    m = TorchMLP()
    m.load_state_dict(_state(DATA / "peft_mlp_base.safetensors"))
    return m.eval()


def _params():
    w = load_file(DATA / "peft_mlp_base.safetensors")
    return {"params": {m: {"kernel": jnp.asarray(w[f"{m}.weight"].T),
                           "bias": jnp.asarray(w[f"{m}.bias"])} for m in MODULES}}


def _x(shape=(7, 32), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _randomize(lora, seed=0, scale=0.3):
    leaves, tdef = jax.tree.flatten(lora)
    rng = np.random.default_rng(seed)
    return tdef.unflatten([jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32)
                           for x in leaves])


def _peft_out(model, directory, x):
    pm = peft_torch.PeftModel.from_pretrained(model, str(directory)).eval()
    with torch.no_grad():
        return pm(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("rslora", [False, True])
def test_our_lora_adapter_in_peft(tmp_path, rslora):
    params, x = _params(), _x()
    rules = [lora_jax.Rule(pattern=".*fc1.*", r=3, alpha=5.0),
             lora_jax.Rule(pattern=".*fc2.*", r=2, alpha=4.0 if not rslora else 5.0),
             lora_jax.Rule(pattern=".*out.*", r=2, alpha=5.0)]
    lora = _randomize(lora_jax.init(params, key=jax.random.key(0), rules=rules, rslora=rslora))
    peft.save(tmp_path, lora)
    want = np.asarray(lora_jax.apply(MLP().apply)(params, lora, jnp.asarray(x)))
    np.testing.assert_allclose(_peft_out(_torch_mlp(), tmp_path, x), want, rtol=1e-5, atol=1e-5)


def test_our_adalora_adapter_in_peft(tmp_path):
    params, x = _params(), _x()
    lora = _randomize(adalora.init(params, init_r=4, target_r=2, alpha=6.0, key=jax.random.key(1)))
    peft.save(tmp_path, lora, extra_config={"total_step": 10})
    want = np.asarray(lora_jax.apply(MLP().apply)(params, lora, jnp.asarray(x)))
    np.testing.assert_allclose(_peft_out(_torch_mlp(), tmp_path, x), want, rtol=1e-5, atol=1e-5)


def test_peft_adapter_with_patterns_in_jax(tmp_path):
    torch.manual_seed(0)
    cfg = peft_torch.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2", "out"],
                                rank_pattern={"fc2": 2}, alpha_pattern={"out": 3},
                                init_lora_weights=False)  # random A and B: a non-trivial adapter
    pm = peft_torch.get_peft_model(_torch_mlp(), cfg).eval()
    pm.save_pretrained(str(tmp_path))
    x = _x()
    with torch.no_grad():
        want = pm(torch.from_numpy(x)).numpy()
    params = _params()
    lora = peft.load(tmp_path, params)
    got = np.asarray(lora_jax.apply(MLP().apply)(params, lora, jnp.asarray(x)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and written back, PEFT reads the same adapter
    peft.save(tmp_path / "again", lora)
    np.testing.assert_allclose(_peft_out(_torch_mlp(), tmp_path / "again", x), want, rtol=1e-5,
                               atol=1e-5)


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):  # NHWC
        return nn.Conv(6, (3, 3), padding="VALID", name="conv")(x)


class TorchConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 6, 3)

    def forward(self, x):  # NCHW
        return self.conv(x)


def test_conv_adapter_in_peft(tmp_path):
    x = _x((2, 8, 8, 4), seed=1)
    params = ConvNet().init(jax.random.key(0), jnp.asarray(x))
    lora = _randomize(lora_jax.init(params, r=2, alpha=3.0, key=jax.random.key(1)))
    peft.save_merged(tmp_path / "base.safetensors", params)
    peft.save(tmp_path / "adapter", lora)
    model = TorchConvNet()
    model.load_state_dict(_state(tmp_path / "base.safetensors"))
    got = _peft_out(model.eval(), tmp_path / "adapter", x.transpose(0, 3, 1, 2))
    want = np.asarray(lora_jax.apply(ConvNet().apply)(params, lora, jnp.asarray(x)))
    np.testing.assert_allclose(got.transpose(0, 2, 3, 1), want, rtol=1e-5, atol=1e-5)
