"""Native 4-bit storage (``storage="native"``): same values as packed bytes, everywhere."""

import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import max_rel_err, randomize
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import lora_jax
from lora_jax import checkpoint
from lora_jax import sharding as S
from lora_jax.models.gpt import GPT, GPTConfig, loss_fn
from lora_jax.quant import quantize, quantize_array, quantized_bytes

F32 = np.float32
FORMATS4 = ("nf4", "fp4", "int4")
NATIVE_DTYPE = {"nf4": jnp.uint4, "fp4": jnp.uint4, "int4": jnp.int4}


def _bits(x):
    return np.asarray(x, F32).view(np.uint32)


@pytest.mark.parametrize("fmt", FORMATS4)
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_native_dequantizes_to_the_same_bits_as_packed(fmt, dq, dtype):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 37)) * 3, dtype)  # 111: odd, a partial block
    packed = quantize_array(x, fmt, double_quant=dq)
    native = quantize_array(x, fmt, double_quant=dq, storage="native")
    assert native.storage == "native" and packed.storage == "packed"
    assert native.codes.dtype == NATIVE_DTYPE[fmt] and native.codes.shape == (112,)
    for a, b in zip(jax.tree.leaves(packed)[1:], jax.tree.leaves(native)[1:]):  # the scales
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for out in (None, jnp.float32, jnp.bfloat16):
        np.testing.assert_array_equal(_bits(native.dequantize(out)), _bits(packed.dequantize(out)))
    anchored = jax.jit(lambda q, y: q.dequantize(after=y))(native, jnp.ones(3))
    np.testing.assert_array_equal(_bits(anchored), _bits(packed.dequantize()))
    jitted = jax.jit(lambda v: quantize_array(v, fmt, double_quant=dq, storage="native"))(x)
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(native)))


@pytest.mark.parametrize("fmt", FORMATS4)
def test_native_codes_are_the_packed_nibbles(fmt):
    x = np.random.default_rng(2).standard_normal((785, 64)).astype(F32)  # 4 DQ groups
    packed = quantize_array(x, fmt, double_quant=True)
    native = quantize_array(x, fmt, double_quant=True, storage="native")
    nibbles = np.stack([np.asarray(packed.codes) >> 4, np.asarray(packed.codes) & 15], -1)
    codes = np.asarray(native.codes).astype(int)
    np.testing.assert_array_equal(codes + (8 if fmt == "int4" else 0), nibbles.reshape(-1))
    if fmt == "int4":
        assert codes.min() >= -7 and codes.max() <= 7  # the signed code itself
    np.testing.assert_array_equal(np.asarray(packed.with_storage("native").codes), codes)
    np.testing.assert_array_equal(np.asarray(native.with_storage("packed").codes),
                                  np.asarray(packed.codes))
    assert packed.with_storage("packed") is packed
    converted = jax.jit(lambda q: q.with_storage("native"))(packed)
    np.testing.assert_array_equal(np.asarray(converted.codes), codes)


def test_native_bytes_count_four_bits_per_code():
    params = {"kernel": jnp.ones((1024, 1024))}
    stats = {s: quantized_bytes(quantize(params, "nf4", storage=s)) for s in ("packed", "native")}
    assert stats["native"] == stats["packed"]
    assert round(stats["native"]["bits_per_param"], 3) == 4.127
    q = quantize_array(np.ones((4, 37), F32), "int4", storage="native")  # 148 codes, 3 blocks
    assert q.codes.nbytes == 148  # jax counts a byte per int4 element...
    assert q.nbytes == 148 // 2 + 3 * 4  # ...the stored layout is two codes per byte
    arg = jax.jit(lambda t: t.dequantize()).lower(q).compile().memory_analysis()
    assert arg.argument_size_in_bytes == q.nbytes  # XLA's own count of the stored bytes


def test_requantize_unstack_and_repr_keep_the_storage():
    w = jnp.asarray(np.random.default_rng(3).standard_normal((3, 64, 256)), jnp.float32)
    q = quantize_array(w, "nf4", double_quant=True, storage="native")
    again = q.requantize(w * 2)
    assert again.storage == "native" and again.codes.dtype == jnp.uint4
    layers = q.unstack_leading()  # 64 * 256 / 64 = 256 blocks per layer: one DQ group
    assert layers.storage == "native" and layers.codes.shape == (3, 64 * 256)
    layer1 = jax.tree.map(lambda a: a[1], layers)
    np.testing.assert_array_equal(_bits(layer1.dequantize()), _bits(q.dequantize()[1]))
    assert repr(q).endswith("double_quant, native)")
    assert "native" not in repr(q.with_storage("packed"))


def test_storage_errors_name_the_path():
    x = np.ones((4, 64), F32)
    with pytest.raises(ValueError, match="params/w.*unknown storage 'int4'.*packed.*native"):
        quantize_array(x, "int4", storage="int4", path="params/w")
    with pytest.raises(ValueError, match="params/w.*native.*4-bit formats.*int8"):
        quantize_array(x, "int8", storage="native", path="params/w")
    with pytest.raises(ValueError, match="quantize: unknown storage 'uint4'"):
        quantize({"kernel": jnp.ones((16, 16))}, storage="uint4")
    with pytest.raises(ValueError, match="layers/0.*native.*int8"):
        quantize_array(x, "int8").with_storage("native", path="layers/0")
    assert quantize_array(x, "int8").storage == "packed"  # int8's only storage


# --- through lora_jax.apply ------------------------------------------------------------------

CFG = {"vocab": 64, "d": 64, "heads": 4, "layers": 2, "mlp": 256, "seq": 16}
TOK = jax.random.randint(jax.random.key(5), (2, 16), 0, 64)


def _setup(scan, dq, fmt="nf4"):
    model = GPT(GPTConfig(**CFG, scan=scan))
    params = model.init(jax.random.key(1), TOK)
    stack = {".*layers.*": 1} if scan else None
    packed = quantize(params, fmt, double_quant=dq, stack_axes=stack)
    native = quantize(params, fmt, double_quant=dq, storage="native", stack_axes=stack)
    lora = lora_jax.init(params, r=4, key=jax.random.key(2), targets=r".*/(q|v|up)/kernel",
                         stack_axes={".*layers.*": 1} if scan else None)
    return model, packed, native, randomize(lora, jax.random.key(3), 0.05)


@pytest.mark.parametrize("scan,dq,fmt", [(False, True, "nf4"), (False, True, "int4"),
                                         (True, False, "nf4"), (True, True, "fp4")],
                         ids=["unrolled-nf4-dq", "unrolled-int4-dq", "scan-nf4",
                              "scan-fp4-dq-fallback"])
def test_qlora_values_and_grads_equal_packed(scan, dq, fmt):
    model, packed, native, lora = _setup(scan, dq, fmt)
    f = lora_jax.apply(model.apply)
    step = jax.jit(jax.value_and_grad(lambda l, base: loss_fn(f(base, l, TOK), TOK)))
    v_p, g_p = step(lora, packed)
    v_n, g_n = step(lora, native)
    assert abs(float(v_n) - float(v_p)) <= 1e-6 * abs(float(v_p))
    assert max_rel_err(g_n, g_p) < 1e-6
    if scan:  # stacked layers unstack one layer at a time unless DQ groups straddle layers
        rep = lora_jax.report(model.apply, native, lora, TOK)
        use = rep["params/layers/block/q/kernel"].uses[0]
        assert ("blocks straddle layers" in use.reason) if dq else use.route == "fast"


def test_train_steps_and_merge_keep_native_storage():
    model, packed, native, lora = _setup(False, True)
    f = lora_jax.apply(model.apply)
    tx = optax.adamw(1e-2)

    @jax.jit
    def step(l, o, base):
        g = jax.grad(lambda l: loss_fn(f(base, l, TOK), TOK))(l)
        upd, o = tx.update(g, o, l)
        return optax.apply_updates(l, upd), o

    out = {}
    for name, base in (("packed", packed), ("native", native)):
        state = (lora, tx.init(lora))
        for _ in range(3):
            state = step(*state, base)
        out[name] = state[0]
    assert max_rel_err(out["native"], out["packed"]) < 1e-6
    requant, _ = lora_jax.merge(native, out["native"], requantize=True)
    ref, _ = lora_jax.merge(packed, out["packed"], requantize=True)
    leaf = dict(lora_jax.paths.flatten(requant))["params/block_0/q/kernel"]
    assert leaf.storage == "native"
    np.testing.assert_allclose(leaf.dequantize(), lora_jax.dequantize_tree(ref)["params"][
        "block_0"]["q"]["kernel"], rtol=0, atol=1e-6)


# --- checkpoints and sharding ----------------------------------------------------------------


def test_checkpoints_check_against_a_native_base_and_refuse_to_write_it():
    _, _, native, lora = _setup(False, True)
    d = tempfile.mkdtemp()
    checkpoint.save_adapter(os.path.join(d, "adapter"), lora)
    back = checkpoint.load_adapter(os.path.join(d, "adapter"), like=lora, base=native)
    assert max_rel_err(back, lora) == 0
    leaf = native["params"]["block_0"]["q"]["kernel"]
    with checkpoint.Manager(os.path.join(d, "steps"), async_save=False) as ckpt:
        with pytest.raises(TypeError, match="opt_state/w is a QuantizedArray, a base weight"):
            ckpt.save(0, lora=lora, opt_state={"w": leaf})
        with pytest.raises(TypeError, match="opt_state/codes: Orbax cannot write uint4"):
            ckpt.save(0, lora=lora, opt_state={"codes": leaf.codes})
        ckpt.save(0, lora=lora, opt_state={"codes": leaf.with_storage("packed").codes})
        assert ckpt.restore(base=native).step == 0


def test_storage_specs_and_collective_bytes_of_native_codes():
    w = jax.random.normal(jax.random.key(0), (64, 32))
    base = quantize({"w": {"kernel": w}}, "nf4", block_size=64, storage="native")
    m = AbstractMesh((2, 4), ("data", "model"))
    st = S.storage_specs(base, {"w/kernel": P("data", "model")}, m)["w"]["kernel"]
    assert (st.codes, st.absmax, st.storage) == (P(("data", "model")), P(("data", "model")),
                                                 "native")
    hlo = "ENTRY %main {\n  %ag = u4[4096]{0:E(4)} all-gather(%p), dimensions={0}\n}"
    assert S.collectives(hlo)[0].nbytes == 2048  # two codes per byte


_SHARDED = """
import jax
jax.config.update("jax_num_cpu_devices", 4)
import numpy as np, lora_jax
from jax.sharding import PartitionSpec as P
from lora_jax import sharding as S
w = jax.random.normal(jax.random.key(0), (256, 64))
params = {"a": {"kernel": w}, "b": {"kernel": w[:, :48] * 2}}
mesh = S.mesh((4,), ("data",))
spec = {"a/kernel": P("data", None), "b/kernel": P(None, "data")}
out = {}
for storage in ("packed", "native"):
    q = lora_jax.quantize(params, "nf4", storage=storage)
    q = jax.device_put(q, S.named(mesh, S.storage_specs(q, spec, mesh)))
    codes = q["a"]["kernel"].codes
    assert codes.sharding.spec == P("data") and len(codes.addressable_shards) == 4
    out[storage] = jax.jit(lora_jax.dequantize_tree)(q)
for a, b in zip(jax.tree.leaves(out["packed"]), jax.tree.leaves(out["native"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
print("sharded ok")
"""


def test_native_codes_shard_over_devices():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(lora_jax.__file__))),
         os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True,
                         env=env, timeout=300, check=False)
    assert run.returncode == 0 and "sharded ok" in run.stdout, run.stderr[-2000:]
