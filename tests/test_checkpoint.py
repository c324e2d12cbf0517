"""Tests for lora_jax/checkpoint.py.

Single-device round trips run in-process. Two things run in child processes started from this
file (``python tests/test_checkpoint.py <mode> ...``): a save killed with SIGKILL half-way, and
restoring onto other meshes, which needs 8 forced CPU devices before JAX starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "reshard":
    import jax

    jax.config.update("jax_num_cpu_devices", 8)

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import lora_jax
from lora_jax import adalora
from lora_jax import checkpoint as C
from lora_jax import sharding as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"


@dataclasses.dataclass(frozen=True)
class Config:
    lr: float = 1e-3
    layers: int = 2
    name: str = "tiny"


def _params(d=32, seed=0):
    # numpy draws: XLA:CPU would compile a sampler for every shape.
    rng = np.random.default_rng(seed)
    w = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731
    return {"params": {
        "attn": {"q": {"kernel": w(d, d), "bias": jnp.zeros(d)}, "o": {"kernel": w(d, d)}},
        "mlp": {"up": {"kernel": w(d, 2 * d)}, "down": {"kernel": w(2 * d, d)}},
        "embed": {"embedding": jnp.ones((16, d))}}}


def _random(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32)), tree)


def _lora(params, seed=1):
    lora = lora_jax.init(params, r=4, alpha=8, key=jax.random.key(seed), dropout=0.1,
                         rules=[lora_jax.Rule(pattern=".*mlp.*", r=2, alpha=4)], rslora=True,
                         targets=r".*kernel")
    return _random(lora, seed)


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _raw_arrays(path):
    """Every array an adapter checkpoint holds, read with plain Orbax."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        return ck.restore(path, ocp.args.Composite(arrays=ocp.args.StandardRestore())).arrays


# ----------------------------------------------------------------------------------------
# Adapter-only


def test_adapter_round_trip_needs_no_arguments(tmp_path):
    params = _params()
    lora = _lora(params)
    nbytes = C.save_adapter(tmp_path / "a", lora, meta=Config())
    back = C.load_adapter(tmp_path / "a")
    _assert_same(back, lora)  # same leaf kinds, static fields (alpha, rslora, dropout), values
    q = back["params"]["attn"]["q"]["kernel"]
    assert (q.r, q.alpha, q.rslora, q.dropout) == (4, 8.0, True, 0.1)
    info = C.adapter_info(tmp_path / "a")
    assert info["format"] == "lora_jax.adapter" and info["format_version"] == C.FORMAT_VERSION
    assert info["targets"] == sorted(lora_jax.lora.leaves(lora))
    assert info["r"] == {"params/attn/o/kernel": 4, "params/attn/q/kernel": 4,
                         "params/mlp/down/kernel": 2, "params/mlp/up/kernel": 2}
    assert info["alpha"]["params/mlp/up/kernel"] == 4.0 and info["kind"] == "LoRA"
    assert info["meta"] == {"lr": 1e-3, "layers": 2, "name": "tiny"}
    assert info["nbytes"] == nbytes > 0
    # Only the adapter's arrays are in it, never the base weights.
    raw = _raw_arrays(tmp_path / "a")
    assert sum(np.size(x) for x in raw.values()) == lora_jax.param_count(lora)
    with pytest.raises((TypeError, ValueError)):
        C.save_adapter(tmp_path / "b", {"base": params, "lora": lora})


def test_adalora_adapter_round_trip(tmp_path):
    params = _params()
    ada = _random(adalora.init(params, init_r=6, target_r=3, key=jax.random.key(0)), 2)
    C.save_adapter(tmp_path / "ada", ada)
    back = C.load_adapter(tmp_path / "ada", like=ada, base=params)
    _assert_same(back, ada)
    assert type(back["params"]["mlp"]["up"]["kernel"]) is adalora.AdaLoraWeight
    assert C.adapter_info(tmp_path / "ada")["kind"] == "AdaLoRA"


def test_load_adapter_rejects_a_checkpoint_that_does_not_fit(tmp_path):
    params = _params()
    C.save_adapter(tmp_path / "a", _lora(params))
    other_rank = lora_jax.init(params, r=8, alpha=8, key=jax.random.key(0), targets=r".*kernel")
    with pytest.raises(ValueError, match=r"params/attn/o/kernel/a has shape \(32, 4\) in the "
                                         r"checkpoint, \(32, 8\) in the model"):
        C.load_adapter(tmp_path / "a", like=other_rank)
    fewer = lora_jax.init(params, r=4, key=jax.random.key(0), targets=r".*attn.*kernel")
    with pytest.raises(ValueError, match=r"extra and lacks no expected"):
        C.load_adapter(tmp_path / "a", like=fewer)
    with pytest.raises(ValueError, match=r"does not fit the base model.*params/attn/o/kernel"):
        C.load_adapter(tmp_path / "a", base=_params(d=16))
    with pytest.raises(ValueError, match=r"does not fit the base model: it adapts "
                                         r".params/mlp/down/kernel., which the base lacks"):
        C.load_adapter(tmp_path / "a", base={"params": {"attn": _params()["params"]["attn"]}})
    with pytest.raises(FileNotFoundError):
        C.load_adapter(tmp_path / "missing")


def test_overwrite_replaces_only_when_asked(tmp_path):
    params = _params()
    first, second = _lora(params, 1), _lora(params, 2)
    C.save_adapter(tmp_path / "a", first)
    with pytest.raises(FileExistsError):
        C.save_adapter(tmp_path / "a", second)
    C.save_adapter(tmp_path / "a", second, overwrite=True)
    _assert_same(C.load_adapter(tmp_path / "a"), second)
    assert os.listdir(tmp_path) == ["a"]


# ----------------------------------------------------------------------------------------
# Full train state


def _train_state():
    params = _params()
    lora = _random(adalora.init(params, init_r=6, target_r=3, key=jax.random.key(0)), 3)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    alloc = adalora.Allocator(total_steps=10, tinit=1, tfinal=2)
    state = alloc.init(lora)
    state = state._replace(exp_avg_ipt=_random(state.exp_avg_ipt, 4))
    opt = tx.init(lora)
    opt = _random(opt, 5)
    return params, lora, tx, opt, state


def test_manager_round_trip_of_full_state(tmp_path):
    params, lora, tx, opt, state = _train_state()
    with C.Manager(tmp_path, max_to_keep=2, async_save=True) as ckpt:
        for step in range(4):
            assert ckpt.save(step, lora=lora, opt_state=opt, adalora=state,
                             rng=jax.random.key(step), meta=Config(lr=step))
        ckpt.wait()
        assert ckpt.steps == [2, 3]
        r = ckpt.restore()
        assert r.step == 3 and r.meta == {"lr": 3, "layers": 2, "name": "tiny"}
        _assert_same(r.lora, lora)
        _assert_same(r.opt_state, opt)  # optax NamedTuples rebuilt without a template
        assert type(r.opt_state[1][0]).__name__ == "ScaleByAdamState"
        assert isinstance(r.adalora, adalora.AllocatorState)
        _assert_same(r.adalora, state)
        assert jax.dtypes.issubdtype(r.rng.dtype, jax.dtypes.prng_key)
        np.testing.assert_array_equal(jax.random.key_data(r.rng),
                                      jax.random.key_data(jax.random.key(3)))
        # The adapter alone can be read from a train-state step (to export it).
        _assert_same(C.load_adapter(tmp_path / "3", like=lora), lora)
        assert C.adapter_info(tmp_path / "3")["meta"] == {"lr": 3, "layers": 2, "name": "tiny"}
        r2 = ckpt.restore(2, like=lora, base=params, opt_state=jax.eval_shape(tx.init, lora))
        assert r2.step == 2
        _assert_same(r2.opt_state, opt)
        # The restored state drives the same step as the original.
        g = jax.tree.map(jnp.ones_like, lora)
        update = jax.jit(tx.update)
        u1, _ = update(g, opt, lora)
        u2, _ = update(g, r.opt_state, r.lora)
        _assert_same(u1, u2)
    # Dropped steps went out of the listing atomically, and are gone once the manager closes.
    assert sorted(os.listdir(tmp_path)) == ["2", "3", "_deleted"]
    assert os.listdir(tmp_path / "_deleted") == []


def test_manager_rejects_state_that_does_not_fit(tmp_path):
    params, lora, tx, opt, state = _train_state()
    with C.Manager(tmp_path) as ckpt:
        ckpt.save(5, lora=lora, opt_state=opt)
        with pytest.raises(ValueError, match=r"optimizer state has 25 arrays, the template 12; "
                                             r"was it saved with"):
            ckpt.restore(opt_state=optax.sgd(0.1, momentum=0.9).init(lora))
        bigger = adalora.init(params, init_r=8, target_r=3, key=jax.random.key(0))
        with pytest.raises(ValueError, match=r"params/attn/o/kernel/p has shape \(32, 6\) in the "
                                             r"checkpoint, \(32, 8\) in the model"):
            ckpt.restore(like=bigger)
        with pytest.raises(ValueError, match="does not fit the base model"):
            ckpt.restore(base=_params(d=16))
        with pytest.raises(FileNotFoundError, match="no checkpoint for step 4"):
            ckpt.restore(4)


def test_sizes_adapter_only_vs_full_state(tmp_path):
    params, lora, tx, opt, state = _train_state()
    adapter = C.save_adapter(tmp_path / "adapter", lora)
    with C.Manager(tmp_path / "full") as ckpt:
        ckpt.save(0, lora=lora, opt_state=opt, adalora=state)
        full = ckpt.size()
    n = lora_jax.param_count(lora)
    base = sum(np.size(x) * 4 for x in jax.tree.leaves(params))
    assert 4 * n <= adapter < 4 * n + 64 * 1024  # the arrays plus a little metadata
    assert full > adapter + 4 * 4 * n  # Adam's two moments and two AdaLoRA EMAs on top
    assert base > 4 * n  # (the base itself is never in either)


# ----------------------------------------------------------------------------------------
# Killed saves


def _kill_worker(directory: str, what: str) -> None:
    """Child: completes a first save, then blocks forever just before the second commits."""
    import asyncio
    import time

    from orbax.checkpoint._src.path import atomicity

    params = _params()
    first, second = _lora(params, 1), _lora(params, 2)
    if what == "manager":
        ckpt = C.Manager(directory, async_save=True)
        ckpt.save(1, lora=first, opt_state=optax.adam(1e-3).init(first))
        ckpt.wait()
    else:
        C.save_adapter(os.path.join(directory, "adapter"), first)
    print("SAVED", flush=True)

    async def hang(self, *a, **k):  # everything is written; only the commit is missing
        print("FINALIZING", flush=True)
        while True:
            await asyncio.sleep(3600)

    atomicity.AtomicRenameTemporaryPath.finalize = hang
    atomicity.CommitFileTemporaryPath.finalize = hang
    if what == "manager":
        ckpt.save(2, lora=second, opt_state=optax.adam(1e-3).init(second))
    else:
        C.save_adapter(os.path.join(directory, "adapter"), second, overwrite=True)
    time.sleep(3600)


def _loop_worker(directory: str) -> None:
    """Child: saves step after step (asynchronously, keeping 2) until it is killed."""
    params = _params()
    with C.Manager(directory, max_to_keep=2, async_save=True) as ckpt:
        for step in range(1, 10**6):
            lora = _lora(params, step)
            ckpt.save(step, lora=lora, opt_state=optax.adam(1e-3).init(lora))
            if step == 2:
                ckpt.wait()
                print("READY", flush=True)


def _spawn(*args, timeout=120, xla_flags=""):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + xla_flags).strip())
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_during_commit(directory, what):
    proc = _spawn("kill", str(directory), what)
    watchdog = threading.Timer(120, proc.kill)  # never hang the suite
    watchdog.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line.strip())
            if line.strip() == "FINALIZING":
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=30)
        assert lines[-2:] == ["SAVED", "FINALIZING"], (lines, proc.stderr.read()[-3000:])
        assert proc.returncode == -signal.SIGKILL
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_save_killed_before_commit_keeps_previous_checkpoint(tmp_path):
    _kill_during_commit(tmp_path, "manager")
    # The second save wrote everything into a temporary directory, which never became step 2.
    assert any(".orbax-checkpoint-tmp" in p for p in os.listdir(tmp_path)), os.listdir(tmp_path)
    first = _lora(_params(), 1)
    with C.Manager(tmp_path) as ckpt:
        assert ckpt.steps == [1]
        r = ckpt.restore()
        assert r.step == 1
        _assert_same(r.lora, first)
        ckpt.save(2, lora=first)  # and the directory stays usable
        ckpt.wait()
        assert ckpt.steps == [1, 2]
    assert not any(".orbax-checkpoint-tmp" in p for p in os.listdir(tmp_path))


def test_save_killed_at_any_moment_leaves_restorable_checkpoints(tmp_path):
    proc = _spawn("loop", str(tmp_path))
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout.readline().strip() == "READY", proc.stderr.read()[-3000:]
        time.sleep(np.random.default_rng().uniform(0.2, 1.5))  # mid-write, mid-delete, ...
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    params = _params()
    with C.Manager(tmp_path) as ckpt:
        assert ckpt.steps and ckpt.steps[-1] >= 2
        for step in ckpt.steps:  # every step it lists is complete and correct
            _assert_same(ckpt.restore(step).lora, _lora(params, step))


def test_adapter_overwrite_killed_before_commit_keeps_old_adapter(tmp_path):
    _kill_during_commit(tmp_path, "adapter")
    _assert_same(C.load_adapter(tmp_path / "adapter"), _lora(_params(), 1))


# ----------------------------------------------------------------------------------------
# Restoring onto other meshes (8 forced CPU devices, in a child process)


def _reshard_worker(directory: str, out: str) -> None:
    assert len(jax.devices()) == 8
    params, lora, tx, opt, state = _train_state()
    m24 = S.mesh((2, 4), ("data", "model"))
    base24 = S.fsdp(params, m24, min_size=0, specs=S.tensor_parallel(params, m24))
    lspec = S.specs(lora, base24, mesh=m24)
    put = lambda t, s: jax.device_put(t, S.named(m24, s))  # noqa: E731
    with C.Manager(directory) as ckpt:
        ckpt.save(7, lora=put(lora, lspec), opt_state=put(opt, S.state_specs(opt, lspec)),
                  adalora=put(state, S.state_specs(state, lspec)), rng=jax.random.key(7))
        ckpt.wait()
        res = {}
        m42 = S.mesh((4, 2), ("data", "model"))
        base42 = S.fsdp(params, m42, min_size=0, specs=S.tensor_parallel(params, m42))
        m8 = S.mesh((8,), ("data",))
        cases = {"4x2-base-specs": (m42, base42, S.specs(lora, base42, mesh=m42)),
                 "8-lora-specs": (m8, S.specs(lora, S.fsdp(params, m8, min_size=0)), None),
                 "4x2-replicated": (m42, None, S.specs(lora, None, policy="replicate")),
                 "one-device": (None, None, None)}
        for name, (mesh, specs, want) in cases.items():
            r = ckpt.restore(mesh=mesh, specs=specs)
            want = specs if want is None else want
            same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
                jax.tree.leaves((r.lora, r.opt_state, r.adalora)),
                jax.tree.leaves((lora, opt, state))))
            if mesh is None:
                placed = all(len(x.sharding.device_set) == 1
                             for x in jax.tree.leaves((r.lora, r.opt_state, r.adalora)))
            else:
                exp = S.named(mesh, want)
                placed = all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(
                    jax.tree.leaves(r.lora), jax.tree.leaves(exp)))
                exp_opt = S.named(mesh, S.state_specs(r.opt_state, want))
                placed &= all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(
                    jax.tree.leaves(r.opt_state), jax.tree.leaves(exp_opt)))
                exp_ada = S.named(mesh, S.state_specs(r.adalora, want))
                placed &= all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(
                    jax.tree.leaves(r.adalora), jax.tree.leaves(exp_ada)))
            sharded = any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(r.lora))
            res[name] = {"same": same, "placed": placed, "sharded": sharded,
                         "rng": bool(jax.dtypes.issubdtype(r.rng.dtype, jax.dtypes.prng_key))}
        # The saved shards really were split: the q kernel's A was sharded on "data".
        a = ckpt.restore(mesh=m24, specs=lspec).lora["params"]["attn"]["q"]["kernel"].p
        res["2x4-spec"] = str(a.sharding.spec)
    with open(out, "w") as fh:
        json.dump(res, fh)


def test_restore_onto_other_meshes_and_one_device(tmp_path):
    proc = _spawn("reshard", str(tmp_path / "ckpt"), str(tmp_path / "out.json"),
                  xla_flags=FAST_COMPILE)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-4000:]
    with open(tmp_path / "out.json") as fh:
        res = json.load(fh)
    for name in ("4x2-base-specs", "8-lora-specs", "4x2-replicated", "one-device"):
        assert res[name]["same"] and res[name]["placed"] and res[name]["rng"], (name, res[name])
    assert res["4x2-base-specs"]["sharded"] and res["8-lora-specs"]["sharded"]
    assert not res["4x2-replicated"]["sharded"]
    assert res["2x4-spec"] == "P('data',)"


if __name__ == "__main__" and len(sys.argv) > 1:
    if sys.argv[1] == "kill":
        _kill_worker(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "loop":
        _loop_worker(sys.argv[2])
    elif sys.argv[1] == "reshard":
        _reshard_worker(sys.argv[2], sys.argv[3])
