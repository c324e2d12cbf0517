"""Faults at scale: one writer per checkpoint path, storage errors in words, failures on one
process of a multi-process program raised on every process instead of a hang, saving on
SIGTERM, resuming after a process is killed mid-save, and GGUF tensors read by rows.

Child processes (``python tests/test_checkpoint_faults.py <mode> ...``) play the second
writer, the process under a file-size limit or without write permission, and the two
processes of a 2 x 4-CPU-device program; each runs under a hard time limit, so a hang fails
the test instead of blocking it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CHILD_TIMEOUT_S = 240


def _adapter(seed: int):
    """A small LoRA tree whose every factor is random and depends on ``seed``."""
    import jax
    import jax.numpy as jnp

    import lora_jax

    params = {"a": {"kernel": jnp.zeros((16, 8))}, "b": {"kernel": jnp.zeros((8, 12))}}
    lora = lora_jax.init(params, r=2, key=jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), lora)


def _values(lora) -> list[np.ndarray]:
    import jax

    return [np.asarray(x, np.float64) for x in jax.tree.leaves(lora)]


def _same(a, b) -> bool:
    va, vb = _values(a), _values(b)
    return len(va) == len(vb) and all(x.shape == y.shape and np.array_equal(x, y)
                                      for x, y in zip(va, vb))


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    return env


def _child(*args: str, timeout: float = CHILD_TIMEOUT_S, **popen) -> dict:
    """Runs ``python this_file *args``; returns the JSON it prints last."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=_env(),
                          capture_output=True, text=True, timeout=timeout, **popen)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _lock_of(holder: dict) -> dict:
    from lora_jax.checkpoint import lock

    me = lock._me()
    return {**me, **holder}


def _write_lock(path: str, holder: dict) -> None:
    with open(path, "w") as fh:
        json.dump(holder, fh)


# ----------------------------------------------------------------------------------------
# One writer at a time


def child_writer(path: str, seed: str, rounds: str, out: str) -> None:
    """Saves the adapter of ``seed`` over ``path`` ``rounds`` times; after each save, loads
    the path and records which of the two adapters (seeds 1 and 2) it holds."""
    from lora_jax import checkpoint

    mine, ref = _adapter(int(seed)), {1: _adapter(1), 2: _adapter(2)}
    seen = []
    for _ in range(int(rounds)):
        checkpoint.save_adapter(path, mine, overwrite=True, wait=120)
        back = checkpoint.load_adapter(path)
        seen.append([k for k, v in ref.items() if _same(back, v)] or ["mixed"])
    with open(out, "w") as fh:
        json.dump(seen, fh)


def test_two_writers_of_one_path_never_collide(tmp_path):
    path = str(tmp_path / "shared")
    outs = [str(tmp_path / f"writer{i}.json") for i in (1, 2)]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "writer", path,
                               str(i), "20", outs[i - 1]], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in (1, 2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=CHILD_TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(x[-3000:] for x in logs)
    for out in outs:
        with open(out) as fh:
            seen = json.load(fh)
        assert len(seen) == 20 and all(s in ([1], [2]) for s in seen), seen
    from lora_jax import checkpoint

    final = checkpoint.load_adapter(path)
    assert _same(final, _adapter(1)) or _same(final, _adapter(2))
    assert sorted(os.listdir(tmp_path)) == sorted(["shared", "writer1.json", "writer2.json"])


def test_a_lock_of_a_dead_local_process_is_broken(tmp_path):
    from lora_jax import checkpoint
    from lora_jax.checkpoint import lock

    path = str(tmp_path / "adapter")
    checkpoint.save_adapter(path, _adapter(1))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid is free now
    _write_lock(path + ".lock", _lock_of({"pid": gone.pid, "start": 1}))
    checkpoint.save_adapter(path, _adapter(2), overwrite=True)
    assert _same(checkpoint.load_adapter(path), _adapter(2))
    assert not os.path.exists(path + ".lock")
    # A reused pid: this very process, but the lock says it started at another time.
    start = lock.process_start(os.getpid())
    assert start is not None
    _write_lock(path + ".lock", _lock_of({"pid": os.getpid(), "start": start - 7}))
    checkpoint.save_adapter(path, _adapter(3), overwrite=True)
    assert _same(checkpoint.load_adapter(path), _adapter(3))
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_a_live_writer_is_waited_for_and_never_broken(tmp_path):
    import threading

    from lora_jax import checkpoint

    path = str(tmp_path / "adapter")
    checkpoint.save_adapter(path, _adapter(1))
    holder = _lock_of({})  # this process: alive, its start time right
    _write_lock(path + ".lock", holder)
    with pytest.raises(checkpoint.CheckpointBusyError) as e:
        checkpoint.save_adapter(path, _adapter(2), overwrite=True, wait=0.3)
    msg = str(e.value)
    assert path in msg and f"pid {os.getpid()}" in msg and socket.gethostname() in msg, msg
    with open(path + ".lock") as fh:
        assert json.load(fh) == holder  # untouched
    assert _same(checkpoint.load_adapter(path), _adapter(1))
    # A reader leaves the live writer's files alone (here: an unfinished Orbax folder).
    debris = path + ".incoming-00000000000000000001-0123abcd.orbax-checkpoint-tmp-5"
    os.makedirs(debris)
    assert _same(checkpoint.load_adapter(path), _adapter(1))
    assert os.path.isdir(debris)
    # The holder finishes: a waiting writer goes on.
    threading.Timer(0.5, lambda: os.unlink(path + ".lock")).start()
    checkpoint.save_adapter(path, _adapter(2), overwrite=True, wait=60)
    assert _same(checkpoint.load_adapter(path), _adapter(2))
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # the leftovers went with the lock


def test_a_lock_of_another_host_is_never_broken(tmp_path):
    from lora_jax import checkpoint

    path = str(tmp_path / "adapter")
    checkpoint.save_adapter(path, _adapter(1))
    holder = _lock_of({"host": "trainer-other-host-7", "pid": 1})
    _write_lock(path + ".lock", holder)
    with pytest.raises(checkpoint.CheckpointBusyError) as e:
        checkpoint.save_adapter(path, _adapter(2), overwrite=True)
    msg = str(e.value)
    assert "trainer-other-host-7" in msg and "by hand" in msg and path + ".lock" in msg, msg
    with open(path + ".lock") as fh:
        assert json.load(fh) == holder
    assert _same(checkpoint.load_adapter(path), _adapter(1))
    # A Manager directory's lock likewise.
    run = tmp_path / "run"
    os.makedirs(run)
    _write_lock(str(run / ".lock"), holder)
    with checkpoint.Manager(run, async_save=False) as mngr:
        with pytest.raises(checkpoint.CheckpointBusyError, match="trainer-other-host-7"):
            mngr.save(1, lora=_adapter(1))
        assert mngr.steps == []


def test_a_manager_holds_its_lock_until_its_saves_are_on_disk(tmp_path):
    from lora_jax import checkpoint

    with checkpoint.Manager(tmp_path / "run") as first, \
            checkpoint.Manager(tmp_path / "run") as second:
        first.save(1, lora=_adapter(1))  # asynchronous: held until first.wait()
        with pytest.raises(checkpoint.CheckpointBusyError, match="run"):
            second.save(2, lora=_adapter(2))
        first.wait()  # done: the lock is free
        second.save(2, lora=_adapter(2))  # sees step 1, which was written after it opened
        with pytest.raises(checkpoint.CheckpointBusyError):
            first.save(3, lora=_adapter(3))
        second.wait()
        assert second.steps == [1, 2]
        assert _same(second.restore(1).lora, _adapter(1))
        assert _same(second.restore(2).lora, _adapter(2))
    assert not os.path.exists(tmp_path / "run" / ".lock")


def child_no_write(path: str, run: str) -> None:
    """Tries to save over ``path`` and into the Manager ``run``; prints the errors."""
    from lora_jax import checkpoint

    out = {}
    try:
        checkpoint.save_adapter(path, _adapter(2), overwrite=True)
    except checkpoint.CheckpointError as e:
        out["adapter"] = [type(e).__name__, str(e)]
    try:
        with checkpoint.Manager(run, async_save=False) as mngr:
            mngr.save(2, lora=_adapter(2))
    except checkpoint.CheckpointError as e:
        out["manager"] = [type(e).__name__, str(e)]
    print(json.dumps(out))


def _without_root_powers() -> list[str]:
    """A command prefix under which root, too, obeys permission bits (no CAP_DAC_OVERRIDE)."""
    if os.getuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: permission bits cannot be enforced")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


def test_no_write_permission_is_a_clear_error(tmp_path):
    from lora_jax import checkpoint

    path, run = str(tmp_path / "adapter"), str(tmp_path / "run")
    checkpoint.save_adapter(path, _adapter(1))
    with checkpoint.Manager(run, async_save=False) as mngr:
        mngr.save(1, lora=_adapter(1))
    for d in (tmp_path, run):
        os.chmod(d, 0o555)
    try:
        proc = subprocess.run([*_without_root_powers(), sys.executable,
                               os.path.abspath(__file__), "no_write", path, run], env=_env(),
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    finally:
        for d in (tmp_path, run):
            os.chmod(d, 0o755)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for item, lock_path in (("adapter", path + ".lock"), ("manager", run + "/.lock")):
        kind, msg = got[item]
        assert kind == "CheckpointStorageError", got
        assert lock_path in msg and "permission denied" in msg.lower() and \
            "Nothing was written" in msg, msg
    assert _same(checkpoint.load_adapter(path), _adapter(1))
    with checkpoint.Manager(run) as mngr:
        assert mngr.steps == [1] and _same(mngr.restore().lora, _adapter(1))
    assert sorted(os.listdir(tmp_path)) == ["adapter", "run"]


# ----------------------------------------------------------------------------------------
# Storage errors in words


def child_file_limit(path: str, run: str) -> None:
    """Saves over ``path`` and into ``run`` under a 2 kB file-size limit; prints the errors."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    from lora_jax import checkpoint

    big = _adapter_big(2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.RLIM_INFINITY))
    out = {}
    try:
        checkpoint.save_adapter(path, big, overwrite=True)
    except checkpoint.CheckpointError as e:
        out["adapter"] = [type(e).__name__, str(e)]
    mngr = checkpoint.Manager(run)  # asynchronous: the failure shows in wait()
    try:
        mngr.save(2, lora=big)
        mngr.wait()
    except checkpoint.CheckpointError as e:
        out["manager"] = [type(e).__name__, str(e)]
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    mngr.close()
    print(json.dumps(out))


def _adapter_big(seed: int):
    """An adapter whose arrays take more than 2 kB in a file."""
    import jax
    import jax.numpy as jnp

    import lora_jax

    lora = lora_jax.init({"w": {"kernel": jnp.zeros((128, 128))}}, r=8, key=jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), lora)


def test_a_file_size_limit_is_reported_and_the_previous_checkpoint_kept(tmp_path):
    from lora_jax import checkpoint

    path, run = str(tmp_path / "adapter"), str(tmp_path / "run")
    checkpoint.save_adapter(path, _adapter_big(1))
    with checkpoint.Manager(run, async_save=False) as mngr:
        mngr.save(1, lora=_adapter_big(1))
    got = _child("file_limit", path, run)
    for item, previous in (("adapter", f"the previous adapter at {path} is intact"),
                           ("manager", "the latest complete step 1 is intact")):
        kind, msg = got[item]
        assert kind == "CheckpointStorageError", got
        assert "file-size limit" in msg and "EFBIG" in msg and previous in msg, msg
        assert "OUT_OF_RANGE" in msg  # what Orbax said, kept at the end
    assert _same(checkpoint.load_adapter(path), _adapter_big(1))
    assert sorted(os.listdir(tmp_path)) == ["adapter", "run"]  # partial files removed
    with checkpoint.Manager(run) as mngr:
        assert mngr.steps == [1] and _same(mngr.restore().lora, _adapter_big(1))
    assert sorted(os.listdir(run)) == ["1"]


@pytest.mark.parametrize("orbax_says, words, code", [
    ("RESOURCE_EXHAUSTED: Error writing local file \"/d/x/0.0\": No space left on device "
     "[os_error_code='28']", "the disk is full", "ENOSPC"),
    ("UNKNOWN: Failed writing: \"/d/x/0.0\": Disk quota exceeded", "quota", "EDQUOT"),
    ("PERMISSION_DENIED: Failed to open \"/d/x/0.0\"", "permission denied", "EACCES"),
    ("INTERNAL: Failed writing: \"/d/x/0.0\": Read-only file system", "read-only", "EROFS"),
])
def test_storage_errors_say_what_was_hit(tmp_path, monkeypatch, orbax_says, words, code):
    from lora_jax import checkpoint
    from lora_jax.checkpoint import storage

    path = str(tmp_path / "adapter")
    checkpoint.save_adapter(path, _adapter(1))
    import orbax.checkpoint as ocp

    real_save = ocp.Checkpointer.save

    def failing_save(self, directory, *args, **kwargs):
        os.makedirs(str(directory) + ".orbax-checkpoint-tmp-3")  # what a killed write leaves
        raise ValueError(orbax_says)

    monkeypatch.setattr(ocp.Checkpointer, "save", failing_save)
    with pytest.raises(checkpoint.CheckpointStorageError) as e:
        checkpoint.save_adapter(path, _adapter(2), overwrite=True)
    msg = str(e.value)
    assert words in msg and code in msg and "/d/x/0.0" in msg, msg
    assert f"the previous adapter at {path} is intact" in msg, msg
    monkeypatch.setattr(ocp.Checkpointer, "save", real_save)
    assert _same(checkpoint.load_adapter(path), _adapter(1))
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    # An OSError of Python's own (e.g. the JSON item) is read the same way.
    assert storage.storage_failure(OSError(errno.ENOSPC, "x", "/d/f")) == (errno.ENOSPC, "/d/f")
    assert storage.storage_failure(ValueError("shape mismatch")) is None


def test_a_damaged_previous_adapter_is_not_called_intact(tmp_path, monkeypatch):
    from lora_jax import checkpoint

    path = str(tmp_path / "adapter")
    checkpoint.save_adapter(path, _adapter(1))
    for root, _, names in os.walk(os.path.join(path, "arrays")):
        for name in names:
            if root.endswith("/d"):  # the array data
                with open(os.path.join(root, name), "r+b") as fh:
                    fh.truncate(8)
    import orbax.checkpoint as ocp

    def failing_save(self, directory, *args, **kwargs):
        raise ValueError("OUT_OF_RANGE: Failed writing: \"/d/x\": File too large")

    monkeypatch.setattr(ocp.Checkpointer, "save", failing_save)
    with pytest.raises(checkpoint.CheckpointStorageError) as e:
        checkpoint.save_adapter(path, _adapter(2), overwrite=True)
    assert "could not be read again" in str(e.value) and "intact" not in str(e.value)


def _truncate_data(directory: str) -> int:
    """Truncates every array data file (``.../d/*``) under ``directory``; returns how many."""
    count = 0
    for root, _, names in os.walk(directory):
        for name in names:
            if os.path.basename(root) == "d":
                with open(os.path.join(root, name), "r+b") as fh:
                    fh.truncate(8)
                count += 1
    return count


def _failing_orbax_save(mngr, error: Exception, before=None):
    """Makes the Orbax save of ``mngr`` raise ``error`` (after ``before()``)."""
    def save(*args, **kwargs):
        if before is not None:
            before()
        raise error

    mngr._mngr.save = save


def test_a_damaged_optimizer_state_of_the_latest_step_is_not_called_intact(tmp_path):
    import optax

    from lora_jax import checkpoint

    run = str(tmp_path / "run")
    lora = _adapter(1)
    opt = optax.adam(1e-2).init(lora)
    with checkpoint.Manager(run, async_save=False) as mngr:
        mngr.save(1, lora=lora, opt_state=opt)
    assert _truncate_data(os.path.join(run, "1", "opt_state")) > 0  # the adapter is whole
    with checkpoint.Manager(run, async_save=False) as mngr:
        _failing_orbax_save(mngr, ValueError('OUT_OF_RANGE: Failed writing: "/d/x": File too '
                                             'large'))
        with pytest.raises(checkpoint.CheckpointStorageError) as e:
            mngr.save(2, lora=lora, opt_state=opt)
    msg = str(e.value)
    assert "file-size limit" in msg and "step 1 could not be read again" in msg, msg
    assert "is intact" not in msg, msg


def test_a_missing_or_blocked_directory_is_a_clear_error(tmp_path):
    from lora_jax import checkpoint

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for make in (lambda p: checkpoint.Manager(p),
                 lambda p: checkpoint.save_adapter(p, _adapter(1))):
        with pytest.raises(NotADirectoryError) as e:
            make(str(blocker / "sub" / "run"))
        assert f"{blocker} is a file, not a directory" in str(e.value), str(e.value)
    # The parent of a Manager's directory is moved away between two saves: Orbax would
    # create an empty directory again and list steps that are gone.
    run = tmp_path / "parent" / "run"
    mngr = checkpoint.Manager(run)
    mngr.save(1, lora=_adapter(1))
    mngr.wait()
    os.rename(tmp_path / "parent", tmp_path / "moved")
    with pytest.raises(checkpoint.CheckpointStorageError) as e:
        mngr.save(2, lora=_adapter(2))
    msg = str(e.value)
    assert f"{run} was removed or moved" in msg and "[1]" in msg, msg
    assert not os.path.exists(tmp_path / "parent")  # nothing was created again
    mngr.close()
    # ... or replaced by a new, empty one.
    run = tmp_path / "replaced"
    with checkpoint.Manager(run, async_save=False) as mngr:
        mngr.save(1, lora=_adapter(1))
        os.rename(run, tmp_path / "old")
        os.mkdir(run)
        with pytest.raises(checkpoint.CheckpointStorageError,
                           match="and a new one is in its place"):
            mngr.save(2, lora=_adapter(2))
    assert os.listdir(run) == []
    # ... or while a step is being written (the writers' error is about the missing files).
    run = tmp_path / "parent2" / "run"
    with checkpoint.Manager(run, async_save=False) as mngr:
        mngr.save(1, lora=_adapter(1))
        missing = str(run / "2.orbax-checkpoint-tmp" / "lora")
        _failing_orbax_save(mngr, FileNotFoundError(errno.ENOENT, "No such file or directory",
                                                    missing),
                            before=lambda: os.rename(tmp_path / "parent2",
                                                     tmp_path / "moved2"))
        with pytest.raises(checkpoint.CheckpointStorageError) as e:
            mngr.save(2, lora=_adapter(2))
    msg = str(e.value)
    assert f"{run} was removed or moved" in msg and "[1]" in msg and missing in msg, msg
    with checkpoint.Manager(tmp_path / "moved2" / "run") as mngr:
        assert mngr.steps == [1] and _same(mngr.restore().lora, _adapter(1))


# ----------------------------------------------------------------------------------------
# Preemption: SIGTERM saves the current step, the restarted job resumes from it


def child_train(run: str, total: str) -> None:
    """A training loop (Adam on a fixed quadratic) over a Manager, saving every 5 steps and
    on SIGTERM; resumes from the latest step. Prints its steps, then a JSON line."""
    import jax
    import jax.numpy as jnp
    import optax

    from lora_jax import checkpoint

    lora0 = _adapter(5)
    targets = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=x.dtype).reshape(
        x.shape)), lora0)
    tx = optax.adam(1e-2)

    @jax.jit
    def train_step(lora, opt):
        grads = jax.grad(lambda lo: sum(jnp.sum((a - b) ** 2) for a, b in zip(
            jax.tree.leaves(lo), jax.tree.leaves(targets))))(lora)
        updates, opt = tx.update(grads, opt, lora)
        return optax.apply_updates(lora, updates), opt

    with checkpoint.Manager(run, max_to_keep=2, wait=60) as mngr, \
            checkpoint.StopOnSignal() as stop:
        if mngr.steps:
            state = mngr.restore(like=lora0, opt_state=jax.eval_shape(tx.init, lora0))
            lora, opt, start = state.lora, state.opt_state, state.step + 1
        else:
            lora, opt, start = lora0, tx.init(lora0), 0
        print("start", start, flush=True)
        for step in range(start, int(total)):
            lora, opt = train_step(lora, opt)
            print("step", step, flush=True)
            time.sleep(0.05)
            preempted = stop.reached(step)
            if preempted or step % 5 == 4 or step == int(total) - 1:
                mngr.save(step, lora=lora, opt_state=opt)
            if preempted:
                mngr.wait()
                print(json.dumps({"stopped_at": step, "start": start}))
                return
    print(json.dumps({"finished": int(total) - 1, "start": start}))


def test_sigterm_saves_the_current_step_and_the_restart_resumes_there(tmp_path):
    from lora_jax import checkpoint

    run, ref = str(tmp_path / "run"), str(tmp_path / "ref")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "train", run, "40"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    try:
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "".join(lines[-40:])
            lines.append(line)
            if line.startswith("step 7"):
                proc.send_signal(signal.SIGTERM)
                break
        lines += proc.communicate(timeout=CHILD_TIMEOUT_S)[0].splitlines(keepends=True)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(lines[-40:])
    stopped = json.loads(lines[-1])["stopped_at"]
    assert 7 <= stopped < 39 and stopped % 5 != 4, lines[-5:]  # a step between two saves
    with checkpoint.Manager(run) as mngr:
        assert mngr.latest_step() == stopped
    resumed = _child("train", run, "40")
    assert resumed == {"finished": 39, "start": stopped + 1}
    child_train(ref, "40")  # never interrupted, here
    with checkpoint.Manager(run) as a, checkpoint.Manager(ref) as b:
        got, want = a.restore(39), b.restore(39)
    assert max(np.max(np.abs(x - y)) for x, y in zip(_values(got.lora), _values(want.lora))) \
        <= 1e-6
    assert max(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
               for x, y in zip(jax_leaves(got.opt_state), jax_leaves(want.opt_state))) <= 1e-6


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


# ----------------------------------------------------------------------------------------
# GGUF read by rows: a process decodes only the blocks of the rows it holds


def _tiny_gguf(path: str):
    """A tiny llama GGUF (block formats for the matrices, q/k in llama.cpp's row order);
    returns its config."""
    import gguf
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    sys.path.insert(0, HERE)
    import test_llama as TL

    cfg = TL.TINY
    weights = TL.to_gguf_names(TL.random_variables(cfg, 3), cfg)
    kinds = {"token_embd": T.Q8_0, "attn_q": T.Q4_1, "attn_k": T.Q5_0, "attn_v": T.Q8_0,
             "attn_output": T.Q4_0, "ffn_gate": T.Q5_1, "ffn_up": T.F16, "ffn_down": T.Q8_0}
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg.layers)
    w.add_context_length(cfg.max_len)
    w.add_embedding_length(cfg.d)
    w.add_feed_forward_length(cfg.ffn)
    w.add_head_count(cfg.heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_vocab_size(cfg.vocab)
    for name, x in weights.items():
        kind = next((k for part, k in kinds.items() if f"{part}." in name), T.F32)
        w.add_tensor(name, quantize(x, kind) if kind != T.F32 else x, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return cfg


def test_gguf_rows_decode_only_the_rows_asked_for(tmp_path):
    pytest.importorskip("gguf")
    from lora_jax.models import gguf as G

    path = str(tmp_path / "tiny.gguf")
    cfg = _tiny_gguf(path)
    f = G.read(path)
    for name, heads in (("blk.0.attn_q.weight", cfg.heads), ("blk.1.attn_k.weight",
                                                               cfg.kv_heads),
                        ("token_embd.weight", None), ("blk.0.ffn_up.weight", None)):
        kind, shape, raw = f.tensors[name]
        whole = f.tensor(name)
        if heads is not None:
            whole = G.unpermute_qk(whole, heads)
        source = G.TensorRows(f, name, shape, heads)
        before = f.bytes_read
        index = (slice(3, 17), slice(5, 40))
        np.testing.assert_array_equal(source.read(index), whole[index], err_msg=name)
        assert f.bytes_read - before == 14 * raw.nbytes // shape[0], name  # 14 rows' blocks
    norm = G.TensorRows(f, "output_norm.weight", (cfg.d,))
    np.testing.assert_array_equal(norm.read((slice(2, 9),)), f.tensor("output_norm.weight")[2:9])


# ----------------------------------------------------------------------------------------
# Multi-process: a failure on one process fails every process, in seconds


def worker(process_id: int, port: int, tmp: str, out: str) -> None:
    """One of two processes (4 CPU devices each); runs each fault and records the error."""
    import jax

    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=120)
    import resource

    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import PartitionSpec

    import lora_jax
    from lora_jax import checkpoint
    from lora_jax import sharding as S
    from lora_jax.models import streaming, tensor_files

    mesh = S.mesh((2, 4), ("data", "model"))  # rows of the mesh: one process each
    report: dict = {}

    # 0. A GGUF onto the mesh: each process reads only the rows (whole blocks) it holds.
    from lora_jax.models import gguf as G

    gguf_path = os.path.join(tmp, "tiny.gguf")
    if process_id == 0:
        _tiny_gguf(gguf_path)
    multihost_utils.sync_global_devices("gguf written")
    every = tuple(mesh.axis_names)

    def by_rows(tree):  # a kernel's GGUF rows are its output axis; an embedding's, its rows
        return {k: by_rows(v) if isinstance(v, dict) else
                PartitionSpec(None, every) if k == "kernel" else
                PartitionSpec(every, None) if k == "embedding" else PartitionSpec()
                for k, v in tree.items()}

    reference = G.read(gguf_path)
    _, dense = G.load_llama(reference)
    for name, quantize in (("dense", None), ("nf4", "nf4")):
        mine = G.read(gguf_path)
        _, got = G.load_llama(mine, quantize=quantize, mesh=mesh, specs=by_rows)
        same = True
        if quantize is None:
            same = all(np.array_equal(multihost_utils.process_allgather(a, tiled=True),
                                      np.asarray(b))
                       for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(dense)))
        report[f"gguf_{name}"] = {"bytes_read": mine.bytes_read,
                                  "total": reference.bytes_read, "equal": same}

    def record(name, fn):
        t0 = time.monotonic()
        try:
            fn()
            report[name] = {"error": None}
        except Exception as e:  # noqa: BLE001 - the test compares them
            report[name] = {"error": type(e).__name__, "message": str(e)}
        report[name]["seconds"] = time.monotonic() - t0
        multihost_utils.sync_global_devices(name)

    # 1. A NaN in the half of a weight only process 1 holds, quantized while loaded (double
    # quantization then gathers every process' scales).
    w = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
    w[255, 63] = np.nan  # the last block in storage order
    abstract = {"x": {"kernel": jax.ShapeDtypeStruct((256, 64), jnp.float32)}}
    record("nan_in_one_shard", lambda: streaming.load(
        abstract, {"x/kernel": streaming.Array(w)}, quantize="nf4", mesh=mesh,
        specs={"x/kernel": PartitionSpec("data", None)}))

    # 2. A tensor file that process 1 sees truncated (a shared filesystem behind).
    good = np.random.default_rng(1).standard_normal((256, 64)).astype(np.float32)
    file = os.path.join(tmp, "model.safetensors")
    if process_id == 0:
        tensor_files.write(file, {"d": good, "q": good})
        with open(file, "rb") as fh:
            data = fh.read()
        with open(file + ".truncated", "wb") as fh:
            fh.write(data[:-4096])
    multihost_utils.sync_global_devices("written")
    abstract2 = {"d": {"kernel": jax.ShapeDtypeStruct((256, 64), jnp.float32)},
                 "q": {"kernel": jax.ShapeDtypeStruct((256, 64), jnp.float32)}}

    def load_truncated():  # the header's sizes disagree with the file: found when it opens
        files = streaming.open_files([file + ".truncated" if process_id else file])
        return streaming.load(
            abstract2, {"d/kernel": streaming.FileTensor(files, "q"),
                        "q/kernel": streaming.FileTensor(files, "d")},
            quantize={"format": "nf4", "targets": "d/kernel"}, mesh=mesh,
            specs={"d/kernel": PartitionSpec("data", None), "q/kernel": PartitionSpec("data")})

    record("truncated_file_on_one_process", load_truncated)

    # 3. A write that fails on process 1 only (a file-size limit there), over a saved adapter.
    params = {"w": {"kernel": jnp.zeros((256, 64))}}
    lora = lora_jax.init(params, r=8, key=jax.random.key(0))
    rng = np.random.default_rng(2)
    lora = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), lora)
    specs = S.specs(lora, {"w/kernel": PartitionSpec("data", None)}, mesh=mesh)
    sharded = jax.device_put(lora, S.named(mesh, specs))
    path = os.path.join(tmp, "adapter")
    checkpoint.save_adapter(path, sharded)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if process_id == 1:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
    twice = jax.tree.map(lambda x: 2 * x, sharded)
    record("failed_write_on_one_process", lambda: checkpoint.save_adapter(
        path, twice, overwrite=True))
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    back = checkpoint.load_adapter(path, mesh=mesh, specs=specs)
    report["previous_adapter_kept"] = all(
        np.array_equal(multihost_utils.process_allgather(a, tiled=True),
                       multihost_utils.process_allgather(b, tiled=True))
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(sharded)))

    # 4. A Manager step whose array file process 1 sees truncated, restored on the mesh.
    import shutil as sh

    run, damaged = os.path.join(tmp, "run"), os.path.join(tmp, "run_damaged")
    with checkpoint.Manager(run) as mngr:
        mngr.save(1, lora=sharded)
    if process_id == 0:
        sh.copytree(run, damaged)
        for root, _, names in os.walk(os.path.join(damaged, "1", "lora")):
            for name in names:
                if os.path.basename(root) == "d":  # the array data
                    with open(os.path.join(root, name), "r+b") as fh:
                        fh.truncate(16)
    multihost_utils.sync_global_devices("damaged")

    def restore():
        with checkpoint.Manager(damaged if process_id else run) as mngr:
            mngr.restore(mesh=mesh, specs=specs)

    record("truncated_step_on_one_process", restore)

    # 5. The path is locked (by another host): only process 0 looks, every process raises.
    if process_id == 0:
        _write_lock(path + ".lock", _lock_of({"host": "trainer-other-host-7", "pid": 1}))
    multihost_utils.sync_global_devices("locked")
    record("locked_path", lambda: checkpoint.save_adapter(path, twice, overwrite=True))

    # 6. An asynchronous Manager.save whose write fails on process 1 only (a file-size limit
    # there): both raise the same error, none waits at Orbax's barriers; step 1 restores.
    import optax

    opt = optax.adam(1e-2).init(lora)
    opt = jax.tree.map(lambda x: x + jnp.asarray(rng.standard_normal(x.shape), x.dtype)
                       if jnp.issubdtype(x.dtype, jnp.floating) else x + 3, opt)
    opt = jax.device_put(opt, S.named(mesh, S.state_specs(opt, specs)))
    run2 = os.path.join(tmp, "run_async")
    mngr = checkpoint.Manager(run2)
    mngr.save(1, lora=sharded, opt_state=opt)
    mngr.wait()
    if process_id == 1:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))

    def save_async():
        mngr.save(2, lora=twice, opt_state=opt)
        mngr.wait()

    record("failed_async_manager_write_on_one_process", save_async)
    sync = checkpoint.Manager(os.path.join(tmp, "run_sync"), async_save=False)
    record("failed_sync_manager_write_on_one_process", lambda: sync.save(
        1, lora=twice, opt_state=opt))
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    report["sync_steps_after_failure"] = sync.steps
    sync.close()
    report["async_steps_after_failure"] = mngr.steps
    got = mngr.restore(mesh=mesh, specs=specs, opt_state=opt)
    mngr.close()
    report["async_previous_step_kept"] = got.step == 1 and _gathered(got.lora) == _gathered(
        sharded) and _gathered(got.opt_state) == _gathered(opt)

    with open(out, "w") as fh:
        json.dump(report, fh)
    jax.distributed.shutdown()


def test_a_failure_on_one_process_fails_every_process(tmp_path):
    sys.path.insert(0, HERE)
    from conftest import free_port, run_workers

    port = free_port()
    outs = [str(tmp_path / f"proc{i}.json") for i in range(2)]
    env = _env()
    r0, r1 = run_workers([([os.path.abspath(__file__), "worker", str(i), str(port),
                            str(tmp_path), outs[i]], outs[i]) for i in range(2)],
                         env, tmp_path, CHILD_TIMEOUT_S)
    expect = {
        "nan_in_one_shard": ("ValueError", ["on process 1", "x/kernel", "NaN"]),
        "truncated_file_on_one_process": ("ValueError", ["on process 1", "truncated"]),
        "failed_write_on_one_process": ("CheckpointStorageError",
                                        ["on process 1", "file-size limit", "is intact"]),
        "truncated_step_on_one_process": ("CheckpointError", ["on process 1",
                                                              "cannot be read"]),
        "locked_path": ("CheckpointBusyError", ["on process 0", "trainer-other-host-7"]),
        "failed_async_manager_write_on_one_process": (
            "CheckpointStorageError", ["on process 1", "file-size limit",
                                       "latest complete step 1 is intact"]),
        "failed_sync_manager_write_on_one_process": (
            "CheckpointStorageError", ["on process 1", "file-size limit", "Nothing was saved"]),
    }
    print("GGUF bytes read per process:", [(r[n]["bytes_read"], r[n]["total"]) for r in
                                           (r0, r1) for n in ("gguf_dense", "gguf_nf4")])
    for r in (r0, r1):
        for name in ("gguf_dense", "gguf_nf4"):  # half the matrices' bytes, and the norms
            assert r[name]["equal"], name
            assert r[name]["bytes_read"] < 0.55 * r[name]["total"], (name, r[name])
    for name, (kind, words) in expect.items():
        assert r0[name]["error"] == r1[name]["error"] == kind, (name, r0[name], r1[name])
        # (process 1 reads its own copy of the damaged step: the outer words name it)
        agreed = [r[name]["message"].split(" failed on process ", 1)[1] for r in (r0, r1)]
        assert agreed[0] == agreed[1], (name, r0[name], r1[name])
        for word in words:
            assert word in r0[name]["message"], (name, word, r0[name]["message"])
    assert r0["previous_adapter_kept"] and r1["previous_adapter_kept"]
    for r in (r0, r1):
        assert r["async_steps_after_failure"] == [1], r["async_steps_after_failure"]
        assert r["sync_steps_after_failure"] == [], r["sync_steps_after_failure"]
        assert r["async_previous_step_kept"]


# ----------------------------------------------------------------------------------------
# Multi-process: one process killed mid-save; resume on both, and onto another mesh


def _resume_problem(n_processes: int):
    """(mesh, base specs, lora, opt_state, AdaLoRA state) of test_sharding's AdaLoRA GPT,
    placed on a (n_processes, 4) mesh."""
    import jax

    sys.path.insert(0, HERE)
    import test_sharding as T

    from lora_jax import sharding as S

    mesh = S.mesh((n_processes, 4), ("data", "model"))
    base, lora, opt, state, *_ = T.make_problem("adalora")
    bspec = T._base_specs(base, mesh)
    lspec = S.specs(lora, bspec, mesh=mesh)
    placed = jax.device_put((lora, opt, state), (
        S.named(mesh, lspec), S.named(mesh, S.state_specs(opt, lspec)),
        S.named(mesh, S.state_specs(state, lspec))))
    return (mesh, bspec, *placed)


def _gathered(tree) -> list:
    """Every array of ``tree`` whole, as float64 lists (on every process)."""
    import jax
    from jax.experimental import multihost_utils

    out = []
    for x in jax.tree.leaves(tree):
        if jax.process_count() > 1 and not x.is_fully_addressable:
            x = multihost_utils.process_allgather(x, tiled=True)
        out.append(np.asarray(x, np.float64).ravel().tolist())
    return out


def resume_worker(phase: str, process_id: int, port: int, run: str, out: str) -> None:
    """``save``: both processes save step 1, then step 2, and process 1 is SIGKILLed while
    step 2 is being written. ``restore``: both restart and restore the latest step."""
    import jax

    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=120)
    from jax.experimental import multihost_utils

    from lora_jax import checkpoint

    mesh, bspec, lora, opt, state = _resume_problem(2)
    if phase == "save":
        mngr = checkpoint.Manager(run)
        mngr.save(1, lora=lora, opt_state=opt, adalora=state)
        mngr.wait()
        saved = {"lora": _gathered(lora), "opt": _gathered(opt), "adalora": _gathered(state)}
        with open(out, "w") as fh:
            json.dump(saved, fh)
        multihost_utils.sync_global_devices("step 1 saved")
        doubled = jax.tree.map(lambda x: 2 * x, lora)
        mngr.save(2, lora=doubled, opt_state=opt, adalora=state)  # returns while writing
        if process_id == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        mngr.wait()  # process 0 can never finish step 2: the test kills it
        return
    with checkpoint.Manager(run) as mngr:
        got = mngr.restore(mesh=mesh, specs=bspec, like=lora, opt_state=opt)
    with open(out, "w") as fh:
        json.dump({"step": got.step, "lora": _gathered(got.lora), "opt": _gathered(
            got.opt_state), "adalora": _gathered(got.adalora)}, fh)
    multihost_utils.sync_global_devices("restored")
    jax.distributed.shutdown()


def child_restore_one_process(run: str, _unused: str) -> None:
    """The restart on one process of 4 devices: restores the latest step onto (1, 4)."""
    import jax

    jax.config.update("jax_num_cpu_devices", 4)
    from lora_jax import checkpoint

    mesh, bspec, lora, opt, state = _resume_problem(1)
    with checkpoint.Manager(run) as mngr:
        got = mngr.restore(mesh=mesh, specs=bspec, like=lora, opt_state=opt)
    assert len(jax.tree.leaves(got.lora)[0].sharding.device_set) == 4
    print(json.dumps({"step": got.step, "lora": _gathered(got.lora), "opt": _gathered(
        got.opt_state), "adalora": _gathered(got.adalora)}))


def test_a_process_killed_mid_save_resumes_from_the_last_complete_step(tmp_path):
    sys.path.insert(0, HERE)
    from conftest import free_port, run_workers

    run, saved_file = str(tmp_path / "run"), str(tmp_path / "saved.json")
    port = free_port()
    logs = [open(tmp_path / f"save{i}.log", "w+") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "resume", "save",
                               str(i), str(port), run, saved_file if i == 0 else
                               saved_file + ".1"], env=_env(), stdout=logs[i],
                              stderr=subprocess.STDOUT) for i in range(2)]
    try:
        procs[1].wait(timeout=CHILD_TIMEOUT_S)  # killed mid-save
        time.sleep(2)  # process 0 gets on with step 2 as far as it can
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    text = []
    for f in logs:
        f.seek(0)
        text.append(f.read()[-3000:])
        f.close()
    assert procs[1].returncode == -signal.SIGKILL, "\n----\n".join(text)
    with open(saved_file) as fh:
        saved = json.load(fh)
    assert "2" not in os.listdir(run)  # never a step that only one process finished

    def check(got):
        assert got["step"] == 1
        for item in ("lora", "opt", "adalora"):
            assert len(got[item]) == len(saved[item]) > 0, item
            for x, y in zip(got[item], saved[item]):
                assert x == y, item  # bit for bit

    outs = [str(tmp_path / f"restored{i}.json") for i in range(2)]
    port = free_port()
    for got in run_workers([([os.path.abspath(__file__), "resume", "restore", str(i),
                              str(port), run, outs[i]], outs[i]) for i in range(2)],
                           _env(), tmp_path, CHILD_TIMEOUT_S):
        check(got)
    check(_child("restore_one_process", run, str(tmp_path / "unused")))


if __name__ == "__main__" and len(sys.argv) > 1:
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "worker":
        worker(int(rest[0]), int(rest[1]), rest[2], rest[3])
    elif mode == "resume":
        resume_worker(rest[0], int(rest[1]), int(rest[2]), rest[3], rest[4])
    else:
        {"writer": child_writer, "no_write": child_no_write, "train": child_train,
         "restore_one_process": child_restore_one_process,
         "file_limit": child_file_limit}[mode](*rest)
