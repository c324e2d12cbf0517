"""Shared test helpers: random trees, error measures, the check against the merged model, the
dot_general layouts of the thin LoRA matmul, and the ``key`` fixture.

Data, factors and error measures use NumPy where they can, and setup runs under jit: on a
2-core CPU every eager jnp op of a new shape costs a compile, which would dominate runtimes.
"""

import json
import os
import socket
import subprocess
import sys
import time

# Compile fast: LLVM's optimisation of the generated CPU code (not XLA's HLO passes, which
# decide FLOPs, fusion and buffers) costs more than it saves on these small test programs,
# about a third of the suite's CPU time. Read when JAX starts its backend; subprocesses and
# notebook kernels inherit it. The benchmarks run with XLA's defaults.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_backend_optimization_level=0").strip()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax import lax  # noqa: E402

import lora_jax  # noqa: E402

# Reference generators run in a PyTorch environment of their own (tests/data/README.md).
collect_ignore_glob = ["data/*"]

BF16 = jnp.bfloat16


def randomize(lora, key, scale=0.1):
    """Gives B (and every factor) fresh non-zero values so that LoRA changes the output."""
    leaves, tree = jax.tree.flatten(lora)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    )


def randomize_np(tree, seed, scale=0.3):
    """:func:`randomize` with NumPy draws: every float array of a LoRA/AdaLoRA tree gets fresh
    non-zero values (B and E too); other leaves are kept."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(
        x.shape), x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def max_rel_err(a_tree, b_tree):
    """max |a - b| / max |b| over matching leaves, in float64."""
    la, lb = jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)
    assert len(la) == len(lb)
    errs = [0.0]
    for a, b in zip(la, lb):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape, (a.shape, b.shape)
        errs.append(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30)))
    return max(errs)


def norm_err(a_tree, b_tree):
    """Max over leaves of ||a - b|| / ||b||."""
    return max(float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                     / np.linalg.norm(np.asarray(b, np.float64)))
               for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)))


def f64(tree):
    """A float64 copy of a concrete tree (call under jax.enable_x64)."""
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64)) if jnp.issubdtype(
        x.dtype, jnp.floating) else x, tree)


def rnd(seed, shape, scale=1.0):
    """A float32 array of standard normals times ``scale``, drawn by NumPy."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def rbg_key(seed):
    """A cheap PRNG key for dropout: threefry's compile dominates these small graphs on a
    CPU. (RBG bits are not vmap-invariant: under vmap, references are vmapped too.)"""
    return jax.random.key(seed, impl="unsafe_rbg")


def init_lora(params, seed=1, **kw):
    """``lora_jax.init`` under jit, then every factor (B included) made non-zero."""
    lora = jax.jit(lambda p: lora_jax.init(p, key=jax.random.key(seed), **kw))(params)
    return randomize_np(lora, seed + 1)


def random_like(out):
    """A fixed random tree shaped like ``out``: the projection that turns outputs into a loss."""
    leaves, tree = jax.tree.flatten(out)
    return jax.tree.unflatten(tree, [rnd(42 + i, a.shape) for i, a in enumerate(leaves)])


def dot_proj(out, proj, dtype=jnp.float32):
    """sum(out * proj) over the leaves, in ``dtype``."""
    return sum(jnp.sum(a.astype(dtype) * b.astype(dtype))
               for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(proj)))


def check_merged(fn, params, lora, x, *rest, tol=1e-5, gtol=1e-4, x_grad=True, ref64=True,
                 ref_params=None, value_ref32=False, **apply_kw):
    """fast apply == merged (values); grads wrt (lora, x) == float64 autodiff of merged.

    The reference values come with the float64 gradients (one compile), or from a float32
    run of the merged computation with ``value_ref32`` (for functions that round to bf16,
    where float64 merging may round a weight differently). ``ref64=False``: float32
    reference throughout (for functions that draw random numbers, whose default dtype
    changes under x64). ``ref_params``: the dense base for the reference (the dequantized
    weights of a QLoRA base)."""
    f = lora_jax.apply(fn, strict=True, **apply_kw)
    ref_params = params if ref_params is None else ref_params
    merged_fn = lambda l, x, *r: fn(lora_jax.merge(ref_params, l), x, *r)
    out = jax.jit(f)(params, lora, x, *rest)
    ref_shapes = jax.eval_shape(merged_fn, lora, x, *rest)
    assert [a.dtype for a in jax.tree.leaves(out)] == [
        a.dtype for a in jax.tree.leaves(ref_shapes)]
    proj = random_like(out)
    argnums = (0, 1) if x_grad else (0,)

    def loss_fast(l, x):
        return dot_proj(f(params, l, x, *rest), proj)

    g = jax.jit(jax.grad(loss_fast, argnums=argnums))(lora, x)
    with jax.enable_x64(ref64):
        cast = f64 if ref64 else (lambda t: t)
        p_r, rest_r = cast(ref_params), cast(rest)

        def loss_ref(l, x):
            y = fn(lora_jax.merge(p_r, l), x, *rest_r)
            return dot_proj(y, proj, jnp.float64 if ref64 else jnp.float32), y

        g_ref, ref = jax.jit(jax.grad(loss_ref, argnums=argnums, has_aux=True))(
            cast(lora), cast(x))
    if value_ref32:
        ref = jax.jit(merged_fn)(lora, x, *rest)
    assert max_rel_err(out, ref) < tol, "value"
    assert max_rel_err(g[0], g_ref[0]) < gtol, "grad wrt LoRA factors"
    if x_grad:
        assert max_rel_err(g[1], g_ref[1]) < gtol, "grad wrt input"
    return f


def assert_all_fast(fn, params, lora, *args, want="fast"):
    """Every adapter is used, and every use takes route ``want``."""
    rep = lora_jax.report(fn, params, lora, *args)
    used = {k: w.routes for k, w in rep.weights.items() if w.uses}
    assert used and all(all(u == want for u in v) for v in used.values()), rep
    assert set(used) == set(lora_jax.lora.leaves(lora)), rep  # every adapter is exercised
    return rep


# ----------------------------------------------------------------------------------------
# The dot_general layouts the rewrite sends to the thin LoRA matmul (fast_dot._thin / lowrank)

def _dg_wlhs(dims):
    return lambda p, x: lax.dot_general(p["w"], x, (dims, ((), ())))


# name: (fn(p, x) using p["w"], kernel shape, in_axes, x shape)
LAYOUTS = {
    # DenseGeneral(axis=(-2, -1)): two contracted (input) axes, in_axes=2 kernel.
    "two_in_axes": (lambda p, x: jnp.einsum("bsij,ijk->bsk", x, p["w"]), (3, 4, 5), 2,
                    (2, 6, 3, 4)),
    # x's contracted dims not in sorted order (einsum emits x contract dims (2, 0)) and
    # interleaved with its free dims.
    "x_contract_unsorted": (lambda p, x: jnp.einsum("jbis,ijk->bsk", x, p["w"]), (3, 4, 5), 2,
                            (4, 2, 3, 6)),
    # The weight as the lhs of the dot_general (einsum puts it first).
    "weight_lhs": (lambda p, x: jnp.einsum("ijk,jbis->kbs", p["w"], x), (3, 4, 5), 2,
                   (4, 2, 3, 6)),
    "weight_lhs_swapped_contract": (_dg_wlhs(((1, 0), (3, 2))), (3, 4, 5), 2, (2, 6, 3, 4)),
    # DenseGeneral(features=(h, d)): two free weight axes.
    "two_out_axes": (lambda p, x: jnp.einsum("bsi,ihd->bshd", x, p["w"]), (6, 3, 4), 1,
                     (2, 5, 6)),
    "two_out_axes_weight_lhs": (_dg_wlhs(((0,), (2,))), (6, 3, 4), 1, (2, 5, 6)),
    # Transposed use: x @ W.T (a tied embedding head), contracting the output axes.
    "transposed": (lambda p, x: x @ p["w"].T, (6, 7), 1, (2, 5, 7)),
    "transposed_weight_lhs": (lambda p, x: p["w"] @ jnp.swapaxes(x, -1, -2), (6, 7), 1,
                              (2, 5, 7)),
    # Output axes contracted in reverse order; input axes contracted in reverse order and
    # the result transposed.
    "out_axes_reversed": (lambda p, x: jnp.einsum("bmn,ijnm->bij", x, p["w"]), (3, 4, 5, 2),
                          2, (2, 2, 5)),
    "in_axes_reversed_out_permuted": (lambda p, x: jnp.einsum("bji,ijnm->mbn", x, p["w"]),
                                      (3, 4, 5, 2), 2, (2, 4, 3)),
    # Reshaped views of a 3-axis kernel (in_axes=2 merged into one dim).
    "reshaped": (lambda p, x: x @ p["w"].reshape(12, 5), (3, 4, 5), 2, (7, 12)),
    "reshaped_transposed": (lambda p, x: x @ p["w"].reshape(12, 5).T, (3, 4, 5), 2, (7, 5)),
    # Size-1 kernel axes.
    "size_one_axes": (lambda p, x: jnp.einsum("bai,aicd->bcd", x, p["w"]), (1, 6, 1, 4), 2,
                      (3, 1, 6)),
    # x without free dims.
    "vector_x": (lambda p, x: x @ p["w"], (6, 4), 1, (6,)),
    "vector_x_transposed": (lambda p, x: p["w"] @ x, (6, 4), 1, (4,)),
    # Precision passed through.
    "precision_highest": (lambda p, x: jnp.dot(x, p["w"], precision=lax.Precision.HIGHEST),
                          (6, 4), 1, (3, 5, 6)),
}


def one_kernel(shape, in_axes=None, dropout=0.0, seed=0, r=3):
    """A plain param dict with one adapted kernel "w" (and random, non-zero A and B)."""
    params = {"w": rnd(100 + seed, shape, 1 / np.sqrt(shape[0]))}
    lora = init_lora(params, seed=1 + seed, r=r, alpha=2.0 * r, targets="w", in_axes=in_axes,
                     dropout=dropout)
    return params, lora


def make_multi(names, dropout=0.0, r=3):
    """One param dict {name: {"w": kernel}} holding a kernel per layout, adapted, and a
    function applying every layout to its own input: one compile covers them all."""
    params = {n: {"w": rnd(100 + i, LAYOUTS[n][1], 1 / np.sqrt(LAYOUTS[n][1][0]))}
              for i, n in enumerate(names)}
    lora = init_lora(params, r=r, alpha=2.0 * r, targets=[f"{n}/w" for n in names],
                     in_axes={f"{n}/w": LAYOUTS[n][2] for n in names}, dropout=dropout)
    xs = {n: rnd(200 + i, LAYOUTS[n][3]) for i, n in enumerate(names)}

    def fn(p, xs):
        return {n: LAYOUTS[n][0](p[n], xs[n]) for n in names}

    return fn, params, lora, xs


@pytest.fixture
def key():
    return jax.random.key(0)


def free_port() -> int:
    """A free TCP port on localhost (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(argvs, env, tmp_path, timeout_s: float) -> list[dict]:
    """Runs ``python *argv`` for each ``(argv, report_path)`` in ``argvs`` at once, stops them
    all when one fails or ``timeout_s`` passes, asserts every exit code is 0 (with the tail
    of each log), and returns the JSON reports the workers wrote."""
    n = len(argvs)
    logs = [open(tmp_path / f"proc{i}.log", "w+") for i in range(n)]
    procs = [subprocess.Popen([sys.executable, *argv], env=env, stdout=logs[i],
                              stderr=subprocess.STDOUT) for i, (argv, _) in enumerate(argvs)]
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one failed: do not wait for the others to time out
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    tails = []
    for f in logs:
        f.seek(0)
        tails.append(f.read()[-3000:])
        f.close()
    codes = [p.returncode for p in procs]
    assert codes == [0] * n, f"exit codes {codes}\n" + "\n----\n".join(tails)
    reports = []
    for _, out in argvs:
        with open(out) as fh:
            reports.append(json.load(fh))
    return reports


class PeftMLP(nn.Module):
    """The PyTorch model behind ``tests/data/peft_*`` (see tests/data/README.md) in Flax:
    fc1 Linear(32, 64), fc2 Linear(64, 48), out Linear(48, 10), exact (erf) GELU."""

    @nn.compact
    def __call__(self, x):
        g = lambda h: jax.nn.gelu(h, approximate=False)  # noqa: E731  torch's exact GELU
        return nn.Dense(10, name="out")(g(nn.Dense(48, name="fc2")(g(nn.Dense(64, name="fc1")(x)))))
