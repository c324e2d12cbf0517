"""Tests for lora_jax/sharding.py.

Spec derivation runs in-process (abstract meshes need no devices). The sharded train steps
need 8 CPU devices, which must be forced before JAX starts its backend; the pytest process
has long started it (other test files import jax), so this file runs itself as a worker
process (``python tests/test_sharding.py worker OUT``) that computes everything once and
writes a JSON report the tests below check.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time

if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    import jax

    jax.config.update("jax_num_cpu_devices", 8)

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax
from lora_jax import adalora
from lora_jax import sharding as S
from lora_jax.sharding import plumbing

MESHES = {"8": ((8,), ("data",)), "2x4": ((2, 4), ("data", "model")),
          "4x2": ((4, 2), ("data", "model"))}
VARIANTS = ("lora", "qlora", "adalora")
R = 3  # a rank no kernel dim equals, so that adapter arrays never look kernel-shaped in HLO
BATCH = 24  # per-device rows (batch x seq) that no kernel dim equals either
CFG = dict(vocab=64, d=32, heads=4, layers=2, mlp=64, seq=16)
# XLA:CPU spends seconds in LLVM on each of these small programs; the worker compiles ~15 of
# them, so it trades run speed (irrelevant here) for a ~10x faster compile. Numerics and the
# partitioned HLO (what the checks read) do not depend on these flags.
FAST_COMPILE = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"


# ----------------------------------------------------------------------------------------
# In-process: spec derivation


@functools.cache
def _params():
    from lora_jax.models.gpt import GPT, GPTConfig

    shapes = jax.eval_shape(GPT(GPTConfig(**CFG)).init, jax.random.key(0),
                            jnp.zeros((2, 16), jnp.int32))
    return jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes)  # specs need no values


def _abstract_mesh(shape, names):
    return AbstractMesh(shape, names)


def test_lora_specs_inherit_input_and_output_axes():
    params = _params()
    lora = lora_jax.init(params, r=R, key=jax.random.key(0))
    m = _abstract_mesh((2, 4), ("data", "model"))
    base = S.fsdp(params, m, axis="data", specs=S.tensor_parallel(params, m, axis="model"))
    assert base["params/block_0/q/kernel"] == P("data", "model")
    assert base["params/block_0/o/kernel"] == P("model", "data")
    assert base["params/block_0/q/bias"] == P("model")
    spec = S.specs(lora, base, mesh=m)
    q, o = spec["params"]["block_0"]["q"]["kernel"], spec["params"]["block_0"]["o"]["kernel"]
    assert (q.a, q.b) == (P("data"), P(None, "model"))
    assert (o.a, o.b) == (P("model"), P(None, "data"))
    assert type(q) is lora_jax.LoraWeight
    assert q.alpha == lora["params"]["block_0"]["q"]["kernel"].alpha
    # The spec tree has the LoRA tree's structure, so it goes straight into jit/device_put.
    rep = S.specs(lora, None, policy="replicate")
    assert jax.tree.structure(S.named(S.mesh((1,), ("data",)), rep)) == jax.tree.structure(lora)
    assert all(s == P() for s in jax.tree.leaves(rep, is_leaf=lambda x: isinstance(x, P)))


def test_specs_for_stacked_and_multi_axis_kernels():
    params = {"layers": {"attn": {"query": {"kernel": jnp.zeros((3, 16, 4, 8))},
                                  "out": {"kernel": jnp.zeros((3, 4, 8, 16))}}}}
    lora = lora_jax.init(params, r=2, key=jax.random.key(0), stack_axes=1)
    ada = adalora.init(params, init_r=4, target_r=2, key=jax.random.key(0), stack_axes=1)
    base = {"layers/attn/query/kernel": P(None, "data", "model"),
            "layers/attn/out/kernel": P(None, "model", None, "data")}
    s = S.specs(lora, base)["layers"]["attn"]
    q = s["query"]["kernel"]
    assert (q.a, q.b) == (P(None, "data"), P(None, None, "model"))
    assert (s["out"]["kernel"].a, s["out"]["kernel"].b) == (P(None, "model"), P(None, None, "data"))
    a = S.specs(ada, base)["layers"]["attn"]["out"]["kernel"]
    assert (a.p, a.e, a.q) == (P(None, "model"), P(), P(None, None, "data"))


def test_specs_errors():
    params = _params()
    lora = lora_jax.init(params, r=R, key=jax.random.key(0))
    m = _abstract_mesh((8,), ("data",))
    with pytest.raises(ValueError, match="no entry for the adapted parameter 'params/block_0/down"):
        S.specs(lora, {"params/block_0/q/kernel": P("data")})
    bad = S.fsdp(params, m)
    bad["params/head/kernel"] = P(None, None, "data")
    with pytest.raises(ValueError, match="params/head/kernel.*3 entries for an array of rank 2"):
        S.specs(lora, bad)
    bad["params/head/kernel"] = P("nope")
    with pytest.raises(ValueError, match=r"mesh axes \['nope'\] are not in the mesh"):
        S.specs(lora, bad, mesh=m)
    with pytest.raises(ValueError, match="policy must be one of"):
        S.specs(lora, None, policy="shard")
    small = {"w": {"kernel": jnp.zeros((12, 20))}}
    with pytest.raises(ValueError, match=r"w/kernel/a: dim 0 of shape \(12, 2\) is not divisible"):
        S.specs(lora_jax.init(small, r=2, key=jax.random.key(0)), {"w/kernel": P("data")}, mesh=m)


def test_state_specs_for_optimizer_and_allocator():
    params = _params()
    m = _abstract_mesh((2, 4), ("data", "model"))
    base = S.fsdp(params, m, specs=S.tensor_parallel(params, m))
    ada = adalora.init(params, init_r=5, target_r=3, key=jax.random.key(0))
    spec = S.specs(ada, base)
    st = adalora.Allocator(total_steps=10).init(ada)
    ss = S.state_specs(st, spec)
    q = spec["params"]["block_0"]["q"]["kernel"]
    assert ss.exp_avg_ipt["params"]["block_0"]["q"]["kernel"] == q
    assert ss.exp_avg_unc["params"]["block_0"]["q"]["kernel"] == q
    assert ss.mask["params"]["block_0"]["q"]["kernel"] == q.e and ss.budget == P()
    # optax: mu/nu follow the adapters; the combined {"base", "lora"} tree of lora_jax.optimizer
    # too (suffix match), with masked base entries replicated.
    opt = optax.adamw(1e-3).init(ada)
    os_ = S.state_specs(opt, spec)
    up = spec["params"]["block_1"]["up"]["kernel"]
    assert os_[0].mu["params"]["block_1"]["up"]["kernel"] == up
    assert os_[0].count == P()
    tree = {"base": params, "lora": ada}
    opt2 = jax.eval_shape(lora_jax.optimizer(optax.adam(1e-3), tree).init, tree)
    got = S.state_specs(opt2, spec)
    flat = {lora_jax.paths.path_str(k): v for k, v in
            jax.tree_util.tree_flatten_with_path(got, is_leaf=lambda x: isinstance(x, P))[0]}
    hits = [k for k, v in flat.items() if k.endswith("lora/params/block_0/o/kernel/q")]
    assert hits and all(flat[k] == spec["params"]["block_0"]["o"]["kernel"].q for k in hits)


def test_storage_specs_shard_quantized_weights_along_whole_blocks():
    w = jax.random.normal(jax.random.key(0), (64, 32))
    base = lora_jax.quantize({"w": {"kernel": w}}, "nf4", block_size=64)  # 32 blocks
    m = _abstract_mesh((2, 4), ("data", "model"))
    st = S.storage_specs(base, {"w/kernel": P("data", "model")}, m)["w"]["kernel"]
    assert type(st) is lora_jax.QuantizedArray
    assert (st.codes, st.absmax, st.absmax2, st.offset) == (
        P(("data", "model")), P(("data", "model")), P(), P())
    big = lora_jax.quantize({"w": {"kernel": jnp.ones((64, 32))}}, "nf4", block_size=512)
    with pytest.raises(ValueError, match="4 blocks of 512, which 8 shards"):
        S.storage_specs(big, {"w/kernel": P("data", "model")}, m)
    # fsdp never proposes a spec that splits a block: it falls back to replication.
    with pytest.warns(UserWarning, match="w/kernel"):
        assert S.fsdp(big, _abstract_mesh((8,), ("data",)))["w/kernel"] == P()


def test_mesh_helper_makes_auto_axes():
    m = S.mesh((1, 1), ("data", "model"))
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)


# ----------------------------------------------------------------------------------------
# Worker: the sharded train steps on 8 forced CPU devices


def _randomize(tree, seed, scale=0.05):
    # numpy draws: XLA:CPU would compile a sampler per shape, seconds in all.
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + scale * rng.standard_normal(x.shape, np.float32), tree)


def make_problem(variant, **cfg_kw):
    """(base, lora, opt_state, alloc_state, step_fn, tokens, model) for one variant."""
    from lora_jax.models.gpt import GPT, GPTConfig, loss_fn

    cfg = GPTConfig(**{**CFG, **cfg_kw})
    model = GPT(cfg)
    tokens = jax.random.randint(jax.random.key(1), (BATCH, cfg.seq), 0, cfg.vocab)
    params = jax.jit(model.init)(jax.random.key(0), tokens)
    base = lora_jax.quantize(params, "nf4") if variant == "qlora" else params
    f = lora_jax.apply(model.apply)
    tx = optax.adamw(1e-2)
    if variant == "adalora":
        lora = _randomize(adalora.init(params, init_r=5, target_r=3, key=jax.random.key(2)),
                          3)
        alloc = adalora.Allocator(total_steps=4, tinit=0, tfinal=1, delta_t=1)
        state = alloc.init(lora)

        def step(base, lora, opt, state, tokens, i):
            def loss(l):
                return loss_fn(f(base, l, tokens), tokens) + 0.1 * adalora.orth_reg(l)

            val, g = jax.value_and_grad(loss)(lora)
            upd, opt = tx.update(g, opt, lora)
            lora = optax.apply_updates(lora, upd)
            lora, state = alloc.update(lora, state, g, i)
            return lora, opt, state, val
    else:
        lora = _randomize(lora_jax.init(params, r=R, key=jax.random.key(2)), 3)
        state = None

        def step(base, lora, opt, state, tokens, i):
            val, g = jax.value_and_grad(lambda l: loss_fn(f(base, l, tokens), tokens))(lora)
            upd, opt = tx.update(g, opt, lora)
            return optax.apply_updates(lora, upd), opt, state, val

    return base, lora, tx.init(lora), state, step, tokens, model


def _base_specs(base, mesh):
    if len(mesh.axis_names) == 1:
        return S.fsdp(base, mesh, axis="data")
    return S.fsdp(base, mesh, axis="data", specs=S.tensor_parallel(base, mesh, axis="model"))


def _kernel_shapes(base, storage_or_logical, mesh):
    """Every per-device shape a targeted kernel can take (each sharded axis gathered or not)."""
    import itertools

    flat = plumbing.spec_map(storage_or_logical)
    out = set()
    for path, x in lora_jax.paths.flatten(base):
        if not path.endswith("kernel") or len(x.shape) != 2:
            continue
        opts = []
        for d, e in enumerate(plumbing.padded_entries(flat.get(path, P()), 2, path)):
            axes = () if e is None else (e,) if isinstance(e, str) else e
            n = int(np.prod([mesh.shape[a] for a in axes]))
            opts.append({x.shape[d], x.shape[d] // n})
        out |= set(itertools.product(*opts))
    return sorted(out)


def _run_variant(variant, mesh_key, ref):
    base, lora, opt, state, step, tokens, _ = make_problem(variant)
    args = (base, lora, opt, state, tokens)
    if mesh_key is None:  # the single-device reference
        jstep = jax.jit(step)
        shardings = None
    else:
        shape, names = MESHES[mesh_key]
        mesh = S.mesh(shape, names)
        bspec = _base_specs(base, mesh)
        lspec = S.specs(lora, bspec, mesh=mesh)
        shard = (S.named(mesh, S.storage_specs(base, bspec, mesh)), S.named(mesh, lspec),
                 S.named(mesh, S.state_specs(opt, lspec)),
                 None if state is None else S.named(mesh, S.state_specs(state, lspec)),
                 NamedSharding(mesh, P("data")))
        args = jax.device_put(args, shard)
        rep = NamedSharding(mesh, P())
        jstep = jax.jit(step, in_shardings=shard + (rep,),
                        out_shardings=(shard[1], shard[2], shard[3], rep))
        shardings = lspec
    t0 = time.perf_counter()
    compiled = jstep.lower(*args, jnp.int32(0)).compile()
    compile_s = time.perf_counter() - t0
    base_, lora_, opt_, state_, tokens_ = args
    losses = []
    for i in range(2):
        lora_, opt_, state_, loss = compiled(base_, lora_, opt_, state_, tokens_, jnp.int32(i))
        losses.append(float(loss))
    out = {"losses": losses, "compile_s": compile_s,
           "lora": [np.asarray(x).tolist() for x in jax.tree.leaves(lora_)],
           "opt": [np.asarray(x, np.float64).tolist() for x in jax.tree.leaves((opt_, state_))]}
    if mesh_key is None:
        return out
    want = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, P))
    got = [x.sharding.spec for x in jax.tree.leaves(lora_)]
    out["out_specs_ok"] = [str(g) for g, w in zip(got, want) if g != w] == []
    def err(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(b))))

    out["max_err"] = max(err(a, b) for a, b in zip(out["lora"] + out["opt"],
                                                    ref["lora"] + ref["opt"]))
    out["loss_err"] = max(abs(a - b) for a, b in zip(out["losses"], ref["losses"]))
    out["collectives"] = [dict(op=c.op, shapes=c.shapes, source=c.source, nbytes=c.nbytes)
                          for c in S.collectives(compiled)]
    out["kernel_shapes"] = _kernel_shapes(base, bspec, mesh)
    out["n_2d_params"] = sum(len(x.shape) == 2 for _, x in lora_jax.paths.flatten(base))
    out["n_targets"] = len(lora_jax.lora.leaves(lora))
    del out["lora"], out["opt"]
    return out


def _negative_controls():
    """Programs that do communicate ΔW or dW, to show the HLO checks can see them."""
    mesh = S.mesh((2, 4), ("data", "model"))
    a = jax.device_put(jnp.ones((32, R)), NamedSharding(mesh, P("data")))
    b = jax.device_put(jnp.ones((R, 64)), NamedSharding(mesh, P(None, "model")))
    prod = jax.jit(lambda a, b: a @ b, out_shardings=NamedSharding(mesh, P()))
    prod = prod.lower(a, b).compile()
    # Differentiating through the merged weight (apply(mode="merged")) forms dW = x^T dy.
    from lora_jax.models.gpt import loss_fn

    base, lora, _, _, _, tokens, model = make_problem("lora")
    f = lora_jax.apply(model.apply, mode="merged")
    bspec = _base_specs(base, mesh)
    lspec = S.specs(lora, bspec, mesh=mesh)
    shard = (S.named(mesh, S.storage_specs(base, bspec, mesh)), S.named(mesh, lspec),
             NamedSharding(mesh, P("data")))
    g = jax.jit(jax.grad(lambda b, l, t: loss_fn(f(b, l, t), t), argnums=1),
                in_shardings=shard, out_shardings=shard[1])
    merged = g.lower(*jax.device_put((base, lora, tokens), shard)).compile()

    def fmt(c):
        return [dict(op=x.op, shapes=x.shapes, source=x.source) for x in S.collectives(c)]

    return {"product_gather": fmt(prod), "merged_grad": fmt(merged),
            "kernel_shapes": _kernel_shapes(base, bspec, mesh)}


def worker(path):
    assert len(jax.devices()) == 8, jax.devices()
    report = {}
    for variant in VARIANTS:
        t0 = time.perf_counter()
        ref = _run_variant(variant, None, None)
        print(variant, "ref", time.perf_counter() - t0, file=sys.stderr, flush=True)
        report[f"{variant}/ref"] = {"losses": ref["losses"]}
        for mesh_key in MESHES:
            t0 = time.perf_counter()
            report[f"{variant}/{mesh_key}"] = _run_variant(variant, mesh_key, ref)
            print(variant, mesh_key, time.perf_counter() - t0, file=sys.stderr, flush=True)
    report["negative"] = _negative_controls()
    with open(path, "w") as fh:
        json.dump(report, fh)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "report.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip())
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "worker", str(out)],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as fh:
        return json.load(fh)


CASES = [(v, m) for v in VARIANTS for m in MESHES]


@pytest.mark.parametrize("variant,mesh_key", CASES)
def test_sharded_step_equals_single_device(report, variant, mesh_key):
    r = report[f"{variant}/{mesh_key}"]
    assert r["loss_err"] <= 1e-5, (r["losses"], report[f"{variant}/ref"]["losses"])
    assert r["max_err"] <= 1e-5
    assert r["out_specs_ok"], "updated adapters lost their sharding"


def _kernel_like(shape, kernel_shapes):
    return list(shape) in [list(k) for k in kernel_shapes]


def _violations(colls, kernel_shapes):
    """All-gathers of a kernel-shaped product (ΔW alone), and reductions of kernel-shaped
    arrays (a dense dW)."""
    bad = []
    for c in colls:
        kernel = [s for s in c["shapes"] if _kernel_like(s, kernel_shapes)]
        if not kernel:
            continue
        if c["op"] == "all-gather" and c["source"] == "product":
            bad.append(("ΔW gathered", c))
        if c["op"] in ("all-reduce", "reduce-scatter"):
            bad.append(("dW reduced", c))
    return bad


@pytest.mark.parametrize("variant,mesh_key", CASES)
def test_sharded_step_never_gathers_delta_w(report, variant, mesh_key):
    r = report[f"{variant}/{mesh_key}"]
    assert _violations(r["collectives"], r["kernel_shapes"]) == []
    gathers = [c for c in r["collectives"] if c["op"] == "all-gather"
               and any(_kernel_like(s, r["kernel_shapes"]) for s in c["shapes"])]
    # Each FSDP-sharded weight is gathered for the forward matmul and for dx in the backward
    # pass (the merged weight is recomputed there rather than kept), nothing more.
    assert len(gathers) <= 2 * r["n_2d_params"]


def test_hlo_checks_see_delta_w_and_dw_traffic(report):
    neg = report["negative"]
    ks = [[32, 64], [32, 16]]
    assert any(c["op"] == "all-gather" and c["source"] == "product" for c in neg["product_gather"])
    assert _violations(neg["product_gather"], ks)
    merged = _violations(neg["merged_grad"], neg["kernel_shapes"])
    assert any(kind == "dW reduced" for kind, _ in merged), neg["merged_grad"]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    worker(sys.argv[2])
