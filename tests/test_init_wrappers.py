"""Every registered init scheme through every wrapper (issue 21): the adapted model equals the
original model before training.

Wrappers: the functional ``init`` + ``apply`` (DoRA off and on), ``init`` on a quantized base,
``lora_jax.nnx.LoRA`` (DoRA off and on), ``lora_jax.nnx.AdaLoRA``, the functional
``adalora.init``, and ``lora_jax.stack`` of one adapter with its base. Models: a Linen MLP and
an NNX MLP with random weights and biases; inputs are fresh random draws. A combination the
scheme does not support must raise an error naming it. The reference is the original model's
output (float32, tolerance relative to the output scale).
"""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax
from lora_jax import adalora, init_schemes, loftq
from lora_jax.nnx import AdaLoRA, LoRA

D_IN, D_HID, D_OUT, R = 12, 16, 8, 3
SCHEMES = init_schemes.names()
TOL = 2e-5  # max |out - ref| / max |ref|, float32
DATA = pathlib.Path(__file__).parent / "data"


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D_OUT)(nn.gelu(nn.Dense(D_HID)(x)))


def _nnx_mlp():
    return nnx.Sequential(nnx.Linear(D_IN, D_HID, rngs=nnx.Rngs(0)), nnx.gelu,
                          nnx.Linear(D_HID, D_OUT, rngs=nnx.Rngs(1)))


def _randomized(tree, seed):
    """Every array replaced by a fresh N(0, 1) draw (biases too, so none is zero)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree)


def _linen():
    model = LinenMLP()
    x = jnp.zeros((1, D_IN))
    return model, _randomized(model.init(jax.random.key(0), x), 1)


def _nnx():
    model = _nnx_mlp()
    nnx.update(model, _randomized(nnx.state(model, nnx.Param), 2))
    return model


def _x(seed):
    return jnp.asarray(np.random.default_rng(100 + seed).standard_normal((5, D_IN)), jnp.float32)


def _close(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
    assert err < TOL, err


def _scheme(name):
    return init_schemes.get(name, "test")


# ---- the functional API on a Linen MLP


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("name", SCHEMES)
def test_functional_init_starts_at_the_model(name, dora):
    model, params = _linen()
    x = _x(0)
    scheme = _scheme(name)
    if scheme.factors is None:  # LoftQ: its own builder returns the base
        with pytest.raises(ValueError, match=f"init={name!r} builds the base.*{scheme.builder}"):
            lora_jax.init(params, R, key=jax.random.key(3), init=name, dora=dora)
        return
    lora = lora_jax.init(params, R, key=jax.random.key(3), init=name, dora=dora)
    base = init_schemes.residual_base(params, lora)
    if scheme.changes_base:  # the adapter is not trivially zero: the check has teeth
        assert max(float(jnp.max(jnp.abs(x.b))) for x in lora_jax.lora.leaves(lora).values()) > 0
        assert not jnp.allclose(base["params"]["Dense_0"]["kernel"],
                                params["params"]["Dense_0"]["kernel"])
    _close(lora_jax.apply(model.apply, strict=True)(base, lora, x), model.apply(params, x))


@pytest.mark.parametrize("name", SCHEMES)
def test_init_on_a_quantized_base_starts_at_the_quantized_model(name):
    model, params = _linen()
    x = _x(1)
    qbase = lora_jax.quantize(params, "int8")
    ref = model.apply(lora_jax.dequantize_tree(qbase), x)
    scheme = _scheme(name)
    if scheme.factors is None:
        with pytest.raises(ValueError, match="builds the base"):
            lora_jax.init(qbase, R, key=jax.random.key(3), init=name)
    elif not scheme.quantized_base:
        with pytest.raises(ValueError, match=f"init={name!r} decomposes the dense kernel.*"
                                             "quantized"):
            lora_jax.init(qbase, R, key=jax.random.key(3), init=name)
    else:
        lora = lora_jax.init(qbase, R, key=jax.random.key(3), init=name)
        _close(lora_jax.apply(model.apply, strict=True)(qbase, lora, x), ref)


def test_loftq_builder_starts_at_its_merged_model():
    # LoftQ is approximate by design (Q + s·A·B ≈ W): the model starts as the merged-weight
    # model over its quantized base, and nearer the original than plain quantization.
    model, params = _linen()
    x = _x(2)
    qbase, lora = loftq.init(params, R, key=jax.random.key(3), num_iter=2, block_size=16)
    out = lora_jax.apply(model.apply, strict=True)(qbase, lora, x)
    _close(out, model.apply(lora_jax.merge(qbase, lora), x))
    plain = model.apply(lora_jax.dequantize_tree(lora_jax.quantize(params, "nf4", block_size=16,
                                                                   double_quant=False)), x)
    ref = model.apply(params, x)
    assert float(jnp.linalg.norm(out - ref)) < float(jnp.linalg.norm(plain - ref))
    assert {x.residual_init for x in lora_jax.lora.leaves(lora).values()} == {"loftq"}


@pytest.mark.parametrize("name", SCHEMES)
def test_functional_adalora_init(name):
    model, params = _linen()
    x = _x(3)
    if not _scheme(name).adalora:
        with pytest.raises(ValueError, match=f"init={name!r} is not supported by AdaLoRA"):
            adalora.init(params, 4, 2, key=jax.random.key(3), init=name)
        return
    lora = adalora.init(params, 4, 2, key=jax.random.key(3), init=name)
    _close(lora_jax.apply(model.apply, strict=True)(params, lora, x), model.apply(params, x))


@pytest.mark.parametrize("name", SCHEMES)
def test_stack_of_one_adapter_with_its_base(name):
    model, params = _linen()
    x = _x(4)
    scheme = _scheme(name)
    if scheme.factors is None:
        base, lora = loftq.init(params, R, key=jax.random.key(3), block_size=16)
    else:
        lora = lora_jax.init(params, R, key=jax.random.key(3), init=name)
        base = init_schemes.residual_base(params, lora)
    if scheme.changes_base:  # only right on its own residual base: refused, named
        with pytest.raises(ValueError, match=f"stack: adapter 'solo' at '.*' was initialised "
                                             f"with init={name!r}, which changed the base"):
            lora_jax.stack({"solo": lora})
        return
    s = lora_jax.stack({"solo": lora})
    ids = jnp.zeros((x.shape[0],), jnp.int32)
    _close(lora_jax.apply(model.apply, strict=True)(base, s, x, adapter_ids=ids),
           model.apply(params, x))


# ---- the NNX modules on an NNX MLP


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("name", SCHEMES)
def test_nnx_lora_starts_at_the_model(name, dora):
    model = _nnx()
    x = _x(5)
    ref = model(x)
    if _scheme(name).factors is None:
        with pytest.raises(ValueError, match=f"LoRA: init={name!r} builds its own base"):
            LoRA(model, R, rngs=nnx.Rngs(4), init=name, dora=dora)
        return
    lm = LoRA(model, R, rngs=nnx.Rngs(4), init=name, dora=dora)
    _close(lm(x), ref)
    _close(model(x), ref)  # the wrapped model itself is left as it was


@pytest.mark.parametrize("name", SCHEMES)
def test_nnx_adalora_starts_at_the_model(name):
    model = _nnx()
    x = _x(6)
    alloc = adalora.Allocator(total_steps=4, tinit=1, tfinal=1, delta_t=1)
    if not _scheme(name).adalora:
        with pytest.raises(ValueError, match=f"init={name!r} is not supported by AdaLoRA"):
            AdaLoRA(model, 4, 2, allocator=alloc, rngs=nnx.Rngs(4), init=name)
        return
    lm = AdaLoRA(model, 4, 2, allocator=alloc, rngs=nnx.Rngs(4), init=name)
    _close(lm(x), model(x))


def test_nnx_adalora_refuses_dora():
    alloc = adalora.Allocator(total_steps=4, tinit=1, tfinal=1, delta_t=1)
    with pytest.raises(ValueError, match="AdaLoRA: dora=True is not supported"):
        AdaLoRA(_nnx(), 4, 2, allocator=alloc, rngs=nnx.Rngs(4), dora=True)


# ---- the registry


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="'pissa' is registered already"):
        init_schemes.register(init_schemes.InitScheme("pissa", lambda k, s, d: (None, None)))


def test_unknown_scheme_lists_the_registered_ones():
    for call in (lambda: lora_jax.init(_linen()[1], R, key=jax.random.key(0), init="svd"),
                 lambda: LoRA(_nnx(), R, rngs=nnx.Rngs(0), init="svd")):
        with pytest.raises(ValueError, match=r"unknown init scheme 'svd'; registered: "
                                             r"\['default', 'gaussian', 'loftq', 'olora'"):
            call()


@pytest.fixture
def tilted_scheme():
    """A scheme of the test's own that changes the base: A, B drawn from the kernel's rows."""

    def factors(key, spec, dtype):
        ka, kb = jax.random.split(key)
        return (jax.random.normal(ka, spec.a_shape, dtype),
                jax.random.normal(kb, spec.b_shape, dtype))

    init_schemes.register(init_schemes.InitScheme("tilted", factors, changes_base=True))
    yield "tilted"
    init_schemes._SCHEMES.pop("tilted")


def test_a_registered_scheme_reaches_every_wrapper(tilted_scheme):
    # The wrappers read the registry's facts, not names: a new base-changing scheme gets the
    # residual base in nnx.LoRA (DoRA too), and stack refuses it.
    model = _nnx()
    x = _x(7)
    for dora in (False, True):
        lm = LoRA(model, R, rngs=nnx.Rngs(4), init=tilted_scheme, dora=dora)
        _close(lm(x), model(x))
    lmodel, params = _linen()
    lora = lora_jax.init(params, R, key=jax.random.key(1), init=tilted_scheme)
    _close(lora_jax.apply(lmodel.apply)(init_schemes.residual_base(params, lora), lora, x),
           lmodel.apply(params, x))
    with pytest.raises(ValueError, match="init='tilted', which changed the base"):
        lora_jax.stack([lora])
    with pytest.raises(ValueError, match="init='tilted' is not supported by AdaLoRA"):
        adalora.init(params, 4, 2, key=jax.random.key(0), init=tilted_scheme)


def test_the_recorded_init_survives_a_checkpoint_round_trip(tmp_path):
    _, params = _linen()
    lora = lora_jax.init(params, R, key=jax.random.key(3), init="olora", dora=True)
    lora_jax.checkpoint.save_adapter(tmp_path / "a", lora)
    back = lora_jax.checkpoint.load_adapter(tmp_path / "a")
    assert {x.residual_init for x in lora_jax.lora.leaves(back).values()} == {"olora"}
    with pytest.raises(ValueError, match="init='olora', which changed the base"):
        lora_jax.stack({"x": lora_jax.lora.from_leaves(
            {p: x.linear_part() for p, x in lora_jax.lora.leaves(back).items()})})


def test_combine_refuses_an_adapter_on_its_own_base():
    _, params = _linen()
    plain = lora_jax.init(params, R, key=jax.random.key(3))
    pissa = lora_jax.init(params, R, key=jax.random.key(4), init="pissa")
    with pytest.raises(ValueError, match="combine: adapter 'p' .* init='pissa'"):
        lora_jax.multi.combine({"plain": plain, "p": pissa}, [0.5, 0.5])


@pytest.mark.parametrize("name", ["pissa", "olora"])
def test_the_recorded_init_survives_a_peft_round_trip(tmp_path, name):
    # PEFT writes init_lora_weights="pissa"/"olora" for such adapters (its loader rebuilds the
    # residual base from the model); loading one back records it again.
    _, params = _linen()
    lora = lora_jax.init(params, R, key=jax.random.key(3), init=name)
    with pytest.warns(UserWarning, match="only correct on the base weights"):
        cfg = lora_jax.peft.save(tmp_path, lora)
    assert cfg["init_lora_weights"] == name
    with pytest.warns(UserWarning, match="only correct on the base weights"):
        back = lora_jax.peft.load(tmp_path, params)
    assert {x.residual_init for x in lora_jax.lora.leaves(back).values()} == {name}
    with pytest.raises(ValueError, match=f"init={name!r}, which changed the base"):
        lora_jax.stack({"x": back})
    plain = lora_jax.init(params, R, key=jax.random.key(3))
    assert lora_jax.peft.save(tmp_path / "plain", plain)["init_lora_weights"] is True
    mixed = {**lora_jax.lora.leaves(plain), "params/Dense_1/kernel":
             lora_jax.lora.leaves(lora)["params/Dense_1/kernel"]}
    with pytest.raises(ValueError, match="save: PEFT has one init_lora_weights .* different "
                                         r"bases \['', '" + name):
        lora_jax.peft.save(tmp_path / "mixed", lora_jax.lora.from_leaves(mixed))


class TorchNamedMLP(nn.Module):
    """The generator's MLP (tests/data/generators/peft_residual_init.py) in Linen."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(10, name="out")(jax.nn.relu(nn.Dense(16, name="fc1")(x)))


@pytest.mark.parametrize("name", ["pissa", "olora"])
def test_peft_adapter_on_its_residual_base_matches_peft(name):
    # PEFT's get_peft_model(init_lora_weights=name) made the residual, the factors moved, and
    # save_pretrained wrote the adapter. Loaded here: the leaves record the init, lora_jax's
    # own init rebuilds PEFT's residual from the original weights, and the output is PEFT's.
    data = np.load(DATA / "peft_residual_init.npz")
    params = {"params": {m: {"kernel": jnp.asarray(data[f"base/{m}.weight"].T),
                             "bias": jnp.asarray(data[f"base/{m}.bias"])} for m in ("fc1", "out")}}
    with pytest.warns(UserWarning, match="only correct on the base weights"):
        lora = lora_jax.peft.load(DATA / "peft_residual_init" / name, params)
    assert {x.residual_init for x in lora_jax.lora.leaves(lora).values()} == {name}
    fresh = lora_jax.init(params, 3, alpha=6, key=jax.random.key(0), init=name)
    residual = init_schemes.residual_base(params, fresh)
    for m in ("fc1", "out"):
        _close(residual["params"][m]["kernel"], data[f"{name}/residual/{m}.weight"].T)
    y = lora_jax.apply(TorchNamedMLP().apply, strict=True)(residual, lora, data["x"])
    _close(y, data[f"{name}/y"])
