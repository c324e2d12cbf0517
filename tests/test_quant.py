"""Tests of lora_jax.quant against bitsandbytes 0.50 outputs and float64 references."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import quant
from lora_jax.quant import (
    QuantizedArray,
    bnb,
    dequantize_tree,
    is_quantized,
    kernels,
    quantize,
    quantize_array,
    quantized_bytes,
)

F32 = np.float32
BNB = np.load(pathlib.Path(__file__).parent / "data" / "bnb_4bit.npz")


def unpack(codes, n):
    codes = np.asarray(codes)
    return np.stack([codes >> 4, codes & 15], -1).reshape(-1)[:n]


def jit_quantize(x, fmt, **kw):
    return jax.jit(functools.partial(quantize_array, format=fmt, **kw))(x)


# --- bitsandbytes reference data -------------------------------------------------------------


def test_dynamic_map_equals_bitsandbytes():
    np.testing.assert_array_equal(bnb.dynamic_map().view(np.uint32),
                                  BNB["dynamic_map_signed"].view(np.uint32))


@pytest.mark.parametrize("name", ["m", "odd", "big"])
@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [0, 1])
def test_matches_bitsandbytes(name, fmt, dq):
    x = BNB[f"{name}/x"]
    ref = lambda key: BNB[f"{name}/{fmt}/dq{dq}/{key}"]  # noqa: E731
    q = quantize_array(x, fmt, double_quant=bool(dq))
    np.testing.assert_array_equal(np.asarray(q.codes), ref("packed"))
    deq = np.asarray(q.dequantize())
    assert deq.shape == x.shape and deq.dtype == np.float32
    if not dq:
        np.testing.assert_array_equal(np.asarray(q.absmax).view(np.uint32),
                                      ref("absmax").view(np.uint32))
        np.testing.assert_array_equal(deq.view(np.uint32), ref("dequantized").view(np.uint32))
        return
    # The offset is a float32 mean whose last bit depends on summation order: allow a rare
    # off-by-one absmax code and float rounding in the dequantized values.
    diff = np.abs(np.asarray(q.absmax).astype(int) - ref("absmax_codes").astype(int))
    assert diff.max() <= 1 and diff.mean() <= 0.01
    np.testing.assert_allclose(np.asarray(q.absmax2), ref("absmax2"), rtol=1e-6)
    np.testing.assert_allclose(float(q.offset), float(ref("offset")), rtol=1e-6)
    np.testing.assert_allclose(deq, ref("dequantized"), rtol=1e-6, atol=1e-7)
    # Beyond that tolerance: with PyTorch's summation order emulated, all of it is exact.
    np.testing.assert_array_equal(np.asarray(q.absmax), ref("absmax_codes"))
    assert np.float32(q.offset) == np.float32(ref("offset"))
    np.testing.assert_array_equal(deq.view(np.uint32), ref("dequantized").view(np.uint32))
    fused, _ = jax.jit(lambda q: (q.dequantize(), q.dequantize().sum()))(q)  # inside a bigger jit
    np.testing.assert_array_equal(np.asarray(fused).view(np.uint32), deq.view(np.uint32))


@functools.cache
def _cpp_table():
    code = bnb.dynamic_map()
    mid = F32(0.5) * (code[:-1] + code[1:])
    grid = F32(-1) + (F32(2) * np.arange(65536, dtype=F32)) / F32(65535)
    table, idx = np.zeros(65536, np.int64), 0
    for i, g in enumerate(grid):  # the kernel's walk: next code while its midpoint < grid value
        while idx < 255 and mid[idx] < g:
            idx += 1
        table[i] = idx
    return table


def _cpp_dynamic_codes(v):
    """bitsandbytes' C++ CPU quantize_blockwise lookup for scaled values v, written directly."""
    t = (np.clip(v, F32(-1), F32(1)) + F32(1)) * F32(0.5)
    # (v + 1) * 0.5 * 65535 + 0.5 with the last multiply-add contracted to one FMA
    return _cpp_table()[(t.astype(np.float64) * 65535 + 0.5).astype(F32).astype(np.int64)]


@pytest.mark.parametrize("name", ["m", "odd"])
@pytest.mark.parametrize("dq", [0, 1])
def test_model_quantized_here_and_by_bitsandbytes_gets_the_same_codes(name, dq):
    # bitsandbytes quantizes a PyTorch Linear weight (out, in); the same layer in Flax is the
    # kernel (in, out) = weight.T. quantize() blocks along the kernel's input axis, so both
    # libraries store the same codes for the same model.
    weight = BNB[f"{name}/x"]
    ref = lambda key: BNB[f"{name}/nf4/dq{dq}/{key}"]  # noqa: E731
    params = {"layer": {"kernel": jnp.asarray(weight.T)}}
    for layouts in (None, lora_jax.trace(lambda p, x: x @ p["layer"]["kernel"], params,
                                         jnp.ones((2, weight.shape[1])))):
        q = quantize(params, "nf4", double_quant=bool(dq), layouts=layouts)["layer"]["kernel"]
        assert q.order == (1, 0)
        np.testing.assert_array_equal(np.asarray(q.codes), ref("packed"))
        np.testing.assert_allclose(np.asarray(q.dequantize()), ref("dequantized").T, rtol=1e-6,
                                   atol=1e-7)
    # The other orientation (this library's layout before): blocks along the output axis.
    q = quantize(params, "nf4", double_quant=bool(dq), blocks="row-major")["layer"]["kernel"]
    assert q.order is None
    assert not np.array_equal(np.asarray(q.codes), ref("packed"))
    np.testing.assert_array_equal(np.asarray(q.codes),
                                  np.asarray(quantize_array(weight.T, "nf4",
                                                            double_quant=bool(dq)).codes))


def test_blocks_follow_traced_layout_of_heads_first_kernel():
    # q_einsum (N, D, H) used as BTD,NDH->BTNH: input axis D in the middle. Blocks run along D:
    # the codes are those of the kernel transposed to (N, H, D), flattened.
    w = jax.random.normal(jax.random.key(0), (4, 64, 8))
    params = {"q": {"w": w}}
    fn = lambda p, x: jnp.einsum("BTD,NDH->BTNH", x, p["q"]["w"])  # noqa: E731
    layouts = lora_jax.trace(fn, params, jnp.ones((1, 3, 64)))
    assert layouts["q/w"].roles == "oio"
    q = quantize(params, "nf4", layouts=layouts)["q"]["w"]
    assert q.order == (0, 2, 1)
    ref = quantize_array(jnp.transpose(w, (0, 2, 1)), "nf4", double_quant=True)
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(ref.codes))
    np.testing.assert_array_equal(np.asarray(q.dequantize()),
                                  np.transpose(np.asarray(ref.dequantize()), (0, 2, 1)))


def test_dynamic_code_lookup_matches_cpp_kernel():
    thresholds = bnb.dynamic_thresholds()
    rng = np.random.default_rng(1)
    near = np.concatenate([np.nextafter(thresholds, -2), thresholds, np.nextafter(thresholds, 2)])
    v = np.concatenate([rng.uniform(-1, 1, 20000), rng.normal(0, 1e-3, 20000), near,
                        [-1.0, 0.0, 1.0]]).astype(F32)
    ours = np.asarray(jax.jit(kernels.dynamic_codes)(v))
    np.testing.assert_array_equal(ours, _cpp_dynamic_codes(v))


def _torch_sum_avx2(x):
    """PyTorch's float32 CPU sum (ATen SumKernel.cpp, 8-lane vectors), as plain loops."""

    def row_sum(rows):  # rows: (size, lanes)
        size, lanes = rows.shape
        n_ilp = size // 4
        level_power = max(4, (1 if n_ilp <= 2 else int(n_ilp - 1).bit_length()) // 4)
        step, mask = 1 << level_power, (1 << level_power) - 1
        acc = np.zeros((4, 4, lanes), F32)
        i = 0
        while i + step <= n_ilp:
            for _ in range(step):
                acc[0] += rows[4 * i: 4 * i + 4]
                i += 1
            for j in range(1, 4):
                acc[j] += acc[j - 1]
                acc[j - 1] = 0
                if i & (mask << (j * level_power)):
                    break
        for k in range(i, n_ilp):
            acc[0] += rows[4 * k: 4 * k + 4]
        for j in range(1, 4):
            acc[0] += acc[j]
        partial = acc[0]
        for k in range(n_ilp * 4, size):
            partial[0] += rows[k]
        for k in range(1, 4):
            partial[0] += partial[k]
        return partial[0]

    x = np.asarray(x, F32)
    if x.size < 8:
        return row_sum(x[:, None])[0]
    n_vec = x.size // 8
    lanes = row_sum(x[: n_vec * 8].reshape(n_vec, 8))
    total = F32(0)
    for v in list(x[n_vec * 8:]) + list(lanes):
        total = F32(total + v)
    return total


@pytest.mark.parametrize("n", [1, 3, 5, 8, 26, 128, 513, 9000, 140_000])
def test_offset_follows_torch_summation_order(n):
    x = np.abs(np.random.default_rng(n).standard_normal(n)).astype(F32) * F32(3)
    ours = np.asarray(jax.jit(bnb.torch_mean)(jnp.asarray(x)))
    assert ours == _torch_sum_avx2(x) / F32(n)


# --- float64 references on fresh random inputs -----------------------------------------------


# The code of each format, written out independently of lora_jax: index = stored code
# (nf4/fp4: bitsandbytes' 4-bit codes; int4: nibble = code + 8; int8: byte = code + 128).
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
TABLES = {
    "nf4": np.array(NF4),
    "fp4": np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3]) / 12,
    "int4": np.arange(-8, 8) / 7,
    "int8": np.arange(-128, 128) / 127,
}
ZERO_CODE = {"nf4": 7, "fp4": 0, "int4": 8}


def _reference(x, fmt, block_size):
    """Block absmax and nearest code, in float64 (ambiguous = within 1e-6 of a tie)."""
    flat = np.asarray(x, np.float64).reshape(-1)
    n = flat.size
    pad = -n % block_size
    blocks = np.pad(flat, (0, pad)).reshape(-1, block_size)
    absmax = np.abs(blocks).max(1)
    scaled = (blocks / absmax[:, None]).reshape(-1)[:n]
    table = TABLES[fmt]
    dist = np.abs(scaled[:, None] - table[None])
    best = np.sort(dist, axis=1)
    idx = dist.argmin(1)
    ambiguous = (best[:, 1] - best[:, 0]) < 1e-6
    ambiguous &= np.abs(table[dist.argsort(1)[:, 1]] - table[idx]) > 0  # two equal zeros: no
    return table[idx] * np.repeat(absmax, block_size)[:n], idx, ambiguous


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_against_float64_reference(fmt, double_quant):
    x = np.random.default_rng(7).standard_normal((37, 96)).astype(F32)  # 55.5 blocks of 64
    q = jit_quantize(x, fmt, double_quant=double_quant)
    if fmt == "int8":
        ours = np.asarray(q.codes).astype(int) + 128
    else:
        ours = unpack(q.codes, x.size)
    ref_values, ref_idx, ambiguous = _reference(x, fmt, 64)
    table = TABLES[fmt]
    same = table[ours] == table[ref_idx]
    assert np.all(same | ambiguous) and ambiguous.mean() < 1e-3
    deq = np.asarray(q.dequantize()).reshape(-1)
    if double_quant:  # 8-bit absmax: ~1% scale error at most
        np.testing.assert_allclose(deq, ref_values, rtol=0.02, atol=0.02)
    else:
        ok = np.isclose(deq, ref_values, rtol=1e-6, atol=1e-6)
        assert np.all(ok | ambiguous)


def test_nibble_order_hand_made():
    x = np.zeros(64, F32)
    x[:4] = [1.0, -1.0, 0.0, 1.0]  # NF4 codes 15, 0, 7, 15
    q = quantize_array(x, "nf4")
    assert np.asarray(q.codes)[:3].tolist() == [0xF0, 0x7F, 0x77]
    hand = QuantizedArray(jnp.array([0x0F, 0x8E], jnp.uint8), jnp.array([2.0], jnp.float32),
                          None, None, shape=(3,), dtype_name="float32", block_size=64,
                          format="nf4", double_quant=False)
    expect = 2.0 * bnb.CODES["nf4"][[0, 15, 8]]
    np.testing.assert_array_equal(np.asarray(hand.dequantize()), expect)


def test_double_quant_several_groups():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((785, 64)) * rng.uniform(0.1, 4.0, (785, 1))).astype(F32)
    plain = quantize_array(x, "nf4")
    q = quantize_array(x, "nf4", double_quant=True)
    assert q.absmax.shape == (785,) and q.absmax.dtype == jnp.uint8
    assert q.absmax2.shape == (4,) and q.offset.shape == ()
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(plain.codes))
    absmax = np.asarray(plain.absmax)
    offset = np.float32(q.offset)
    np.testing.assert_allclose(offset, absmax.astype(np.float64).mean(), rtol=1e-6)
    v = np.pad(absmax - offset, (0, 4 * 256 - 785)).reshape(4, 256)
    absmax2 = np.abs(v).max(1)
    np.testing.assert_array_equal(np.asarray(q.absmax2), absmax2)
    codes = _cpp_dynamic_codes(v * (F32(1) / absmax2)[:, None]).reshape(-1)[:785]
    np.testing.assert_array_equal(np.asarray(q.absmax), codes)
    err = np.abs(np.asarray(kernels.block_absmax(q.absmax, q.absmax2, q.offset)) - absmax)
    assert err.max() <= 0.01 * np.abs(v).max()


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_padding_never_leaks(fmt):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 37)).astype(F32)  # 111: odd, a partial block of 47
    q = quantize_array(x, fmt)
    assert q.absmax.shape == (2,)
    assert q.codes.shape == ((111,) if fmt == "int8" else (56,))
    if fmt != "int8":  # the odd element out is padded with the code of 0.0
        assert int(q.codes[-1]) & 15 == ZERO_CODE[fmt]
    deq = np.asarray(q.dequantize())
    assert deq.shape == (3, 37)
    ref, _, ambiguous = _reference(x, fmt, 64)  # each block on its own elements only
    assert np.all(np.isclose(deq.reshape(-1), ref, rtol=1e-6, atol=1e-7) | ambiguous)
    prefix = np.asarray(quantize_array(x.reshape(-1)[:64], fmt).dequantize())
    np.testing.assert_array_equal(deq.reshape(-1)[:64], prefix)


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_jit_equals_eager(fmt):
    x = np.random.default_rng(2).standard_normal((4, 80)).astype(F32)
    eager = quantize_array(x, fmt, block_size=32, double_quant=True)
    jitted = jit_quantize(jnp.asarray(x), fmt, block_size=32, double_quant=True)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    deq = jax.jit(lambda q: q.dequantize(jnp.bfloat16))(jitted)
    assert deq.dtype == jnp.bfloat16 and deq.shape == (4, 80)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, np.float64])
def test_other_float_dtypes(dtype):
    x = np.random.default_rng(4).standard_normal((8, 64))
    xd = np.asarray(jnp.asarray(x, jnp.float32).astype(dtype)) if dtype != np.float64 else x
    q = quantize_array(xd, "nf4")
    ref = quantize_array(np.asarray(xd).astype(F32), "nf4")
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(ref.codes))
    assert q.dtype == jnp.dtype(dtype)
    out = q.dequantize(jnp.float32) if dtype == np.float64 else q.dequantize()
    assert out.dtype == (jnp.float32 if dtype == np.float64 else dtype)


def test_relative_error_nf4_vs_int4():
    x = np.random.default_rng(0).standard_normal((512, 512)).astype(F32)

    def rel(fmt):
        deq = np.asarray(quantize_array(x, fmt).dequantize())
        return np.linalg.norm(deq - x) / np.linalg.norm(x)

    assert 0.085 < rel("nf4") < 0.10
    assert rel("nf4") < rel("int4")
    assert rel("int8") < 0.01


def test_bits_per_parameter():
    params = {"kernel": jnp.ones((1024, 1024))}

    def bits(fmt, dq):
        return quantized_bytes(quantize(params, fmt, double_quant=dq))["bits_per_param"]

    assert bits("nf4", True) <= 4.13
    assert bits("nf4", False) <= 4.5
    assert bits("int8", False) <= 8.5
    assert bits("int8", True) <= 8.13


# --- errors ----------------------------------------------------------------------------------


def test_errors_name_the_path():
    x = np.ones((4, 64), F32)
    for bad in (np.nan, np.inf):
        y = x.copy()
        y[1, 3] = bad
        with pytest.raises(ValueError, match="params/w.*NaN or Inf"):
            quantize_array(y, path="params/w")
    with pytest.raises(ValueError, match="params/w.*'nf5'.*nf4, fp4, int4, int8"):
        quantize_array(x, "nf5", path="params/w")
    for block_size in (48, 8, 64.0, True):
        with pytest.raises(ValueError, match="params/w.*power of two"):
            quantize_array(x, block_size=block_size, path="params/w")
    for int_like in (np.ones((4, 64), np.int32), np.ones((4, 64), bool)):
        with pytest.raises(TypeError, match="params/w.*floating"):
            quantize_array(int_like, path="params/w")
    assert quantize_array(x, block_size=np.int64(32)).block_size == 32
    with pytest.raises(ValueError, match="params/w.*empty"):
        quantize_array(np.ones((0, 4), F32), path="params/w")


def test_tree_errors():
    params = {"params": {"Dense_0": {"kernel": np.full((16, 16), np.nan, F32)}}}
    with pytest.raises(ValueError, match="params/Dense_0/kernel"):
        quantize(params)
    with pytest.raises(ValueError, match="'.*/q_proj/kernel'"):
        quantize({"a": {"kernel": jnp.ones((16, 16))}}, targets=[".*/kernel", ".*/q_proj/kernel"])
    with pytest.raises(ValueError, match="unknown format"):
        quantize({"kernel": jnp.ones((16, 16))}, "int3")


# --- tree level ------------------------------------------------------------------------------


def _params():
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    return {
        "params": {
            "Dense_0": {"kernel": normal(64, 32), "bias": jnp.zeros(32)},
            "Embed_0": {"embedding": normal(100, 64)},
            "layers": [{"kernel": normal(32, 32)}, {"kernel": normal(64, 32)}],
            "step": jnp.array(3),
        }
    }


def test_default_selection_and_round_trip():
    params = _params()
    q = quantize(params)
    p = q["params"]
    assert is_quantized(p["Dense_0"]["kernel"]) and is_quantized(p["layers"][1]["kernel"])
    assert not is_quantized(p["Dense_0"]["bias"]) and not is_quantized(p["Embed_0"]["embedding"])
    assert p["step"] is params["params"]["step"]
    assert p["Dense_0"]["kernel"].double_quant and p["Dense_0"]["kernel"].format == "nf4"
    dense = dequantize_tree(q)
    assert jax.tree.structure(dense) == jax.tree.structure(params)
    err = dense["params"]["Dense_0"]["kernel"] - params["params"]["Dense_0"]["kernel"]
    assert float(jnp.abs(err).max()) < 0.5
    assert dequantize_tree(q, jnp.bfloat16)["params"]["Dense_0"]["kernel"].dtype == jnp.bfloat16
    assert quantize(q)["params"]["Dense_0"]["kernel"] is p["Dense_0"]["kernel"]  # kept as is


def test_targets_exclude_min_size():
    params = _params()
    q = quantize(params, "int8", targets=r".*/embedding")["params"]
    assert is_quantized(q["Embed_0"]["embedding"]) and not is_quantized(q["Dense_0"]["kernel"])
    q = quantize(params, targets=["params/layers/0/kernel", r".*Dense_0/.*"])["params"]
    assert is_quantized(q["layers"][0]["kernel"]) and not is_quantized(q["layers"][1]["kernel"])
    assert is_quantized(q["Dense_0"]["bias"])
    q = quantize(params, exclude=r".*/layers/.*")["params"]
    assert is_quantized(q["Dense_0"]["kernel"]) and not is_quantized(q["layers"][0]["kernel"])
    q = quantize(params, min_size=1025)["params"]
    assert is_quantized(q["Dense_0"]["kernel"]) and not is_quantized(q["layers"][0]["kernel"])


def test_quantized_leaf_is_a_pytree_and_jits():
    q = quantize(_params(), "fp4", block_size=32)
    leaf = q["params"]["Dense_0"]["kernel"]
    assert (leaf.shape, leaf.ndim, leaf.size, leaf.dtype) == ((64, 32), 2, 2048, jnp.float32)
    assert leaf.nbytes == sum(a.nbytes for a in jax.tree.leaves(leaf))
    hash((leaf.shape, leaf.dtype_name, leaf.block_size, leaf.format, leaf.double_quant))
    f = jax.jit(lambda t, x: x @ dequantize_tree(t)["params"]["Dense_0"]["kernel"])
    y = f(q, jnp.ones((2, 64)))
    assert y.shape == (2, 32)
    stats = quantized_bytes(q)
    assert set(stats["leaves"]) == {"params/Dense_0/kernel", "params/layers/0/kernel",
                                    "params/layers/1/kernel"}
    assert stats["total"] == sum(stats["leaves"].values())
    assert stats["params"] == 2048 + 1024 + 2048
