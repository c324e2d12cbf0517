"""Loading a checkpoint a tensor at a time: quantized while read, and straight onto a mesh.

References: the dense load followed by ``lora_jax.quantize`` (codes and scales must be equal
bit for bit) and ``jax.device_put`` of that onto the same shardings. The mesh checks need 8 CPU
devices, forced before JAX starts, so they run in worker processes (this file run as a
script): one process with 8 devices, and two processes with 4 each (gloo collectives), which
must also each read only their share of the checkpoint's bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    import jax

    jax.config.update("jax_num_cpu_devices", 8 if sys.argv[2] == "single" else 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import lora_jax
from lora_jax.models import llama as L
from lora_jax.models import streaming
from lora_jax.models.tensor_files import TensorFiles, write

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT_S = 180
CFG = L.LlamaConfig(vocab=256, d=64, layers=2, heads=4, kv_heads=2, ffn=128, tied=False)
# few distinct shapes (each a compile) for the mesh workers
MESH_CFG = L.LlamaConfig(vocab=128, d=64, layers=1, heads=4, kv_heads=4, ffn=128, tied=False)
OPTIONS = [{"format": "nf4"},  # QLoRA: double quantization, blocks along the inputs
           {"format": "int8", "double_quant": False, "block_size": 32, "blocks": "row-major"},
           {"format": "fp4", "storage": "native", "min_size": 9000}]


def write_checkpoint(folder, cfg=CFG, seed=0, dtype=ml_dtypes.bfloat16, files=2) -> None:
    """A random Llama as Hugging Face safetensors in ``files`` shards, with its config."""
    os.makedirs(folder, exist_ok=True)
    shapes = jax.eval_shape(L.Llama(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    names = L.hf_names(cfg)
    rng = np.random.default_rng(seed)
    table = {}
    for name, where in names.items():
        node = shapes["params"]
        for k in where:
            node = node[k]
        shape = node.shape[::-1] if where[-1] == "kernel" else node.shape
        table[name] = (shape, np.dtype(dtype))
    items = list(table.items())
    for i in range(files):
        part = dict(items[i::files])
        gen = ((n, (rng.standard_normal(s) * (1.0 if len(s) == 1 else 0.05)).astype(d))
               for n, (s, d) in part.items())
        write(os.path.join(folder, f"model-{i + 1:05d}-of-{files:05d}.safetensors"), gen,
              shapes=part)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(L.config_to_hf(cfg), f)


def assert_same_tree(got, want):
    """Same structure, same leaf kinds and static fields, equal arrays bit for bit."""
    gl, gt = jax.tree.flatten_with_path(got, is_leaf=lora_jax.is_quantized)
    wl, wt = jax.tree.flatten_with_path(want, is_leaf=lora_jax.is_quantized)
    assert gt == wt
    for (kp, g), (_, w) in zip(gl, wl):
        assert repr(g) == repr(w), jax.tree_util.keystr(kp)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
            assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(kp)
            a, b = np.asarray(a), np.asarray(b)
            if a.dtype.itemsize == 1:  # uint4/int4 codes compare as bytes
                a, b = a.view(np.uint8), b.view(np.uint8)
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(kp))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("ckpt"))
    write_checkpoint(folder)
    return folder


@pytest.mark.parametrize("opts,dtype", [(OPTIONS[0], jnp.bfloat16), (OPTIONS[1], jnp.float32),
                                        (OPTIONS[2], jnp.bfloat16)],
                         ids=["nf4-bf16", "int8-f32", "fp4-bf16"])
def test_quantize_on_load_equals_quantize(checkpoint, dtype, opts):
    _, dense = L.from_safetensors(checkpoint, dtype=dtype)
    want = lora_jax.quantize(dense, **{k: v for k, v in opts.items() if k != "format"},
                             format=opts["format"])
    _, got = L.from_safetensors(checkpoint, dtype=dtype, quantize=opts)
    assert_same_tree(got, want)


def test_bf16_load_keeps_file_values(checkpoint):
    files = TensorFiles(checkpoint)
    _, v = L.from_safetensors(files, dtype=jnp.bfloat16)
    assert files.bytes_read == sum(
        int(np.prod(files.shape(n))) * 2 for n in files.keys())  # each tensor read once
    k = v["params"]["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert k.dtype == jnp.bfloat16
    raw = files.read("model.layers.1.mlp.down_proj.weight")
    np.testing.assert_array_equal(np.asarray(k).view(np.uint16), raw.T.view(np.uint16))


def test_bad_checkpoints_name_the_tensor(tmp_path):
    write_checkpoint(str(tmp_path), files=1)
    wrong = L.LlamaConfig(**{**CFG.__dict__, "ffn": 96})
    with pytest.raises(ValueError, match=r"params/layers_0/mlp/\w+_proj/kernel: the checkpoint "
                                         r"holds shape"):
        L.from_safetensors(tmp_path, wrong, quantize="nf4")
    file = os.path.join(tmp_path, "model-00001-of-00001.safetensors")
    os.truncate(file, os.path.getsize(file) - 100)
    with pytest.raises(ValueError, match="model-00001-of-00001.safetensors is truncated"):
        L.from_safetensors(tmp_path, quantize="nf4")
    w = np.full((CFG.d, CFG.d), np.nan, np.float32)
    src = {"params/q/kernel": streaming.Array(w)}
    abstract = {"params": {"q": {"kernel": jax.ShapeDtypeStruct(w.shape, jnp.float32)}}}
    with pytest.raises(ValueError, match="params/q/kernel: cannot quantize .* NaN"):
        streaming.load(abstract, src, quantize="nf4")


def test_gguf_quantize_on_load(tmp_path):
    gguf = pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize
    from test_llama import TINY, _byte_vocab, random_variables, to_gguf_names

    from lora_jax.models import gguf as G

    path = str(tmp_path / "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    for add, value in [("block_count", TINY.layers), ("context_length", TINY.max_len),
                       ("embedding_length", TINY.d), ("feed_forward_length", TINY.ffn),
                       ("head_count", TINY.heads), ("head_count_kv", TINY.kv_heads),
                       ("rope_freq_base", TINY.rope_theta),
                       ("layer_norm_rms_eps", TINY.rms_eps), ("vocab_size", TINY.vocab)]:
        getattr(w, "add_" + add)(value)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(_byte_vocab()[: TINY.vocab])
    for name, x in to_gguf_names(random_variables(TINY, 2), TINY).items():
        kind = T.Q8_0 if "attn_q" in name or "ffn_up" in name else T.F32
        w.add_tensor(name, quantize(x, kind) if kind != T.F32 else x, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _, dense = G.load_llama(path)
    _, got = G.load_llama(path, quantize="nf4")
    assert_same_tree(got, lora_jax.quantize(dense, "nf4"))


def test_peak_memory_under_half_the_float32_model(tmp_path):
    """A ~240 MB (float32) model loads for QLoRA with RSS growth under half of that."""
    cfg = L.LlamaConfig(vocab=4096, d=1024, layers=4, heads=8, kv_heads=8, ffn=2816, tied=False)
    write_checkpoint(str(tmp_path), cfg, files=2)
    code = f"""
import resource, jax, jax.numpy as jnp, numpy as np, lora_jax
from lora_jax.models import llama as L
from lora_jax.quant import on_load
# warm up: the kernels compile once, outside the measurement
lora_jax.quantize({{"kernel": jnp.ones((256, on_load.CHUNK // 256))}}, "nf4")
def rss():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) * 1024
before = rss()
cfg, v = L.from_safetensors({str(tmp_path)!r}, quantize="nf4")
hwm = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
print(before, hwm, lora_jax.base_param_count(v))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-3000:]
    before, hwm, n = map(int, out.stdout.split()[-3:])
    f32 = 4 * n
    assert f32 > 200e6
    assert hwm - before <= 0.5 * f32, (hwm - before, f32)


# --------------------------------------------------------------------------- on a mesh


def base_specs(mesh):
    from jax.sharding import PartitionSpec as P

    axes = tuple(mesh.axis_names)
    # every matrix split over all devices along its leading axis; norms replicated
    return lambda tree: jax.tree.map(lambda x: P(axes) if len(x.shape) == 2 else P(), tree,
                                     is_leaf=lora_jax.is_quantized)


def worker(mode: str, out: str, port: int = 0, process_id: int = 0) -> None:
    if mode == "pair":
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                                   initialization_timeout=120)
    from lora_jax import sharding as S

    folder = os.path.join(os.path.dirname(out), "ckpt")
    if process_id == 0 and not os.path.exists(os.path.join(folder, "config.json")):
        write_checkpoint(folder, MESH_CFG)
    if mode == "pair":
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("written")
    mesh = S.mesh((2, 4), ("data", "model"))
    report: dict = {"processes": jax.process_count(), "devices": len(jax.devices())}
    reference_files = TensorFiles(folder)
    _, dense = L.from_safetensors(reference_files, dtype=jnp.float32)
    # dense leaves follow the same path in both modes: placed once, by the single process
    variants = [("nf4", {"format": "nf4"})] + ([("dense", None)] if mode == "single" else [])
    for name, opts in variants:
        files = TensorFiles(folder)
        _, got = L.from_safetensors(files, quantize=opts, mesh=mesh, specs=base_specs(mesh))
        want = dense if opts is None else lora_jax.quantize(dense, **opts)
        specs = S.storage_specs(want, base_specs(mesh)(want), mesh)
        gl = jax.tree.leaves(got)
        wl = jax.tree.leaves(jax.device_put(want, S.named(mesh, specs)))
        assert len(gl) == len(wl)
        sharded = 0
        for g, w in zip(gl, wl):
            assert g.sharding == w.sharding and g.shape == w.shape and g.dtype == w.dtype
            sharded += not g.is_fully_replicated
            for a, b in zip(g.addressable_shards, w.addressable_shards):
                assert a.device == b.device and a.index == b.index
                x, y = np.asarray(a.data), np.asarray(b.data)
                if x.dtype.itemsize == 1:
                    x, y = x.view(np.uint8), y.view(np.uint8)
                np.testing.assert_array_equal(x, y)
        share = sum(int(np.prod(files.shape(n))) * files.dtype(n).itemsize
                    * (1 if len(files.shape(n)) == 1 else 0.5
                       if jax.process_count() == 2 else 1) for n in files.keys())
        report[name] = {"bytes_read": files.bytes_read, "expected": share,
                        "total": reference_files.bytes_read, "sharded_leaves": sharded}
    if mode == "pair":
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("done")
    with open(out, "w") as fh:
        json.dump(report, fh)
    if mode == "pair":
        jax.distributed.shutdown()


def _run(tmp_path, mode: str) -> list[dict]:
    from conftest import free_port, run_workers

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + [p for p in env.get(
        "PYTHONPATH", "").split(os.pathsep) if p])
    n = 2 if mode == "pair" else 1
    port = str(free_port())
    outs = [str(tmp_path / f"proc{i}.json") for i in range(n)]
    return run_workers([([os.path.abspath(__file__), "worker", mode, outs[i], port, str(i)],
                         outs[i]) for i in range(n)], env, tmp_path, TIMEOUT_S)


@pytest.mark.parametrize("mode", ["single", "pair"])
def test_load_onto_mesh_equals_device_put(tmp_path, mode):
    reports = _run(tmp_path, mode)
    for r in reports:
        assert r["devices"] == 8 and r["processes"] == len(reports)
        for name in ("nf4",) if mode == "pair" else ("nf4", "dense"):
            assert r[name]["sharded_leaves"] >= 9  # every matrix
            # each process reads exactly its devices' slices, each slice once
            assert r[name]["bytes_read"] == r[name]["expected"], (name, r)
            if mode == "pair":
                assert r[name]["bytes_read"] < 0.52 * r[name]["total"]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
