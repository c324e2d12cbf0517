"""qwix LoRA params (lora_jax.interop.qwix): the same model run through qwix's LoraProvider
with converted params gives lora_jax's output, both ways."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax

qwix = pytest.importorskip("qwix")
# qwix 0.1.8 uses flax's deprecated nnx.VariableState alias
pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning")
from lora_jax.interop import qwix as qwix_interop  # noqa: E402


class Net(nn.Module):
    """Dense, DenseGeneral with two output axes, DenseGeneral with two input axes, Dense.

    (qwix 0.1.8's einsum rule fails on a Linen ``nn.Einsum``: it sets an attribute on the
    frozen module; its einsum path serves NNX models.)"""

    @nn.compact
    def __call__(self, x):
        h = jax.nn.gelu(nn.Dense(16)(x))
        h = nn.DenseGeneral((2, 8))(h)
        h = nn.DenseGeneral(8, axis=(-2, -1))(jnp.tanh(h))
        return nn.Dense(5)(h)


RULES = [qwix.LoraRule(module_path="Dense_0", rank=2, alpha=3.0),
         qwix.LoraRule(module_path=".*", rank=4, alpha=8.0)]
ALPHAS = {r"params/Dense_0/.*": 3.0, ".*": 8.0}


def random_like(tree, seed, scale=0.3):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), tree)


@pytest.fixture(scope="module")
def setup():
    model = Net()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 12)), jnp.float32)
    qmodel = qwix.apply_lora_to_model(model, qwix.LoraProvider(RULES))
    qvars = qmodel.init(jax.random.key(1), x)
    base = random_like({"params": {m: {k: v for k, v in p.items() if "_lora_" not in k}
                                   for m, p in qvars["params"].items()}}, 2)
    return model, qmodel, qvars, base, x


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_to_qwix_output_equals_lora_jax(setup):
    model, qmodel, qvars, base, x = setup
    rules = [lora_jax.Rule(pattern=r"params/Dense_0/kernel", r=2, alpha=3.0)]
    lora = lora_jax.init(base, r=4, alpha=8.0, key=jax.random.key(3), rules=rules,
                         targets=r".*kernel", in_axes={".*DenseGeneral_1.*": 2, ".*": 1})
    lora = random_like(lora, 4)
    # an rsLoRA leaf: its scale alpha/sqrt(r) is folded into lora_b for qwix's alpha/r
    dense1 = lora["params"]["Dense_1"]
    dense1["kernel"] = dense1["kernel"].replace(rslora=True)
    converted = qwix_interop.to_qwix(lora, base, like=qvars)
    assert converted["params"]["DenseGeneral_0"]["kernel_lora_b"].shape == (4, 16)
    assert converted["params"]["DenseGeneral_1"]["kernel_lora_a"].shape == (16, 4)
    want = jax.jit(lora_jax.apply(model.apply))(base, lora, x)
    got = jax.jit(qmodel.apply)(converted, x)
    assert rel_err(got, want) < 1e-5
    assert rel_err(model.apply(base, x), want) > 1e-2  # the adapters matter


def test_to_qwix_with_one_alpha_folds_each_scale(setup):
    model, _, _, base, x = setup
    lora = random_like(lora_jax.init(base, r=4, alpha=8.0, key=jax.random.key(5),
                                     targets=r".*Dense_(0|1)/kernel"), 6)
    qmodel = qwix.apply_lora_to_model(model, qwix.LoraProvider(module_path="Dense_.*", rank=4,
                                                               alpha=1.0))
    got = jax.jit(qmodel.apply)(qwix_interop.to_qwix(lora, base, alpha=1.0), x)
    assert rel_err(got, jax.jit(lora_jax.apply(model.apply))(base, lora, x)) < 1e-5


def test_from_qwix_output_equals_qwix(setup):
    model, qmodel, qvars, _, x = setup
    trained = random_like(qvars, 7)  # lora_b is zeros at qwix's init: give every param values
    params, lora = qwix_interop.from_qwix(trained, alpha=ALPHAS)
    assert "kernel_lora_a" not in params["params"]["Dense_0"]
    leaf = lora["params"]["DenseGeneral_0"]["kernel"]
    assert leaf.a.shape == (16, 4) and leaf.b.shape == (4, 2, 8) and leaf.scale == 2.0
    assert lora["params"]["Dense_0"]["kernel"].scale == 1.5
    two_in = lora["params"]["DenseGeneral_1"]["kernel"]  # kernel (2, 8, 8): two input axes
    assert two_in.in_axes == 2 and two_in.a.shape == (2, 8, 4)
    want = jax.jit(qmodel.apply)(trained, x)
    got = jax.jit(lora_jax.apply(model.apply))(params, lora, x)
    assert rel_err(got, want) < 1e-5
    # and back: the same arrays in qwix's shapes
    again = qwix_interop.to_qwix(lora, params, like=qvars)
    for got_leaf, want_leaf in zip(jax.tree.leaves(again), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(np.asarray(got_leaf), np.asarray(want_leaf))


def test_missing_half_names_the_path(setup):
    _, _, qvars, _, _ = setup
    broken = jax.tree.map(lambda v: v, qvars)
    del broken["params"]["Dense_1"]["kernel_lora_b"]
    with pytest.raises(ValueError, match=r"params/Dense_1/kernel_lora_a.*kernel_lora_b"):
        qwix_interop.from_qwix(broken, alpha=8.0)
    broken = jax.tree.map(lambda v: v, qvars)
    del broken["params"]["Dense_1"]["kernel_lora_a"]
    with pytest.raises(ValueError, match=r"params/Dense_1/kernel_lora_b.*kernel_lora_a"):
        qwix_interop.from_qwix(broken, alpha=8.0)


def test_bad_inputs_name_the_path(setup):
    _, _, qvars, base, _ = setup
    orphan = jax.tree.map(lambda v: v, qvars)
    del orphan["params"]["Dense_1"]["kernel"]
    with pytest.raises(ValueError, match=r"Dense_1/kernel_lora_a.*adapts.*params lack"):
        qwix_interop.from_qwix(orphan, alpha=8.0)
    with pytest.raises(ValueError, match=r"no alpha pattern matches 'params/Dense\w*_0/kernel'"):
        qwix_interop.from_qwix(qvars, alpha={".*Dense_1.*": 8.0})
    lora = lora_jax.init(base, r=3, key=jax.random.key(0), targets=r".*Dense_1/kernel")
    with pytest.raises(ValueError, match=r"Dense_1/kernel_lora_a.*rank-3"):
        qwix_interop.to_qwix(lora, base, like=qvars)  # qwix's rule has rank 4
