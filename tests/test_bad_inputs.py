"""Bad input and files from elsewhere: every case ends in an error of the library's own
whose message names the culprit (argument, parameter path, file or field) and what was
expected. One test per case; the cases of issue #11 come first.

Numbers that are fine pass, so that each refusal is shown to be about the bad value only.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import lora_jax
from lora_jax import adalora, peft
from lora_jax import checkpoint as C
from lora_jax import quant as Q
from lora_jax import sharding as S
from lora_jax.models import gguf as G
from lora_jax.quant import bnb

KEY = jax.random.key(0)


def _params(seed=0, d=8):
    rng = np.random.default_rng(seed)
    w = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32))  # noqa: E731
    return {"params": {"fc1": {"kernel": w(d, 2 * d), "bias": w(2 * d)},
                       "fc2": {"kernel": w(2 * d, d)}}}


def _lora(params, seed=1, **kw):
    """A LoRA tree with non-zero A and B (B is zero at init)."""
    lora = lora_jax.init(params, r=2, key=jax.random.key(seed), **kw)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32)), lora)


def _forward(p, x):
    h = jnp.tanh(x @ p["params"]["fc1"]["kernel"] + p["params"]["fc1"]["bias"])
    return h @ p["params"]["fc2"]["kernel"]


# ========================================================================================
# Cases of issue #11
# ========================================================================================

# ---------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("r", [np.int64(2), np.int32(2), np.uint8(2), jnp.asarray(2), 2])
def test_init_rank_accepts_any_integer_type(r):
    lora = lora_jax.init(_params(), r=r, key=KEY)
    leaf = lora["params"]["fc1"]["kernel"]
    assert leaf.r == 2 and type(leaf.alpha) is float and leaf.scale == 1.0


@pytest.mark.parametrize("r, match", [
    (2.0, r"init: r must be an integer, got 2.0 \(float\)"),
    (True, r"init: r must be an integer, got the bool True"),
    ("2", r"init: r must be an integer, got '2' \(str\)"),
    (np.float32(2), r"init: r must be an integer, got 2.0 \(float32\)")])
def test_init_rank_refuses_bool_float_and_str(r, match):
    with pytest.raises(TypeError, match=match):
        lora_jax.init(_params(), r=r, key=KEY)


def test_init_rank_above_min_in_out_names_the_path():
    with pytest.raises(ValueError, match=r"LoRA target 'params/fc1/kernel' \(shape \(8, 16\), "
                                         r"roles 'io'\): rank r=9 must be an integer between 1 "
                                         r"and min\(in, out\) = min\(8, 16\) = 8"):
        lora_jax.init(_params(), r=np.int64(9), key=KEY)


@pytest.mark.parametrize("alpha, match", [
    (float("nan"), r"init: alpha must be a finite number, got nan"),
    (float("inf"), r"init: alpha must be a finite number, got inf"),
    (0, r"init: alpha must be > 0, got 0.0: the update is scaled by alpha / r"),
    (-4.0, r"init: alpha must be > 0, got -4.0"),
    ("8", r"init: alpha must be a number, got '8' \(str\)")])
def test_init_alpha_must_be_finite_and_positive(alpha, match):
    with pytest.raises((TypeError, ValueError), match=match):
        lora_jax.init(_params(), r=2, alpha=alpha, key=KEY)


def test_init_alpha_of_numpy_type_is_accepted():
    lora = lora_jax.init(_params(), r=2, alpha=np.float32(6), key=KEY)
    assert lora["params"]["fc1"]["kernel"].scale == 3.0


def test_init_on_integer_kernels_says_why_nothing_is_selected():
    params = {"dense": {"kernel": jnp.asarray(np.arange(32).reshape(4, 8), jnp.int8)}}
    with pytest.raises(ValueError, match=r"init: no parameter to adapt: by default LoRA adapts "
                                         r"float weights named kernel/w/weight with two or more "
                                         r"axes, and none of the "
                                         r"kernels in params is one \('dense/kernel' is int8 "
                                         r"\(4, 8\)\).*cast integer kernels"):
        lora_jax.init(params, r=2, key=KEY)
    with pytest.raises(TypeError, match=r"LoRA target 'dense/kernel' has dtype int8, expected "
                                        r"a float kernel"):
        lora_jax.init(params, r=2, key=KEY, targets="dense/kernel")


def test_merge_refuses_integer_kernels_unless_a_rounding_is_asked_for():
    rng = np.random.default_rng(3)
    w = rng.integers(-100, 100, (8, 16)).astype(np.int8)
    lora = _lora(_params())["params"]["fc1"]
    base = {"fc1": {"kernel": jnp.asarray(w)}}
    with pytest.raises(TypeError, match=r"merge: kernel 'fc1/kernel' would be merged as int8 "
                                        r"\(the kernel's dtype\): casting kernel \+ update to "
                                        r"integers silently truncates.*int_rounding='nearest'"):
        lora_jax.merge(base, {"fc1": lora})
    got = np.asarray(lora_jax.merge(base, {"fc1": lora}, int_rounding="nearest")["fc1"]["kernel"])
    leaf = lora["kernel"]
    exact = w + leaf.scale * (np.asarray(leaf.a, np.float64) @ np.asarray(leaf.b, np.float64))
    want = np.clip(np.round(exact), -128, 127).astype(np.int8)
    near_tie = np.abs(np.abs(exact - np.floor(exact)) - 0.5) < 1e-4  # float32 vs float64
    assert got.dtype == np.int8 and (got == want)[~near_tie].all()
    assert (got != w).any()  # the update is there, not truncated away


def test_merge_refuses_an_integer_output_dtype_and_unknown_roundings():
    params = _params()
    lora = _lora(params)
    with pytest.raises(TypeError, match=r"'params/fc1/kernel' would be merged as int16 "
                                        r"\(dtype=\)"):
        lora_jax.merge(params, lora, dtype=jnp.int16)
    with pytest.raises(ValueError, match=r"merge: int_rounding must be None or 'nearest', got "
                                         r"'floor'"):
        lora_jax.merge(params, lora, int_rounding="floor")


def test_unmerge_refuses_integer_kernels_too():
    lora = _lora(_params())
    base = {"params": {"fc1": {"kernel": jnp.ones((8, 16), jnp.int32)},
                       "fc2": {"kernel": jnp.ones((16, 8), jnp.int32)}}}
    with pytest.raises(TypeError, match=r"unmerge: kernel 'params/fc1/kernel' would be merged "
                                        r"as int32"):
        lora_jax.unmerge(base, lora)


def test_merge_refuses_bool_kernels_even_with_a_rounding():
    lora = _lora(_params())["params"]["fc1"]
    with pytest.raises(TypeError, match=r"kernel 'fc1/kernel' would be merged as bool"):
        lora_jax.merge({"fc1": {"kernel": jnp.ones((8, 16), bool)}}, {"fc1": lora},
                       int_rounding="nearest")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_refuses_non_finite_input_naming_the_path(bad):
    w = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    w[2, 5] = bad
    with pytest.raises(ValueError, match=r"layer/kernel: cannot quantize an array with 1 NaN or "
                                         r"Inf value\(s\)"):
        lora_jax.quantize({"layer": {"kernel": jnp.asarray(w)}}, "nf4")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # JAX's float64 -> float32
def test_quantize_float64_beyond_float32_range_says_so():
    w = np.random.default_rng(0).standard_normal((4, 64))
    w[0, 0] = 1e39
    with pytest.raises(ValueError, match=r"w: cannot quantize an array with 1 NaN or Inf "
                                         r"value\(s\) \(or values beyond float32's range"):
        Q.quantize_array(np.asarray(w, np.float64), "nf4", path="w")


def _reference_dequantize(x, fmt, block):
    """float64 block quantization by the book: nearest code of x / absmax, times absmax."""
    code = np.sort(bnb.CODES[fmt].astype(np.float64))
    if fmt == "int4":
        code = code[1:]  # -8/7 is never produced
    blocks = x.astype(np.float64).reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    s = blocks / absmax
    nearest = code[np.abs(s[..., None] - code).argmin(-1)]
    return (nearest * absmax).reshape(x.shape), absmax


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int4", "int8"])
@pytest.mark.parametrize("scale", [3.0e38, np.finfo(np.float32).max, 1e38, 1.0])
def test_quantize_handles_values_up_to_float32_max(fmt, scale):
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, (8, 64))
    x[:, 0] = np.where(rng.random(8) < 0.5, 1.0, -1.0)  # every block reaches the scale
    x = (x * scale).astype(np.float32)
    x[3] *= np.float32(1e-3)  # a block far below the others
    ref, absmax = _reference_dequantize(x, fmt, 64)
    q = Q.quantize_array(jnp.asarray(x), fmt, block_size=64, double_quant=False)
    got = np.asarray(q.dequantize(), np.float64)
    assert np.isfinite(got).all()
    # As the float64 reference, up to float32 rounding (and a code flip at exact ties).
    err = np.abs(got - ref) / absmax.reshape(-1, 1).repeat(64, 1).reshape(x.shape)
    assert np.mean(err < 1e-5) > 0.99 and err.max() < 0.3
    # Double quantization stores absmax itself in 8 bits: within a few percent, finite.
    qd = Q.quantize_array(jnp.asarray(x), fmt, block_size=64, double_quant=True)
    got_dq = np.asarray(qd.dequantize(), np.float64)
    assert np.isfinite(got_dq).all()
    assert np.abs(got_dq - got).max() <= 0.05 * float(np.abs(x).max())


# ---------------------------------------------------------------------------- trees


def test_apply_with_a_python_number_in_the_base_names_the_path():
    params = _params()
    params["params"]["scale"] = 2.0
    f = lora_jax.apply(lambda p, x: _forward(p, x) * p["params"]["scale"])
    with pytest.raises(TypeError, match=r"apply: base entry 'params/scale' is a float, expected "
                                        r"an array; wrap Python numbers with jnp.asarray"):
        f(params, _lora(_params()), jnp.ones((2, 8)))


def test_lora_factors_that_do_not_chain_are_refused_before_the_matmul():
    params = {"fc": {"kernel": jnp.ones((8, 16))}}
    bad = {"fc": {"kernel": lora_jax.LoraWeight(a=jnp.ones((8, 4)), b=jnp.ones((2, 16)))}}
    match = (r"adapter leaf 'fc/kernel': the factors do not chain: a \(8, 4\) has rank 4 \(its "
             r"last axis\) but b \(2, 16\) has rank 2 \(axis 0\)")
    with pytest.raises(ValueError, match="merge: " + match):
        lora_jax.merge(params, bad)
    with pytest.raises(ValueError, match="apply: " + match):
        lora_jax.apply(lambda p, x: x @ p["fc"]["kernel"])(params, bad, jnp.ones((2, 8)))


def test_adalora_leaf_with_a_mismatched_e_is_refused():
    params = {"fc": {"kernel": jnp.ones((8, 16))}}
    w = adalora.init(params, init_r=4, target_r=2, key=KEY)["fc"]["kernel"]
    with pytest.raises(ValueError, match=r"merge: adapter leaf 'fc/kernel': e has shape \(3,\), "
                                         r"expected \(4,\)"):
        lora_jax.merge(params, {"fc": {"kernel": w.replace(e=jnp.ones(3))}})
    with pytest.raises(ValueError, match=r"'fc/kernel': the factors do not chain: a \(8, 4\) "
                                         r"has rank 4 .* b \(3, 16\) has rank 3"):
        lora_jax.merge(params, {"fc": {"kernel": w.replace(q=jnp.ones((3, 16)))}})


def test_apply_mask_with_a_state_from_another_tree():
    params = _params()
    ada = adalora.init(params, init_r=4, target_r=2, key=KEY)
    alloc = adalora.Allocator(total_steps=10)
    other = adalora.init(params, init_r=3, target_r=2, key=KEY)
    with pytest.raises(ValueError, match=r"adalora.apply_mask: state.mask at "
                                         r"'params/fc1/kernel' has shape \(3,\), the tree's e has "
                                         r"shape \(4,\); was the state made for another tree\?"):
        adalora.apply_mask(ada, alloc.init(other))
    fewer = adalora.init(params, init_r=4, target_r=2, key=KEY, targets=".*fc1/kernel")
    with pytest.raises(ValueError, match=r"state.mask does not fit the AdaLoRA tree: it has "
                                         r"masks for no extra and lacks \['params/fc2/kernel'\]"):
        adalora.apply_mask(ada, alloc.init(fewer))


def test_device_put_with_a_spec_that_does_not_divide_names_the_path():
    mesh = AbstractMesh((4,), ("data",))
    lora = lora_jax.init({"w": {"kernel": jnp.ones((6, 8))}}, r=2, key=KEY)
    spec = S.specs(lora, {"w/kernel": P("data", None)})
    with pytest.raises(ValueError, match=r"device_put: 'w/kernel/a': dim 0 of shape \(6, 2\) is "
                                         r"not divisible by 4 shards \(mesh axes \('data',\)\)"):
        S.device_put(lora, mesh, spec)


# ---------------------------------------------------------------------------- PEFT files


@pytest.fixture
def peft_dir(tmp_path):
    params = _params()
    peft.save(tmp_path / "peft", _lora(params))
    return tmp_path / "peft", params


def _edit_config(d, **fields):
    cfg = json.loads((d / peft.CONFIG_NAME).read_text())
    cfg.update(fields)
    (d / peft.CONFIG_NAME).write_text(json.dumps(cfg))


def test_peft_config_that_is_a_json_list(peft_dir):
    d, params = peft_dir
    (d / peft.CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(f"load: {d / peft.CONFIG_NAME} must hold a "
                                                   "JSON object") + ".*got a list"):
        peft.load(d, params)


def test_peft_config_that_is_not_json(peft_dir):
    d, params = peft_dir
    (d / peft.CONFIG_NAME).write_text('{"r": 2,')
    with pytest.raises(ValueError, match=re.escape(f"load: {d / peft.CONFIG_NAME} is not valid "
                                                   "JSON: ")):
        peft.load(d, params)


def test_peft_rank_given_as_a_string(peft_dir):
    d, params = peft_dir
    _edit_config(d, r="2")
    with pytest.raises(TypeError, match=r"adapter_config.json: r must be an integer, got '2' "
                                        r"\(str\)"):
        peft.load(d, params)


def test_peft_lora_alpha_null(peft_dir):
    d, params = peft_dir
    _edit_config(d, lora_alpha=None)
    with pytest.raises(TypeError, match=r"adapter_config.json: lora_alpha must be a number, got "
                                        r"null"):
        peft.load(d, params)


@pytest.mark.parametrize("field, value, match", [
    ("rank_pattern", {"fc1(": 4}, r"rank_pattern key 'fc1\(' is not a valid regex"),
    ("alpha_pattern", {"[fc1": 4}, r"alpha_pattern key '\[fc1' is not a valid regex"),
    ("target_modules", "fc(1|2", r"target_modules 'fc\(1\|2' is not a valid regex"),
    ("exclude_modules", "(fc2", r"exclude_modules '\(fc2' is not a valid regex")])
def test_peft_invalid_regexes(peft_dir, field, value, match):
    d, params = peft_dir
    _edit_config(d, **{field: value})
    with pytest.raises(ValueError, match=r"adapter_config.json: " + match):
        peft.load(d, params)


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_peft_damaged_safetensors_names_the_file(peft_dir, how):
    d, params = peft_dir
    f = d / peft.WEIGHTS_NAME
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) - 40], "garbage": b"not safetensors" * 9,
                   "empty": b""}[how])
    with pytest.raises(ValueError, match=re.escape(f"load: {f} cannot be read as safetensors "
                                                   "(truncated or damaged?)")):
        peft.load(d, params)


# ---------------------------------------------------------------------------- checkpoints


def test_load_adapter_on_an_empty_folder(tmp_path):
    with pytest.raises(C.CheckpointError, match=re.escape(f"{tmp_path} is an empty directory, "
                                                          "not a lora_jax adapter")):
        C.load_adapter(tmp_path)


def test_load_adapter_on_a_manager_root(tmp_path):
    params = _params()
    with C.Manager(tmp_path, async_save=False) as ckpt:
        ckpt.save(3, lora=_lora(params))
    with pytest.raises(C.CheckpointError, match=re.escape(
            f"{tmp_path} is a Manager directory (steps [3]), not one adapter; pass one step such "
            f"as {tmp_path / '3'}, or use Manager(path).restore()")):
        C.load_adapter(tmp_path)
    assert C.load_adapter(tmp_path / "3")  # the suggestion works


def test_load_adapter_on_a_peft_folder(peft_dir):
    d, _ = peft_dir
    with pytest.raises(C.CheckpointError, match=re.escape(f"{d} is a Hugging Face PEFT adapter "
                                                          "folder; read it with "
                                                          "lora_jax.peft.load(path, params)")):
        C.load_adapter(d)


# ---------------------------------------------------------------------------- GGUF


def _gguf(path, **extra):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in extra.items():
        w.add_uint32(k, v)
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((2, 32)).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal((4, 32)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("keep", [3, 30, 200, -100])
def test_truncated_gguf_names_the_file(tmp_path, keep):
    good = _gguf(tmp_path / "good.gguf")
    assert G.read(good).tensor("b.weight").shape == (4, 32)
    data = good.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:keep])
    with pytest.raises(ValueError, match=re.escape(f"{bad} is not a readable GGUF file "
                                                   f"({len(data[:keep])} bytes; truncated or "
                                                   "damaged?)")):
        G.read(bad)


# ========================================================================================
# Cases found while doing this
# ========================================================================================

# ---------------------------------------------------------------------------- init


def test_init_key_that_is_not_a_prng_key():
    for key, kind in ((0, "int"), (None, "NoneType"), (np.ones(3), "ndarray")):
        with pytest.raises(TypeError, match=rf"init: key must be a PRNG key such as "
                                            rf"jax.random.key\(0\), got .* \({kind}\)"):
            lora_jax.init(_params(), r=2, key=key)
    lora_jax.init(_params(), r=2, key=jax.random.PRNGKey(0))  # a raw uint32[2] key is fine


def test_init_on_a_lora_tree_instead_of_the_params():
    lora = _lora(_params())
    with pytest.raises(TypeError, match=r"init: params holds adapter leaves \(at "
                                        r"'params/fc1/kernel'\), expected the base parameters"):
        lora_jax.init(lora, r=2, key=KEY)


def test_init_on_a_tree_without_kernels():
    with pytest.raises(ValueError, match=r"init: no parameter to adapt: .* params has no leaf "
                                         r"named kernel/w/weight \(paths look like \['v'\]\); "
                                         r"pass layouts=.* targets="):
        lora_jax.init({"v": jnp.ones((4, 4))}, r=2, key=KEY)
    assert lora_jax.init({"v": jnp.ones((4, 4))}, r=2, key=KEY, targets="v")["v"].r == 2


def test_init_on_a_model_object_instead_of_its_params():
    import flax.linen as nn

    with pytest.raises(TypeError, match=r"init: params holds no arrays \(got a Dense\); pass the "
                                        r"parameter tree, e.g. variables = model.init"):
        lora_jax.init(nn.Dense(4), r=2, key=KEY)


@pytest.mark.parametrize("targets, exc, match", [
    ("params/(fc1", ValueError, r"init: targets 'params/\(fc1' is not a valid regex"),
    (["params/fc1/kernel", "[x"], ValueError, r"init: targets\[1\] '\[x' is not a valid regex"),
    (3, TypeError, r"init: targets must be a regex string or a list of them, got 3 \(int\)"),
    (re.compile("x"), TypeError, r"init: targets must be a regex string.*\(Pattern\)")])
def test_init_targets_that_are_not_regexes(targets, exc, match):
    with pytest.raises(exc, match=match):
        lora_jax.init(_params(), r=2, key=KEY, targets=targets)


def test_init_mistyped_target_lists_the_paths():
    with pytest.raises(ValueError, match=r"target pattern 'params/fc3/kernel' matches no "
                                         r"parameter; paths look like \['params/fc1/bias'"):
        lora_jax.init(_params(), r=2, key=KEY, targets="params/fc3/kernel")


def test_init_exclude_that_is_not_a_regex():
    with pytest.raises(ValueError, match=r"init: exclude '\*fc1' is not a valid regex"):
        lora_jax.init(_params(), r=2, key=KEY, exclude="*fc1")


@pytest.mark.parametrize("dtype, match", [
    (jnp.int8, r"init: dtype must be a floating dtype such as jnp.float32, got int8"),
    ("banana", r"init: dtype must be a floating dtype, got 'banana'")])
def test_init_integer_factor_dtype(dtype, match):
    with pytest.raises(TypeError, match=match):
        lora_jax.init(_params(), r=2, key=KEY, dtype=dtype)


@pytest.mark.parametrize("dropout, exc, match", [
    (1.0, ValueError, r"init: dropout must be in \[0, 1\), got 1.0"),
    (float("nan"), ValueError, r"init: dropout must be a finite number, got nan"),
    ("0.1", TypeError, r"init: dropout must be a number, got '0.1' \(str\)")])
def test_init_dropout_out_of_range(dropout, exc, match):
    with pytest.raises(exc, match=match):
        lora_jax.init(_params(), r=2, key=KEY, dropout=dropout)


def test_init_axes_arguments():
    lora = lora_jax.init(_params(), r=2, key=KEY, in_axes=np.int64(1), stack_axes=np.int8(0))
    assert lora["params"]["fc1"]["kernel"].in_axes == 1
    with pytest.raises(ValueError, match=r"init: in_axes must be an integer >= 1, got 0"):
        lora_jax.init(_params(), r=2, key=KEY, in_axes=0)
    with pytest.raises(TypeError, match=r"init: in_axes\['.\*fc1.\*'\] must be an integer, got "
                                        r"1.5"):
        lora_jax.init(_params(), r=2, key=KEY, in_axes={".*fc1.*": 1.5})
    with pytest.raises(ValueError, match=r"init: in_axes key '\(' is not a valid regex"):
        lora_jax.init(_params(), r=2, key=KEY, in_axes={"(": 1})


def test_init_rules_that_are_not_rules():
    with pytest.raises(TypeError, match=r"init: rules must be a list of lora_jax.Rule"):
        lora_jax.init(_params(), r=2, key=KEY, rules=[{"pattern": ".*", "r": 4}])


def test_rule_numbers():
    assert lora_jax.Rule(pattern=".*", r=np.int64(4)).r == 4
    assert type(lora_jax.Rule(pattern=".*", r=np.int64(4)).r) is int  # hashable, static
    with pytest.raises(TypeError, match=r"Rule '.\*': r must be an integer, got 2.5"):
        lora_jax.Rule(pattern=".*", r=2.5)
    with pytest.raises(ValueError, match=r"Rule '.\*': alpha must be a finite number, got nan"):
        lora_jax.Rule(pattern=".*", alpha=float("nan"))
    with pytest.raises(ValueError, match=r"Rule pattern '\(' is not a valid regex"):
        lora_jax.Rule(pattern="(")


# ---------------------------------------------------------------------------- merge / apply


def test_merge_with_base_and_lora_swapped():
    params = _params()
    lora = _lora(params)
    with pytest.raises(TypeError, match=r"merge: the base tree holds adapter leaves \(at "
                                        r"'params/fc1/kernel'\), expected the base parameters; "
                                        r"a LoRA tree goes in the lora argument, after the base"):
        lora_jax.merge(lora, params)


def test_apply_with_base_and_lora_swapped():
    params = _params()
    lora = _lora(params)
    with pytest.raises(TypeError, match=r"apply: base holds adapter leaves"):
        lora_jax.apply(_forward)(lora, params, jnp.ones((2, 8)))


def test_apply_given_params_instead_of_a_function():
    with pytest.raises(TypeError, match=r"apply: fn must be a function of the parameter tree "
                                        r"\(e.g. model.apply\), got a dict"):
        lora_jax.apply(_params())


def test_merge_with_a_lora_tree_of_another_model():
    lora = _lora(_params())
    other = {"params": {"fc1": {"kernel": jnp.ones((8, 16))}, "fc9": {"kernel": jnp.ones((16, 8))}}}
    with pytest.raises(ValueError, match=r"LoRA tree has 'params/fc2/kernel', which the base "
                                         r"tree lacks; base has e.g. \['params/fc1/kernel'"):
        lora_jax.merge(other, lora)
    wider = _params(d=16)
    with pytest.raises(ValueError, match=r"LoRA factors at 'params/fc1/kernel' fit a kernel of "
                                         r"shape \(8, 16\).*base kernel has shape \(16, 32\)"):
        lora_jax.merge(wider, lora)


def test_hand_built_leaf_with_nan_alpha():
    params = {"fc": {"kernel": jnp.ones((8, 16))}}
    leaf = lora_jax.LoraWeight(a=jnp.ones((8, 2)), b=jnp.ones((2, 16)), alpha=float("nan"))
    with pytest.raises(ValueError, match=r"merge: adapter leaf 'fc/kernel': alpha must be a "
                                         r"finite number, got nan"):
        lora_jax.merge(params, {"fc": {"kernel": leaf}})


def test_hand_built_leaf_with_integer_or_list_factors():
    params = {"fc": {"kernel": jnp.ones((8, 16))}}
    leaf = lora_jax.LoraWeight(a=jnp.ones((8, 2), jnp.int32), b=jnp.ones((2, 16)))
    with pytest.raises(TypeError, match=r"adapter leaf 'fc/kernel': field a has dtype int32, "
                                        r"expected a float dtype"):
        lora_jax.merge(params, {"fc": {"kernel": leaf}})
    leaf = lora_jax.LoraWeight(a=[[1.0, 2.0]] * 8, b=jnp.ones((2, 16)))
    with pytest.raises(TypeError, match=r"adapter leaf 'fc/kernel': field a is a list, expected "
                                        r"an array"):
        lora_jax.apply(lambda p, x: x @ p["fc"]["kernel"])(params, {"fc": {"kernel": leaf}},
                                                            jnp.ones((2, 8)))


def test_hand_built_leaf_with_wrong_in_axes():
    params = {"fc": {"kernel": jnp.ones((8, 16))}}
    leaf = lora_jax.LoraWeight(a=jnp.ones((8, 2)), b=jnp.ones((2, 16)), in_axes=2)
    with pytest.raises(ValueError, match=r"'fc/kernel': factors a \(8, 2\) and b \(2, 16\) do "
                                         r"not fit stack_axes=0, in_axes=2"):
        lora_jax.merge(params, {"fc": {"kernel": leaf}})


# ---------------------------------------------------------------------------- AdaLoRA


def test_adalora_init_numbers():
    ada = adalora.init(_params(), init_r=np.int64(4), target_r=np.int32(2), alpha=0, key=KEY)
    leaf = ada["params"]["fc1"]["kernel"]
    assert leaf.r == 4 and leaf.target_r == 2 and leaf.alpha == 4.0  # PEFT: alpha 0 -> init_r
    with pytest.raises(TypeError, match=r"adalora.init: r must be an integer, got 4.0"):
        adalora.init(_params(), init_r=4.0, key=KEY)
    with pytest.raises(ValueError, match=r"adalora.init: alpha must be a finite number, got nan"):
        adalora.init(_params(), init_r=4, target_r=2, alpha=float("nan"), key=KEY)
    with pytest.raises(ValueError, match=r"adalora.init: alpha must be > 0 \(or 0 for init_r, "
                                         r"as PEFT\), got -1.0"):
        adalora.init(_params(), init_r=4, target_r=2, alpha=-1, key=KEY)
    with pytest.raises(ValueError, match=r"target_r=5 must not exceed init_r=4"):
        adalora.init(_params(), init_r=4, target_r=5, key=KEY)


def test_allocator_numbers():
    alloc = adalora.Allocator(total_steps=np.int64(10), tinit=np.int32(1))
    assert type(alloc.total_steps) is int and alloc.tinit == 1
    with pytest.raises(TypeError, match=r"Allocator total_steps must be an integer, got 10.0"):
        adalora.Allocator(total_steps=10.0)
    with pytest.raises(ValueError, match=r"Allocator delta_t must be an integer >= 1, got 0"):
        adalora.Allocator(total_steps=10, delta_t=0)


def test_finalize_and_apply_mask_with_something_else_as_the_state():
    ada = adalora.init(_params(), init_r=4, target_r=2, key=KEY)
    opt = optax.adam(1e-3).init(ada)
    for fn in (adalora.apply_mask, adalora.finalize):
        with pytest.raises(TypeError, match=rf"adalora.{fn.__name__}: state is a tuple, expected "
                                            r"the AllocatorState from Allocator.init/update"):
            fn(ada, opt)


def test_finalize_with_a_state_from_another_tree():
    params = _params()
    ada = adalora.init(params, init_r=4, target_r=2, key=KEY)
    other = adalora.init(params, init_r=6, target_r=2, key=KEY)
    with pytest.raises(ValueError, match=r"adalora.finalize: state.mask at 'params/fc1/kernel' "
                                         r"has shape \(6,\)"):
        adalora.finalize(ada, adalora.Allocator(total_steps=4).init(other))


# ---------------------------------------------------------------------------- quantize


def test_quantize_targets_that_are_not_regexes_and_bad_min_size():
    params = _params()
    with pytest.raises(ValueError, match=r"quantize: targets '\(fc' is not a valid regex"):
        lora_jax.quantize(params, targets="(fc")
    with pytest.raises(TypeError, match=r"quantize: min_size must be an integer, got '1k'"):
        lora_jax.quantize(params, min_size="1k")
    with pytest.raises(ValueError, match=r"quantize: targets pattern 'params/fc3/kernel' matches "
                                         r"no floating-point leaf"):
        lora_jax.quantize(params, targets="params/fc3/kernel")


def test_quantize_array_of_something_that_is_not_an_array():
    with pytest.raises(TypeError, match=r"w: cannot quantize a NoneType; expected a "
                                        r"floating-point array"):
        Q.quantize_array(None, path="w")
    with pytest.raises(TypeError, match=r"w: cannot quantize an array of dtype int32"):
        Q.quantize_array(jnp.ones((4, 64), jnp.int32), path="w")


# ---------------------------------------------------------------------------- sharding


def test_device_put_with_a_mistyped_path_or_mesh_axis():
    mesh = AbstractMesh((2,), ("data",))
    params = {"w": {"kernel": jnp.ones((4, 8))}}
    with pytest.raises(ValueError, match=r"device_put: specs name \['w/kernal'\], which the tree "
                                         r"lacks \(its arrays are e.g. \['w/kernel'\]\)"):
        S.device_put(params, mesh, {"w/kernal": P("data")})
    with pytest.raises(ValueError, match=r"device_put: 'w/kernel': mesh axes \['model'\] are not "
                                         r"in the mesh"):
        S.device_put(params, mesh, {"w/kernel": P("model")})
    with pytest.raises(ValueError, match=r"device_put: 'w/kernel': spec .* has 3 entries for an "
                                         r"array of rank 2"):
        S.device_put(params, mesh, {"w/kernel": P("data", None, None)})


def test_layout_helpers_take_numpy_integers_and_check_patterns():
    m = AbstractMesh((2,), ("model",))
    params = _params()
    tp = S.tensor_parallel(params, m, in_axes=np.int64(1), stack_axes=np.int32(0),
                           column=".*fc1/kernel", row=".*fc2/kernel")
    assert tp["params/fc1/kernel"] == P(None, "model") and tp["params/fc2/kernel"] == P("model")
    with pytest.raises(ValueError, match=r"tensor_parallel: column '\(fc1' is not a valid regex"):
        S.tensor_parallel(params, m, column="(fc1")
    with pytest.raises(TypeError, match=r"fsdp: min_size must be an integer, got '1024'"):
        S.fsdp(params, AbstractMesh((2,), ("data",)), min_size="1024")


def test_device_put_places_what_fits():
    m = S.mesh((1,), ("data",))
    params = _params()
    placed = S.device_put(params, m, {"params/fc1/kernel": P(None, "data")})
    assert placed["params"]["fc1"]["kernel"].sharding.spec == P(None, "data")
    np.testing.assert_array_equal(placed["params"]["fc2"]["kernel"],
                                  params["params"]["fc2"]["kernel"])


# ---------------------------------------------------------------------------- adapter files


def test_save_adapter_of_the_base_params(tmp_path):
    with pytest.raises(TypeError, match=r"save_adapter: LoRA tree entry 'params/fc1/bias' is a "
                                        r"ArrayImpl, expected an adapter leaf.*never the base"):
        C.save_adapter(tmp_path / "a", _params())
    assert not os.listdir(tmp_path)


def test_save_adapter_with_meta_that_is_not_json(tmp_path):
    with pytest.raises(TypeError, match=r"meta\['run'\]\['fn'\] is a builtin_function_or_method; "
                                        r"meta must be JSON-like"):
        C.save_adapter(tmp_path / "a", _lora(_params()), meta={"run": {"fn": print}})
    assert not os.listdir(tmp_path)


def test_save_adapter_of_a_hand_built_leaf_that_does_not_chain(tmp_path):
    bad = {"fc": {"kernel": lora_jax.LoraWeight(a=jnp.ones((8, 4)), b=jnp.ones((2, 16)))}}
    with pytest.raises(ValueError, match=r"save_adapter: adapter leaf 'fc/kernel': the factors "
                                         r"do not chain"):
        C.save_adapter(tmp_path / "a", bad)


def test_load_adapter_at_a_mistyped_path_suggests_close_names(tmp_path):
    C.save_adapter(tmp_path / "adapter_r8", _lora(_params()))
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"no adapter checkpoint at {tmp_path / 'adaptr_r8'}; did you mean "
            f"'{tmp_path / 'adapter_r8'}'?")):
        C.load_adapter(tmp_path / "adaptr_r8")
    with pytest.raises(FileNotFoundError, match=re.escape(f"the directory {tmp_path / 'nope'} "
                                                          "does not exist")):
        C.load_adapter(tmp_path / "nope" / "adapter")


def test_load_adapter_on_a_file(tmp_path):
    f = tmp_path / "adapter.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(C.CheckpointError, match=re.escape(f"{f} is a file; an adapter checkpoint "
                                                          "is a directory")):
        C.load_adapter(f)


def test_load_adapter_on_an_orbax_checkpoint_from_elsewhere(tmp_path):
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        ck.save(tmp_path / "other", ocp.args.Composite(
            params=ocp.args.StandardSave({"w": np.ones(3, np.float32)})))
    with pytest.raises(C.CheckpointError, match=r"other is an Orbax checkpoint that lora_jax did "
                                                r"not write \(items \['params'\]\)"):
        C.load_adapter(tmp_path / "other")


def test_load_adapter_on_an_unrelated_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(C.CheckpointError, match=r"is not a lora_jax adapter: it holds "
                                                r"\['notes.txt'\], expected the 'adapter' and "
                                                r"'arrays' items"):
        C.load_adapter(tmp_path)


def test_load_adapter_with_the_wrong_trees_for_like_and_base(tmp_path):
    params = _params()
    lora = _lora(params)
    C.save_adapter(tmp_path / "a", lora)
    with pytest.raises(TypeError, match=r"like= must be an adapter tree: LoRA tree entry "
                                        r"'params/fc1/bias' is a ArrayImpl"):
        C.load_adapter(tmp_path / "a", like=params)
    with pytest.raises(TypeError, match=r"base= holds adapter leaves \(at 'params/fc1/kernel'\)"):
        C.load_adapter(tmp_path / "a", base=lora)


def test_load_adapter_with_a_damaged_array_file(tmp_path):
    C.save_adapter(tmp_path / "a", _lora(_params()))
    for f in (tmp_path / "a" / "arrays").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0" * 7)
    with pytest.raises(C.CheckpointError, match=r"the arrays of .*/a cannot be read .*damaged or "
                                                r"incomplete"):
        C.load_adapter(tmp_path / "a")


def test_load_adapter_with_invalid_json_metadata(tmp_path):
    C.save_adapter(tmp_path / "a", _lora(_params()))
    (tmp_path / "a" / "adapter" / "metadata").write_text("{not json")
    with pytest.raises(C.CheckpointError, match=r"the metadata of .*/a cannot be read"):
        C.load_adapter(tmp_path / "a")


def test_load_adapter_of_a_newer_format(tmp_path):
    C.save_adapter(tmp_path / "a", _lora(_params()))
    f = tmp_path / "a" / "adapter" / "metadata"
    f.write_text(f.read_text().replace('"format_version": 1', '"format_version": 9'))
    with pytest.raises(C.CheckpointError, match=r"has adapter format version 9; this lora_jax "
                                                r"reads versions up to 1: upgrade lora_jax"):
        C.load_adapter(tmp_path / "a")


# ---------------------------------------------------------------------------- Manager


def test_manager_on_folders_that_are_not_a_manager_directory(tmp_path, peft_dir):
    C.save_adapter(tmp_path / "adapter", _lora(_params()))
    with pytest.raises(ValueError, match=r"Manager: .*/adapter is an adapter written by "
                                         r"save_adapter, not a Manager directory"):
        C.Manager(tmp_path / "adapter")
    with C.Manager(tmp_path / "run", async_save=False) as ckpt:
        ckpt.save(1, lora=_lora(_params()))
    with pytest.raises(ValueError, match=r"Manager: .*/run/1 is one step of a Manager, not a "
                                         r"Manager directory; pass its parent .*/run"):
        C.Manager(tmp_path / "run" / "1")
    with pytest.raises(ValueError, match=r"is a Hugging Face PEFT adapter folder"):
        C.Manager(peft_dir[0])
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"Manager: .*/file is a file"):
        C.Manager(tmp_path / "file")


def test_manager_options(tmp_path):
    with pytest.raises(ValueError, match=r"Manager: on_existing must be 'error' or 'overwrite', "
                                         r"got 'replace'"):
        C.Manager(tmp_path, on_existing="replace")
    with pytest.raises(ValueError, match=r"Manager: max_to_keep must be an integer >= 1, got 0"):
        C.Manager(tmp_path, max_to_keep=0)
    with pytest.raises(TypeError, match=r"Manager: save_interval_steps must be an integer, got "
                                        r"2.5"):
        C.Manager(tmp_path, save_interval_steps=2.5)


def test_manager_steps_that_are_not_integers(tmp_path):
    lora = _lora(_params())
    with C.Manager(tmp_path, async_save=False) as ckpt:
        assert ckpt.save(np.int64(1), lora=lora) and ckpt.save(jnp.asarray(2), lora=lora)
        with pytest.raises(TypeError, match=r"Manager.save: step must be an integer, got 3.5"):
            ckpt.save(3.5, lora=lora)
        with pytest.raises(ValueError, match=r"Manager.save: step must be an integer >= 0, got -1"):
            ckpt.save(-1, lora=lora)
        with pytest.raises(TypeError, match=r"Manager: step must be an integer, got '2' \(str\)"):
            ckpt.restore("2")
        with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 7 in .*; steps are "
                                                    r"\[1, 2\]"):
            ckpt.restore(7)
        assert ckpt.steps == [1, 2]


def test_manager_restore_of_an_empty_directory(tmp_path):
    with C.Manager(tmp_path) as ckpt:
        with pytest.raises(FileNotFoundError, match=re.escape(f"no checkpoint in {tmp_path}")):
            ckpt.restore()


def test_manager_save_of_an_unregistered_state_class(tmp_path):
    class Mine(NamedTuple):
        n: jax.Array

    with C.Manager(tmp_path, async_save=False) as ckpt:
        with pytest.raises(TypeError, match=r"adalora is a .*Mine, a type checkpoints do not "
                                            r"know.*\(nothing was written\)"):
            ckpt.save(1, lora=_lora(_params()), adalora=Mine(jnp.ones(2)))
        assert ckpt.steps == []


# ---------------------------------------------------------------------------- PEFT files


@pytest.mark.parametrize("field, value, exc, match", [
    ("lora_alpha", 0, ValueError, r"lora_alpha must be > 0, got 0.0: PEFT scales the update"),
    ("lora_alpha", "16", TypeError, r"lora_alpha must be a number, got '16'"),
    ("rank_pattern", {"fc1": 2.5}, TypeError, r"rank_pattern\['fc1'\] must be an integer"),
    ("rank_pattern", [1], TypeError, r"rank_pattern must be a JSON object, got \[1\]"),
    ("alpha_pattern", {"fc1": float("nan")}, ValueError,
     r"alpha_pattern\['fc1'\] must be a finite number, got nan"),
    ("use_rslora", "yes", TypeError, r"use_rslora must be true or false, got 'yes'"),
    ("lora_dropout", 2, ValueError, r"lora_dropout must be in \[0, 1\), got 2.0"),
    ("layers_to_transform", ["1"], TypeError,
     r"layers_to_transform\[0\] must be an integer, got '1'"),
    ("target_modules", 7, TypeError, r"target_modules must be a regex string or a list"),
    ("r", 0, ValueError, r"r must be an integer >= 1, got 0")])
def test_peft_config_values(peft_dir, field, value, exc, match):
    d, params = peft_dir
    _edit_config(d, **{field: value})
    with pytest.raises(exc, match=r"load: .*adapter_config.json: " + match):
        peft.load(d, params)


def test_peft_folder_without_config_or_weights(peft_dir, tmp_path):
    d, params = peft_dir
    with pytest.raises(FileNotFoundError, match=r"load: no PEFT adapter directory at .*/missing"):
        peft.load(tmp_path / "missing", params)
    (d / peft.WEIGHTS_NAME).rename(d / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match=r"has no adapter_model.safetensors; it has "
                                                r"adapter_model.bin, a pickle, which lora_jax "
                                                r"does not read"):
        peft.load(d, params)
    (d / peft.CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"has no adapter_config.json, so it is not a "
                                                r"PEFT adapter folder"):
        peft.load(d, params)


def test_peft_load_of_a_lora_jax_checkpoint(tmp_path):
    C.save_adapter(tmp_path / "a", _lora(_params()))
    with pytest.raises(FileNotFoundError, match=r"it looks like a lora_jax checkpoint: read it "
                                                r"with lora_jax.checkpoint.load_adapter"):
        peft.load(tmp_path / "a", _params())


def test_peft_tensors_with_nan_or_integers(peft_dir):
    from safetensors import numpy as st

    d, params = peft_dir
    f = d / peft.WEIGHTS_NAME
    tensors = st.load_file(f)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].copy()
    tensors[key][0, 0] = np.nan
    st.save_file(tensors, f)
    with pytest.raises(ValueError, match=rf"load: tensor '{re.escape(key)}' in .* holds NaN or "
                                         r"Inf values"):
        peft.load(d, params)
    tensors[key] = np.ones(tensors[key].shape, np.int32)
    st.save_file(tensors, f)
    with pytest.raises(ValueError, match=rf"tensor '{re.escape(key)}' in .* has dtype int32, "
                                         r"expected floating-point LoRA factors"):
        peft.load(d, params)


def test_peft_load_with_the_lora_tree_as_params(peft_dir):
    d, params = peft_dir
    with pytest.raises(TypeError, match=r"peft.load: params holds adapter leaves"):
        peft.load(d, _lora(params))


# ---------------------------------------------------------------------------- GGUF


def test_gguf_that_is_not_gguf_or_missing(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"PK\x03\x04" * 64)  # a zip, say
    with pytest.raises(ValueError, match=re.escape(f"{f} is not a readable GGUF file (256 "
                                                   "bytes; truncated or damaged?)") +
                       r".*GGUF magic invalid"):
        G.read(f)
    with pytest.raises(FileNotFoundError, match=re.escape(f"no GGUF file at {tmp_path / 'x'}")):
        G.read(tmp_path / "x")


def test_gguf_that_is_not_a_llama_names_the_file_and_key(tmp_path):
    f = _gguf(tmp_path / "m.gguf", **{"llama.block_count": 1})
    with pytest.raises(ValueError, match=re.escape(f"{f}: the metadata lacks "
                                                   "'llama.embedding_length'")):
        G.load_llama(f)


def test_gguf_tensor_data_cut_short_names_the_tensor():
    raw = np.zeros(20 * 3 - 5, np.uint8)  # three Q4_1 blocks, minus 5 bytes
    gf = G.GGUFFile("m.gguf", {}, {"t.weight": ("Q4_1", (96,), raw)})
    with pytest.raises(ValueError, match=r"m.gguf: tensor 't.weight': Q4_1 tensor of shape "
                                         r"\(96,\): expected 60 bytes.*got 55"):
        gf.tensor("t.weight")


# ---------------------------------------------------------------------------- registry


def test_register_refuses_what_it_cannot_rebuild():
    with pytest.raises(TypeError, match=r"register: expected a NamedTuple or dataclass type, got "
                                        r"<built-in function system>"):
        C.register(os.system)
    with pytest.raises(TypeError, match=r"expected a NamedTuple or dataclass type"):
        C.register(shutil.rmtree)


def test_math_sanity_of_the_checks():
    """The numbers above: alpha's check and integer normalisation do not alter values."""
    lora = lora_jax.init(_params(), r=np.int64(4), alpha=np.float64(6.0), key=KEY)
    leaf = lora["params"]["fc1"]["kernel"]
    assert math.isclose(leaf.scale, 1.5) and type(leaf.r) is int
