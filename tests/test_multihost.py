"""Multi-host: two processes on localhost (4 CPU devices each, gloo collectives) run the sharded
LoRA and AdaLoRA train steps of ``test_sharding.py`` on one global (2, 4) mesh, and must agree
with each other and with a single-device run.

The test starts both processes itself (``python tests/test_multihost.py worker ...``) with a
hard time limit, and kills them whatever happens.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VARIANTS = ("lora",)
TIMEOUT_S = 240


def worker(process_id: int, port: int, out: str) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=120)
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    sys.path.insert(0, HERE)
    import test_sharding as T

    from lora_jax import sharding as S

    assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
    mesh = S.mesh((2, 4), ("data", "model"))  # spans both processes
    report = {"devices": [d.process_index for d in mesh.devices.flat]}
    t0 = time.perf_counter()
    for variant in VARIANTS:
        print(variant, "start", time.perf_counter() - t0, flush=True)
        base, lora, opt, state, step, tokens, _ = T.make_problem(variant)
        bspec = T._base_specs(base, mesh)
        lspec = S.specs(lora, bspec, mesh=mesh)
        shard = (S.named(mesh, S.storage_specs(base, bspec, mesh)), S.named(mesh, lspec),
                 S.named(mesh, S.state_specs(opt, lspec)),
                 None if state is None else S.named(mesh, S.state_specs(state, lspec)),
                 NamedSharding(mesh, P("data")))
        rep = NamedSharding(mesh, P())
        jstep = jax.jit(step, in_shardings=shard + (rep,),
                        out_shardings=(shard[1], shard[2], shard[3], rep))
        print(variant, "problem", time.perf_counter() - t0, flush=True)
        args = jax.device_put((base, lora, opt, state, tokens), shard)
        b, lo, op, st, tk = args
        jstep = jstep.lower(*args, jnp.int32(0)).compile()
        print(variant, "compiled", time.perf_counter() - t0, flush=True)
        losses = []
        for i in range(2):
            lo, op, st, loss = jstep(b, lo, op, st, tk, jnp.int32(i))
            losses.append(float(np.asarray(loss.addressable_data(0))))
        assert not jax.tree.leaves(lo)[0].is_fully_addressable  # really spread over 2 hosts
        values = [np.asarray(multihost_utils.process_allgather(x, tiled=True), np.float64)
                  for x in jax.tree.leaves(lo)]
        rec = {"losses": losses, "lora": [v.ravel().tolist() for v in values]}
        print(variant, "sharded done", time.perf_counter() - t0, flush=True)
        if process_id == 0:  # the single-device reference, on this process' first device
            ref = jax.jit(step)
            b, lo, op, st, tk = jax.device_put((base, lora, opt, state, tokens),
                                               jax.local_devices()[0])
            ref_losses = []
            for i in range(2):
                lo, op, st, loss = ref(b, lo, op, st, tk, jnp.int32(i))
                ref_losses.append(float(loss))
            rec["ref_losses"] = ref_losses
            rec["ref_lora"] = [np.asarray(x, np.float64).ravel().tolist()
                               for x in jax.tree.leaves(lo)]
        report[variant] = rec
        print(variant, "done", time.perf_counter() - t0, flush=True)
    multihost_utils.sync_global_devices("done")
    with open(out, "w") as fh:
        json.dump(report, fh)
    jax.distributed.shutdown()


def _run_pair(tmp_path):
    sys.path.insert(0, HERE)
    from conftest import free_port, run_workers
    from test_sharding import FAST_COMPILE

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip())
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    port = free_port()
    outs = [str(tmp_path / f"proc{i}.json") for i in range(2)]
    return run_workers([([os.path.abspath(__file__), "worker", str(i), str(port), outs[i]],
                         outs[i]) for i in range(2)], env, tmp_path, TIMEOUT_S)


def test_two_processes_agree_with_single_device(tmp_path):
    r0, r1 = _run_pair(tmp_path)
    assert sorted(set(r0["devices"])) == [0, 1]
    for variant in VARIANTS:
        a, b = r0[variant], r1[variant]
        assert a["losses"] == b["losses"], variant  # one program: bit-identical on both hosts
        for x, y in zip(a["lora"], b["lora"]):
            assert x == y
        np.testing.assert_allclose(a["losses"], a["ref_losses"], rtol=0, atol=1e-5)
        for x, y in zip(a["lora"], a["ref_lora"]):
            x, y = np.asarray(x), np.asarray(y)
            assert np.max(np.abs(x - y)) <= 1e-5 * max(1.0, np.max(np.abs(y))), variant


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
