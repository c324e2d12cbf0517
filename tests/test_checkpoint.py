"""Tests for lora_jax/checkpoint/.

Single-device round trips run in-process. Two things run in child processes started from this
file (``python tests/test_checkpoint.py <mode> ...``): a save killed with SIGKILL half-way, and
restoring onto other meshes, which needs 8 forced CPU devices before JAX starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
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
    with pytest.raises(ValueError, match=r"does not fit the base model: LoRA tree has "
                                         r".params/mlp/down/kernel., which the base tree lacks"):
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
    assert os.listdir(tmp_path) == ["adapter"]  # the half-written copy was removed by the load


# ----------------------------------------------------------------------------------------
# save_adapter(overwrite=True) killed at random points


def _overwrite_worker(directory: str, start: int, die_at: int) -> None:
    """Child: overwrites one adapter with k = start, start + 1, ... until it is killed.

    With ``die_at > 0`` it SIGKILLs itself at its ``die_at``-th rename, unlink or rmdir (in
    lora_jax or in Orbax), so that deaths land between the renames of a swap, inside Orbax's
    commit, or half-way through deleting a folder.
    """
    import itertools
    import shutil

    params = _params(d=8)
    path = os.path.join(directory, "adapter")
    if die_at > 0:
        count = [0]

        def deadly(fn):
            def wrapped(*a, **k):
                count[0] += 1
                if count[0] == die_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return fn(*a, **k)
            return wrapped

        for name in ("rename", "replace", "unlink", "remove", "rmdir"):
            setattr(os, name, deadly(getattr(os, name)))
        shutil.rmtree = deadly(shutil.rmtree)
    for k in itertools.count(start):
        print(f"SAVING {k}", flush=True)
        C.save_adapter(path, _lora(params, k), meta={"k": k}, overwrite=True)
        print(f"SAVED {k}", flush=True)


def test_adapter_overwrite_killed_at_random_points_loads_last_or_in_flight(tmp_path):
    rng = np.random.default_rng()
    params = _params(d=8)
    path = tmp_path / "adapter"
    C.save_adapter(path, _lora(params, 0), meta={"k": 0})
    last, start, seen = 0, 1, set()
    for trial in range(12):
        die_at = int(rng.integers(1, 60)) if trial % 2 else 0
        proc = _spawn("overwrite", str(tmp_path), str(start), str(die_at))
        watchdog = threading.Timer(120, proc.kill)
        watchdog.start()
        try:
            lines = []
            if not die_at:  # kill at a random moment once saving is under way
                for line in proc.stdout:
                    lines.append(line.split())
                    if lines[-1][0] == "SAVED":
                        time.sleep(rng.uniform(0.0, 0.5))
                        os.kill(proc.pid, signal.SIGKILL)
                        break
            proc.wait(timeout=60)
            lines += [line.split() for line in proc.stdout.read().splitlines()]
            assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        saved = [int(k) for what, k in lines if what == "SAVED"]
        saving = [int(k) for what, k in lines if what == "SAVING"]
        last = saved[-1] if saved else last
        in_flight = saving[-1] if saving and saving[-1] > last else None
        seen |= {name.split(".")[1].split("-")[0] for name in os.listdir(tmp_path)
                 if name != "adapter"}
        k = C.adapter_info(path)["meta"]["k"]  # recovers from the kill first
        assert k in (last, in_flight), (trial, die_at, k, last, in_flight, lines)
        _assert_same(C.load_adapter(path), _lora(params, k))
        assert os.listdir(tmp_path) == ["adapter"], os.listdir(tmp_path)  # nothing piles up
        last, start = k, max(saving, default=start) + 1
    assert seen, "no kill left anything to recover from"


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)


def test_adapter_recovery_picks_the_newest_complete_copy(tmp_path):
    """Folders as killed overwrites leave them: the newest complete one always wins."""
    params = _params(d=8)
    src = {k: tmp_path / "src" / str(k) for k in (1, 2, 3)}
    for k, p in src.items():
        C.save_adapter(p, _lora(params, k), meta={"k": k})
    d = tmp_path / "run"
    d.mkdir()
    path = d / "adapter"
    seq = lambda n, tag: f"adapter.incoming-{n:020d}-{tag}"  # noqa: E731

    def check(expected, **leave):
        k = C.adapter_info(path)["meta"]["k"]
        assert k == expected
        assert sorted(os.listdir(d)) == sorted(["adapter", *leave.get("others", [])])

    # Killed after the new copy was complete, before the swap: the new copy wins.
    _copy(src[1], path)
    _copy(src[2], d / seq(5, "0000beef"))
    check(2)
    # Killed between the two renames of the swap: the old one is on its way out.
    os.rename(path, d / "adapter.old-00000000000000000006-00000000")
    _copy(src[3], d / seq(7, "00000000"))
    check(3)
    # Two complete copies from two killed saves: the later sequence wins, whatever the id
    # (lora_jax 0.1.0 sorted random ids and returned the older adapter).
    _copy(src[1], d / seq(8, "ffffffff"))
    _copy(src[2], d / seq(9, "00000001"))
    check(2)
    # Orbax's unfinished temporary folders go; another adapter's files stay.
    (d / "adapter.orbax-checkpoint-tmp-12").mkdir()
    (d / f"{seq(10, 'abcdef12')}.orbax-checkpoint-tmp-13").mkdir()
    (d / "adapter.v2.orbax-checkpoint-tmp-14").mkdir()
    check(2, others=["adapter.v2.orbax-checkpoint-tmp-14"])
    # A complete copy named by lora_jax 0.1.0 (random id only) is newer than the adapter.
    _copy(src[3], d / "adapter.incoming-1234abcd")
    check(3, others=["adapter.v2.orbax-checkpoint-tmp-14"])
    # The next save cleans up too, and a save never sees its own leftovers as newer.
    (d / "adapter.orbax-checkpoint-tmp-15").mkdir()
    C.save_adapter(path, _lora(params, 1), meta={"k": 1}, overwrite=True)
    assert sorted(os.listdir(d)) == ["adapter", "adapter.v2.orbax-checkpoint-tmp-14"]
    check(1, others=["adapter.v2.orbax-checkpoint-tmp-14"])


# ----------------------------------------------------------------------------------------
# Metadata decodes only registered types


SENTINEL_CMD = "touch {}"


def _hostile_nodes(sentinel):
    """Nodes that would run a command if a reader built the type a file names."""
    cmd = SENTINEL_CMD.format(sentinel)
    return [
        {"t": "struct", "cls": "os:system", "f": [], "static": {"command": cmd}, "c": []},
        {"t": "struct", "cls": "posix:system", "f": [], "static": {"command": cmd}, "c": []},
        {"t": "struct", "cls": "subprocess:run", "f": [],
         "static": {"args": {"tuple": ["touch", str(sentinel)]}}, "c": []},
        {"t": "struct", "cls": "builtins:exec", "f": [],
         "static": {"source": f"open({str(sentinel)!r}, 'w')"}, "c": []},
        {"t": "namedtuple", "cls": "builtins:eval", "c": []},
        {"t": "namedtuple", "cls": "lora_jax.checkpoint:os.system", "c": []},
    ]


def _edit_json(path, fn):
    with open(path) as fh:
        data = json.load(fh)
    fn(data)
    with open(path, "w") as fh:
        json.dump(data, fh)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """An adapter folder and a Manager step with every item filled in, saved once."""
    root = tmp_path_factory.mktemp("pristine")
    params, lora, tx, opt, state = _train_state()
    C.save_adapter(root / "adapter", lora)
    with C.Manager(root / "steps", async_save=False) as ckpt:
        ckpt.save(1, lora=lora, opt_state=opt, adalora=state, rng=jax.random.key(1))
    return root


def _hostile_dirs(pristine, tmp_path):
    """Fresh copies of the pristine folders to edit."""
    _copy(pristine / "adapter", tmp_path / "adapter")
    _copy(pristine / "steps", tmp_path / "steps")
    return tmp_path / "adapter", tmp_path / "steps"


def _restore(steps):
    with C.Manager(steps) as ckpt:
        return ckpt.restore()


def _read_all(adapter, steps):
    """Every public way of reading the two folders: ``{name: None or the error}``."""
    outcomes = {}
    for name, fn in (("load_adapter", lambda: C.load_adapter(adapter)),
                     ("adapter_info", lambda: C.adapter_info(adapter)),
                     ("load_adapter(step)", lambda: C.load_adapter(steps / "1")),
                     ("adapter_info(step)", lambda: C.adapter_info(steps / "1")),
                     ("restore", lambda: _restore(steps))):
        try:
            fn()
            outcomes[name] = None
        except Exception as e:  # noqa: BLE001 - any error is fine, running code is not
            outcomes[name] = e
    return outcomes


@pytest.mark.parametrize("where", ["adapter/class", "adapter/static", "state/adapter",
                                   "state/opt_state", "state/adalora", "state/nested",
                                   "state/rng"])
def test_metadata_naming_other_types_runs_nothing(pristine, tmp_path, where):
    sentinel = tmp_path / "SENTINEL"
    for n, node in enumerate(_hostile_nodes(sentinel)):
        adapter, steps = _hostile_dirs(pristine, tmp_path / str(n))
        cls = node["cls"]

        def plant_adapter(info):
            leaf = info["leaves"][0]
            if where.endswith("class") or where == "state/adapter":
                leaf["class"] = cls
                leaf["static"] = {**leaf["static"], **node.get("static", {})}
            else:  # a registered class with a field that is not its own
                leaf["static"]["command"] = SENTINEL_CMD.format(sentinel)

        def plant_state(state):
            items = state["items"]
            if where == "state/adapter":
                plant_adapter(state["adapter"])
            elif where == "state/opt_state":
                items["opt_state"]["tree"]["c"][0] = node
            elif where == "state/adalora":
                items["adalora"]["tree"]["cls"] = cls
            elif where == "state/nested":  # deep inside Adam's moments
                mu = items["opt_state"]["tree"]["c"][1]["c"][0]["c"][1]
                mu["c"][0] = node
            elif where == "state/rng":
                items["rng"]["tree"] = {**node, "impl": "os.system"}

        if where.startswith("adapter"):
            _edit_json(adapter / "adapter" / "metadata", plant_adapter)
            refused = ["load_adapter", "adapter_info"]
        else:
            _edit_json(steps / "1" / "state" / "metadata", plant_state)
            refused = ["restore"] + (["load_adapter(step)", "adapter_info(step)"]
                                     if where == "state/adapter" else [])
        outcomes = _read_all(adapter, steps)
        assert not sentinel.exists(), (where, node)
        for name, e in outcomes.items():
            if name not in refused:
                assert e is None, (name, e)  # the other folder is intact
                continue
            assert isinstance(e, C.CheckpointError), (where, node, name, e)
            assert str(adapter if where.startswith("adapter") else steps) in str(e), e
            if where == "adapter/static":
                assert "LoraWeight has no static field 'command'" in str(e), e
            else:
                assert f"names the type {cls!r}, which is not a registered" in str(e), e


def test_orbax_metadata_files_run_nothing(pristine, tmp_path):
    """Orbax's own JSON files, edited to name other code, are never executed either."""
    sentinel = tmp_path / "SENTINEL"
    adapter, steps = _hostile_dirs(pristine, tmp_path)
    files = [p for d in (adapter, steps / "1") for p in d.rglob("*")
             if p.is_file() and p.name in ("_CHECKPOINT_METADATA", "_METADATA")]
    assert len(files) >= 5
    for f in files:
        text = f.read_text()
        text = re.sub(r'"orbax\.checkpoint[\w.]*Handler"', '"os.system"', text)
        text = text.replace('"jax.Array"', '"os:system"')
        text = text.replace('"value_type"', '"category": "namedtuple", "module": "os", '
                            '"clazz": "system", "value_type"')
        f.write_text(text)
    _read_all(adapter, steps)  # whatever Orbax makes of it, it runs nothing
    assert not sentinel.exists()


def test_metadata_fields_are_checked_before_use(pristine, tmp_path):
    """Indexes, dtypes, shapes, key implementations and node kinds from the file."""
    sentinel = tmp_path / "SENTINEL"
    edits = {
        "rng key impl": (lambda st: st["items"]["rng"]["tree"].update(impl="os.system"),
                         r"rng': PRNG key implementation 'os.system'"),
        "py type": (lambda st: st["items"]["rng"].update(tree={"t": "py", "type": "os.system",
                                                                "i": 0}),
                    r"Python scalar type 'os.system'"),
        "index": (lambda st: st["items"]["adalora"]["tree"]["c"][3].update(i=999),
                  r"adalora/budget': array index 999 is not one of the"),
        "negative index": (lambda st: st["items"]["adalora"]["tree"]["c"][3].update(i=-1),
                           r"array index -1 is not one of the"),
        "dtype": (lambda st: st["items"]["rng"]["arrays"][0].update(dtype="object"),
                  r"rng/arrays/0': array dtype 'object' is not a numeric dtype"),
        "shape": (lambda st: st["items"]["rng"]["arrays"][0].update(shape=["2"]),
                  r"array shape \['2'\] is not a list of sizes"),
        "node kind": (lambda st: st["items"]["rng"].update(tree={"t": "pickle", "i": 0}),
                      r"unknown node type 'pickle'"),
        "item name": (lambda st: st["items"].update(evil={"tree": {"t": "none"}, "arrays": []}),
                      r"'items': expected a subset of"),
        "adapter dtype": (lambda st: st["adapter"]["leaves"][0]["arrays"]["p"].update(
            dtype="O"), r"leaves/0/arrays/p': array dtype 'O' is not a numeric dtype"),
        "alpha": (lambda st: st["adapter"]["leaves"][0]["static"].update(alpha="nan"),
                  r"alpha must be a number, got 'nan'"),
        "rank": (lambda st: st["adapter"]["leaves"][0]["arrays"]["q"].update(shape=[5, 32]),
                 r"the factors do not chain: a \(32, 6\) has rank 6 .* b \(5, 32\) has "
                 r"rank 5"),
    }
    for n, (name, (edit, match)) in enumerate(edits.items()):
        _, steps = _hostile_dirs(pristine, tmp_path / str(n))
        _edit_json(steps / "1" / "state" / "metadata", edit)
        with pytest.raises(C.CheckpointError, match=match):
            _restore(steps)
        assert not sentinel.exists(), name
    # An unknown kind of pytree node is rebuilt as {path: array}, never as its class.
    _, steps = _hostile_dirs(pristine, tmp_path / "opaque")
    _edit_json(steps / "1" / "state" / "metadata", lambda st: st["items"].update(
        rng={"tree": {"t": "opaque", "cls": "os:system", "paths": ["x"], "i": [0]},
             "arrays": st["items"]["rng"]["arrays"]}))
    assert set(_restore(steps).rng) == {"x"}


def test_registered_types_round_trip_and_unregistered_ones_are_refused_at_save(tmp_path):
    from typing import NamedTuple

    class Counter(NamedTuple):  # defined here: not importable, not registered
        count: jax.Array
        scale: jax.Array

    params = _params(d=8)
    lora = _lora(params)
    opt = (Counter(jnp.asarray(3), jnp.asarray(0.5)), optax.sgd(0.1).init(lora))
    with C.Manager(tmp_path, async_save=False) as ckpt:
        with pytest.raises(TypeError, match=r"opt_state/0 is a .*Counter, a type checkpoints "
                                            r"do not know: call lora_jax.checkpoint.register"):
            ckpt.save(1, lora=lora, opt_state=opt)
        assert ckpt.steps == []  # nothing was written
        C.register(Counter)
        assert ckpt.save(1, lora=lora, opt_state=opt)
        back = ckpt.restore(1).opt_state
        assert type(back[0]) is Counter and int(back[0].count) == 3
    with pytest.raises(TypeError, match="expected a NamedTuple or dataclass type"):
        C.register(dict)
    with pytest.raises(ValueError, match="already stands for"):
        C.register(Config, name=C.codec._cls_name(Counter))


def test_a_new_static_field_needs_no_codec_change_and_old_files_still_load(tmp_path):
    from flax import struct

    @struct.dataclass
    class LayoutLora(lora_jax.LoraWeight):  # a leaf kind with one more static field
        tag: str = struct.field(pytree_node=False, default="io")

    C.register(LayoutLora)
    params = _params(d=8)
    plain = lora_jax.lora.leaves(_lora(params))
    lora = lora_jax.lora.from_leaves({p: LayoutLora(**{f.name: getattr(x, f.name) for f in
                                                       dataclasses.fields(x)}, tag="oio")
                                      for p, x in plain.items()})
    C.save_adapter(tmp_path / "a", lora)
    back = C.load_adapter(tmp_path / "a")
    _assert_same(back, lora)
    assert {x.tag for x in lora_jax.lora.leaves(back).values()} == {"oio"}

    def drop_tag(info):  # as written before the field existed
        for e in info["leaves"]:
            del e["static"]["tag"]

    _edit_json(tmp_path / "a" / "adapter" / "metadata", drop_tag)
    old = lora_jax.lora.leaves(C.load_adapter(tmp_path / "a"))
    assert {x.tag for x in old.values()} == {"io"}  # the default
    _assert_same({p: x.a for p, x in old.items()}, {p: x.a for p, x in plain.items()})

    # A plain LoraWeight checkpoint from before a field existed loads with the defaults.
    C.save_adapter(tmp_path / "b", _lora(params))
    _edit_json(tmp_path / "b" / "adapter" / "metadata",
               lambda info: [e["static"].pop("dropout") for e in info["leaves"]])
    assert {x.dropout for x in lora_jax.lora.leaves(C.load_adapter(tmp_path / "b")).values()} \
        == {0.0}


# ----------------------------------------------------------------------------------------
# Manager.save never skips silently


def test_manager_save_of_an_existing_or_older_step_raises_and_writes_nothing(tmp_path):
    params = _params(d=8)
    with C.Manager(tmp_path, async_save=True) as ckpt:
        for step in (1, 2):
            ckpt.save(step, lora=_lora(params, step))
        with pytest.raises(C.StepExistsError, match=r"step 2 already exists in .* \(steps "
                                                    r"\[1, 2\]\); nothing was written.*"
                                                    r"on_existing='overwrite'"):
            ckpt.save(2, lora=_lora(params, 7))
        with pytest.raises(C.StepExistsError, match="step 0 is not above the latest step 2"):
            ckpt.save(0, lora=_lora(params, 7))
        ckpt.wait()
        assert ckpt.steps == [1, 2]
        _assert_same(ckpt.restore().lora, _lora(params, 2))


@pytest.mark.parametrize("async_save", [False, True])
def test_resume_after_restore_overwrites_the_abandoned_steps(tmp_path, async_save):
    params = _params(d=8)
    with C.Manager(tmp_path, async_save=async_save) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, lora=_lora(params, step), meta={"run": "first"})
    # Without the policy, resuming from step 1 stops at the first save, saying what to do.
    with C.Manager(tmp_path, async_save=async_save) as ckpt:
        r = ckpt.restore(1)
        with pytest.raises(C.StepExistsError, match="on_existing='overwrite'"):
            ckpt.save(2, lora=r.lora)
        assert ckpt.restore().meta == {"run": "first"}
    # With it: restore(1), train on, save(2) and save(3); restore() gives the new step 3.
    with C.Manager(tmp_path, async_save=async_save, on_existing="overwrite",
                   max_to_keep=None) as ckpt:
        r = ckpt.restore(1)
        _assert_same(r.lora, _lora(params, 1))
        for step in (2, 3):
            lora = _lora(params, 10 + step)  # "training"
            assert ckpt.save(step, lora=lora, meta={"run": "second"})
        got = ckpt.restore()
        assert got.step == 3 and got.meta == {"run": "second"}
        _assert_same(got.lora, _lora(params, 13))
        _assert_same(ckpt.restore(2).lora, _lora(params, 12))
        _assert_same(ckpt.restore(1).lora, _lora(params, 1))
        assert ckpt.steps == [1, 2, 3]
        # Saving the latest step again replaces it.
        ckpt.save(3, lora=_lora(params, 99))
        _assert_same(ckpt.restore().lora, _lora(params, 99))
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3", "_deleted"]


def test_interval_skips_are_the_only_false_returns(tmp_path):
    params = _params(d=8)
    lora = _lora(params)
    with C.Manager(tmp_path, async_save=False, save_interval_steps=2) as ckpt:
        assert [ckpt.save(s, lora=lora) for s in (1, 2, 3, 4)] == [True, True, False, True]
        assert ckpt.save(5, lora=lora, force=True)
        assert ckpt.steps == [2, 4, 5]  # max_to_keep=3


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
    elif sys.argv[1] == "overwrite":
        _overwrite_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "loop":
        _loop_worker(sys.argv[2])
    elif sys.argv[1] == "reshard":
        _reshard_worker(sys.argv[2], sys.argv[3])
