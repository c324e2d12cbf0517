"""Bad files and values where they enter: safetensors headers (``models/tensor_files.py``),
PEFT ``adapter_config.json`` options (``peft/config.py``) and ``layouts=`` values.

Every bad safetensors file here is also refused by the ``safetensors`` library, whose rules the
reader follows; the good files are written by that library.
"""

import json
import pathlib
import shutil
import struct
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import numpy as st

import lora_jax
from lora_jax import peft
from lora_jax.models.tensor_files import TensorFiles
from lora_jax.peft import config as peft_config

DATA = pathlib.Path(__file__).parent / "data"
PEFT_FIELDS = json.loads((DATA / "peft_config_fields.json").read_text())
REF = DATA / "peft_mlp_lora"

# ------------------------------------------------------------------------------------------
# safetensors headers


def _write(path, header, data=b"", raw=None):
    """A safetensors file with ``header`` (or the ``raw`` header bytes) and ``data``."""
    text = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _f32(offsets, shape=(2,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": list(offsets)}


def _refused(path, *match):
    """Both TensorFiles and the safetensors library refuse ``path``; our message names the file
    and every string of ``match``."""
    with pytest.raises(ValueError) as err:
        TensorFiles(str(path))
    assert str(path) in str(err.value)
    for m in match:
        assert m in str(err.value), (m, str(err.value))
    with pytest.raises(Exception, match="(?i)header|offset|metadata|too"):
        st.load_file(str(path))


def test_overlapping_offsets(tmp_path):
    path = _write(tmp_path / "m.safetensors", {"a": _f32([0, 8]), "b": _f32([4, 12])},
                  bytes(12))
    _refused(path, "tensor 'b'", "[4, 12]", "overlaps tensor 'a'")


def test_gap_between_tensors(tmp_path):
    path = _write(tmp_path / "m.safetensors", {"a": _f32([0, 8]), "b": _f32([12, 20])},
                  bytes(20))
    _refused(path, "tensor 'b'", "leaves bytes 8 to 12 unused after tensor 'a'")


def test_negative_offsets(tmp_path):
    # the old reader read 4 bytes of the header text as this tensor
    path = _write(tmp_path / "m.safetensors",
                  {"a": {"dtype": "U8", "shape": [4], "data_offsets": [-4, 0]}}, bytes(4))
    _refused(path, "tensor 'a'", "data_offsets must be 2 non-negative integers", "[-4, 0]")


def test_end_before_begin(tmp_path):
    path = _write(tmp_path / "m.safetensors",
                  {"a": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}}, bytes(4))
    _refused(path, "tensor 'a'", "end is before its begin")


def test_tensor_named_twice(tmp_path):
    raw = (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
           b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}')
    path = _write(tmp_path / "m.safetensors", None, bytes(8), raw=raw)
    _refused(path, "names 'a' twice")


def test_header_not_an_object(tmp_path):
    path = _write(tmp_path / "m.safetensors", [1, 2])
    _refused(path, "must be a JSON object", "got a JSON list")


def test_tensor_claims_more_bytes_than_the_file(tmp_path):
    # 2**80 float32 = 2**82 bytes: the old reader accepted it at open
    path = _write(tmp_path / "m.safetensors",
                  {"a": _f32([0, 2 ** 82], shape=[2 ** 80])}, bytes(16))
    _refused(path, "is truncated", f"tensors end at byte {2 ** 82}", "holds 16 bytes")


def test_header_length_over_the_limit(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 2 ** 63) + b"{}")
    _refused(path, f"header length is {2 ** 63} bytes, more than the limit of 100000000")


def test_header_length_past_the_end(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 100) + b"{}")
    _refused(path, "header length is 100 bytes, expected 2 to 2")


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000,
                                 b'{"a":' * 100_000 + b"1" + b"}" * 100_000])
def test_deep_nesting(tmp_path, raw):
    # the old reader raised RecursionError inside json.loads
    path = _write(tmp_path / "m.safetensors", None, raw=raw)
    _refused(path, "nests 100000 deep, more than 64")


def test_brackets_inside_names_are_not_nesting(tmp_path):
    name = "[[[[{{{{" * 20 + '"}\\'  # json.dumps escapes the quote and the backslash
    raw = json.dumps({name: _f32([0, 8])}).encode()
    path = _write(tmp_path / "m.safetensors", None, bytes(8), raw=raw)
    assert TensorFiles(str(path)).keys() == [name]
    assert list(st.load_file(str(path))) == [name]


@pytest.mark.parametrize("info,match", [
    ({"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}, "dtype 'Q4', expected one of F64"),
    ({"shape": [1], "data_offsets": [0, 4]}, "has no dtype"),
    ({"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}, "shape must be a list of non"),
    ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "shape must be a list of non"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "shape must be a list of non"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}, "data_offsets must be 2 non"),
    ({"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}, "data_offsets must be 2 non"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, "needs 8 bytes but its data_"),
    ([1], "expected an object {dtype, shape, data_offsets}"),
    ({"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}, "dtype ['F32'], expected one"),
])
def test_bad_tensor_entry(tmp_path, info, match):
    path = _write(tmp_path / "m.safetensors", {"w": info}, bytes(4))
    _refused(path, "tensor 'w'", match)


@pytest.mark.parametrize("meta", [{"k": 1}, ["x"], "text"])
def test_metadata_not_strings(tmp_path, meta):
    path = _write(tmp_path / "m.safetensors", {"__metadata__": meta, "w": _f32([0, 8])},
                  bytes(8))
    _refused(path, "__metadata__ must map strings to strings")


def test_extra_bytes_after_the_data(tmp_path):
    path = _write(tmp_path / "m.safetensors", {"w": _f32([0, 8])}, bytes(12))
    _refused(path, "has 4 extra bytes")


def test_header_not_utf8(tmp_path):
    path = _write(tmp_path / "m.safetensors", None, raw=b'{"\xff":1}')
    _refused(path, "not UTF-8")


def test_file_shorter_than_the_length(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"abc")
    _refused(path, "3 bytes, less than the 8-byte header length")


def test_files_of_the_safetensors_library_load(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f64": rng.standard_normal((3, 5)),
        "f32": rng.standard_normal((4, 2, 3)).astype(np.float32),
        "f16": rng.standard_normal(7).astype(np.float16),
        "i64": rng.integers(-9, 9, (2, 3)),
        "i32": rng.integers(-9, 9, 5).astype(np.int32),
        "i16": rng.integers(-9, 9, 4).astype(np.int16),
        "i8": rng.integers(-9, 9, (2, 2)).astype(np.int8),
        "u8": rng.integers(0, 255, 6).astype(np.uint8),
        "bool": rng.random(5) > 0.5,
        "empty": np.zeros((0, 3), np.float32),
        "empty2": np.zeros((4, 0), np.float16),
        "scalar": np.array(2.5, np.float32),
    }
    path = str(tmp_path / "m.safetensors")
    st.save_file(tensors, path, metadata={"format": "pt", "note": "x"})
    files = TensorFiles(path)
    assert sorted(files.keys()) == sorted(tensors)
    for name, x in tensors.items():
        got = files.read(name)
        assert got.dtype == x.dtype and got.shape == x.shape, name
        np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(files.read("f32", (slice(1, 3), slice(0, 2))),
                                  tensors["f32"][1:3, 0:2])
    # bf16 (numpy has none; the library stores ml_dtypes' bfloat16 bits the same)
    bf16 = rng.standard_normal((3, 4)).astype(ml_dtypes.bfloat16)
    st.save_file({"b": bf16.view(np.uint16)}, path)  # the library has no bf16 numpy dtype
    raw = pathlib.Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["b"]["dtype"] = "BF16"
    text = json.dumps(header).encode()
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    np.testing.assert_array_equal(TensorFiles(path).read("b").view(np.uint16),
                                  bf16.view(np.uint16))


def test_header_with_only_metadata_or_padding_loads(tmp_path):
    path = _write(tmp_path / "m.safetensors", None, bytes(8),
                  raw=b' {"__metadata__":null,"w":{"dtype":"F32","shape":[2],'
                      b'"data_offsets":[0,8],"extra":1}}    ')
    assert TensorFiles(str(path)).shape("w") == (2,)
    assert list(st.load_file(str(path))) == ["w"]


def test_write_refuses_metadata_that_is_not_strings(tmp_path):
    from lora_jax.models.tensor_files import write

    with pytest.raises(TypeError, match=r"m.safetensors: metadata must map strings to strings"):
        write(tmp_path / "m.safetensors", {"w": np.ones(2, np.float32)}, metadata={"step": 3})
    assert not (tmp_path / "m.safetensors").exists()


# ------------------------------------------------------------------------------------------
# PEFT adapter_config.json


def _base():
    w = st.load_file(str(DATA / "peft_mlp_base.safetensors"))
    return {"params": {m: {"kernel": jnp.asarray(w[f"{m}.weight"].T),
                           "bias": jnp.asarray(w[f"{m}.bias"])} for m in ("fc1", "fc2", "out")}}


def _adapter(tmp_path, **changes):
    folder = tmp_path / "adapter"
    shutil.copytree(REF, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("peft_type", ["LORA", "ADALORA"])
def test_fields_table_is_peft_0_21_2(peft_type):
    ours = {k for k, v in peft_config.FIELDS.items() if peft_type in v[2]}
    assert PEFT_FIELDS["peft_version"] == "0.21.2"
    assert ours == set(PEFT_FIELDS[peft_type]["defaults"])
    for key, default in PEFT_FIELDS[peft_type]["defaults"].items():
        if key != "runtime_config":  # an object, which PEFT never saves
            assert peft_config._is_off(default, peft_config.FIELDS[key][1]), key


@pytest.mark.parametrize("peft_type", ["LORA", "ADALORA"])
def test_configs_written_by_peft_pass_without_warnings(peft_type):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert peft_config.check_config(PEFT_FIELDS[peft_type]["saved"], "test") == peft_type


def test_unknown_option_refused(tmp_path):
    folder = _adapter(tmp_path, brand_new_option={"x": 1})
    with pytest.raises(ValueError, match=r"adapter_config.json: unknown PEFT options "
                                         r"\[\"brand_new_option=\{'x': 1\}\"\]: not fields "
                                         "of PEFT 0.21.2's LoraConfig"):
        peft.load(folder, _base())


def test_unknown_option_that_is_off_warns(tmp_path):
    folder = _adapter(tmp_path, brand_new_option=None, merge_weights=False)
    with pytest.warns(UserWarning, match=r"ignoring \['brand_new_option', 'merge_weights'\]"):
        lora = peft.load(folder, _base())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = peft.load(REF, _base())
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), lora, want))


def test_adalora_field_in_a_lora_config_refused(tmp_path):
    folder = _adapter(tmp_path, init_r=6)
    with pytest.raises(ValueError, match=r"unknown PEFT options \['init_r=6'\].*LoraConfig"):
        peft.load(folder, _base())


@pytest.mark.parametrize("key,value", [
    ("ensure_weight_tying", True), ("use_bdlora", {"lora_a": True}), ("lora_bias", True),
    ("kasa_config", {"x": 1}), ("layer_replication", [[0, 1]]), ("bias", None),
])
def test_default_only_option_refused(tmp_path, key, value):
    folder = _adapter(tmp_path, **{key: value})
    with pytest.raises(ValueError, match=rf"adapter_config.json: unsupported PEFT options "
                                         rf"\[.{key}="):
        peft.load(folder, _base())


@pytest.mark.parametrize("key,value", [
    ("fan_in_fan_out", True), ("megatron_core", "other.core"), ("eva_config", {"rho": 2}),
    ("runtime_config", {"ephemeral_gpu_offload": True}), ("inference_mode", False),
])
def test_ignored_option_loads_the_same(tmp_path, key, value):
    lora = peft.load(_adapter(tmp_path, **{key: value}), _base())
    want = peft.load(REF, _base())
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), lora, want))


def test_lora_ga_init_warns(tmp_path):
    with pytest.warns(UserWarning, match="init_lora_weights='lora_ga'"):
        peft.load(_adapter(tmp_path, init_lora_weights="lora_ga"), _base())


def test_peft_config_nested_too_deep(tmp_path):
    folder = _adapter(tmp_path)
    (folder / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"adapter_config.json nests too deep"):
        peft.load(folder, _base())


def test_save_refuses_an_unknown_extra_config(tmp_path):
    lora = lora_jax.init(_base(), r=2, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"save: unknown PEFT options \[\"brand_new_option="):
        peft.save(tmp_path, lora, extra_config={"brand_new_option": {"x": 1}})


# ------------------------------------------------------------------------------------------
# layouts=


@pytest.mark.parametrize("layouts,match", [
    ({"params/fc1/kernel": "oi"}, r"init: layouts\['params/fc1/kernel'\] must be a "
                                  r"lora_jax.WeightLayout \(from lora_jax.trace\), got the str "
                                  r"'oi'; to set a kernel's roles by hand use rules="),
    ({"params/fc1/kernel": None}, r"layouts\['params/fc1/kernel'\] must be a lora_jax.Weight"),
    ({("params", "fc1"): None}, r"keys are '/'-joined parameter paths; got the key \('params'"),
    (["io"], "layouts must be the result of lora_jax.trace.*got a list"),
])
def test_bad_layouts(layouts, match):
    with pytest.raises(TypeError, match=match):
        lora_jax.init(_base(), r=2, key=jax.random.key(0), layouts=layouts)


def test_bad_layouts_in_quantize():
    with pytest.raises(TypeError, match=r"quantize: layouts\['params/fc1/kernel'\] must be"):
        lora_jax.quantize(_base(), "nf4", layouts={"params/fc1/kernel": "io"})


def test_traced_layouts_still_accepted():
    params = _base()

    def fn(p, x):
        return x @ p["params"]["fc1"]["kernel"]

    layouts = lora_jax.trace(fn, params, jnp.ones((1, 32)))
    lora = lora_jax.init(params, r=2, key=jax.random.key(0), layouts=layouts)
    assert list(lora_jax.lora.leaves(lora)) == ["params/fc1/kernel"]


# ------------------------------------------------------------------------------------------
# lora_jax checkpoints: static fields of an adapter leaf in the metadata


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    rng = np.random.default_rng(3)
    params = {"params": {"fc": {"kernel": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}}}
    lora = lora_jax.init(params, r=2, alpha=4.0, key=jax.random.key(0))
    folder = tmp_path_factory.mktemp("ckpt") / "adapter_ckpt"
    lora_jax.checkpoint.save_adapter(folder, lora)
    return folder, lora


@pytest.mark.parametrize("static,match", [
    ({"alpha": True}, r"LoraWeight.alpha must be a number, got True"),
    ({"rslora": 1}, r"LoraWeight.rslora must be true or false, got 1"),
    ({"roles": 5}, r"LoraWeight.roles must be a string, got 5"),
    ({"alpha": -4.0}, r"the file records scale 2.0 but the leaf's fields give -2.0"),
    ({"alpha": 8.0}, r"the file records scale 2.0 but the leaf's fields give 4.0"),
    ({"roles": "oi"}, r"the file records kernel_shape \[4, 3\] but the leaf's fields give "
                      r"\[3, 4\]"),
])
def test_checkpoint_static_fields_checked(saved_adapter, tmp_path, static, match):
    folder, _ = saved_adapter
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    meta = copy / "adapter" / "metadata"
    info = json.loads(meta.read_text())
    info["leaves"][0]["static"].update(static)
    meta.write_text(json.dumps(info))
    with pytest.raises(lora_jax.checkpoint.CheckpointError,
                       match=r"metadata node 'leaves/0 \(params/fc/kernel\)': " + match):
        lora_jax.checkpoint.load_adapter(copy)


def test_checkpoint_round_trip_still_loads(saved_adapter):
    folder, lora = saved_adapter
    back = lora_jax.checkpoint.load_adapter(folder)
    got, want = back["params"]["fc"]["kernel"], lora["params"]["fc"]["kernel"]
    assert (got.alpha, got.rslora, got.roles) == (want.alpha, want.rslora, want.roles)
    np.testing.assert_array_equal(np.asarray(got.a), np.asarray(want.a))
