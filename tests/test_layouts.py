"""lora_jax.trace: layouts learned from use, and adapters that follow them everywhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_err, randomize
from jax import lax
from jax.sharding import PartitionSpec as PS

import lora_jax
from lora_jax import adalora
from lora_jax import layouts as Lay

K = jax.random.key
N, KV, D, H, F = 4, 2, 16, 8, 24


def _w(i, shape):
    return jax.random.normal(K(i), shape) / np.sqrt(shape[-2] if len(shape) > 1 else 1)


def heads_first():
    """A gemma-style block: heads-first einsum kernels named `w`, a fused kv, a gating pair
    indexed with constants, a block-diagonal gate and a tied embedding."""
    params = {
        "emb": {"embedding": _w(0, (11, D))},
        "q": {"w": _w(1, (N, D, H))},
        "kv": {"w": _w(2, (2, KV, D, H))},
        "o": {"w": _w(3, (N, H, D))},
        "gate": {"w": _w(4, (2, D, F))},
        "down": {"w": _w(5, (F, D))},
        "blk": {"w": _w(6, (4, 4, 4))},
    }

    def fn(p, ids):
        x = p["emb"]["embedding"][ids]
        q = jnp.einsum("BTD,NDH->BTNH", x, p["q"]["w"])
        kv = jnp.einsum("BTD,CKDH->CBTKH", x, p["kv"]["w"])
        k, v = (jnp.repeat(t, N // KV, axis=2) for t in (kv[0], kv[1]))
        a = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(H), -1)
        x = x + jnp.einsum("BTNH,NHD->BTD", jnp.einsum("BNTS,BSNH->BTNH", a, v), p["o"]["w"])
        h = jax.nn.gelu(x @ p["gate"]["w"][0]) * (x @ p["gate"]["w"][1])
        x = x + h @ p["down"]["w"]
        xb = x.reshape(x.shape[:-1] + (4, 4))
        x = x + jnp.einsum("btni,nij->btnj", xb, p["blk"]["w"]).reshape(x.shape)
        return x @ p["emb"]["embedding"].T

    ids = jax.random.randint(K(9), (2, 5), 0, 11)
    return fn, params, ids


EXPECTED = {  # roles, A shape, B shape at r=2
    "q/w": ("oio", (D, 2), (2, N, H)),
    "kv/w": ("ooio", (D, 2), (2, 2, KV, H)),
    "o/w": ("iio", (N, H, 2), (2, D)),
    "gate/w": ("sio", (2, D, 2), (2, 2, F)),
    "down/w": ("io", (F, 2), (2, D)),
    "blk/w": ("sio", (4, 4, 2), (4, 2, 4)),
}


def test_trace_finds_every_projection_and_its_roles():
    fn, params, ids = heads_first()
    layouts = lora_jax.trace(fn, params, ids)
    assert {p: w.roles for p, w in layouts.items() if w.kind == "dense"} == {
        p: e[0] for p, e in EXPECTED.items()}
    emb = layouts["emb/embedding"]
    assert (emb.kind, emb.roles, emb.uses) == ("embedding", "io", ("gather", "dot_general"))
    lora = lora_jax.init(params, r=2, key=K(1), layouts=layouts)
    leaves = lora_jax.lora.leaves(lora)
    assert set(leaves) == set(EXPECTED)  # embeddings are not targeted by default
    for path, (roles, a, b) in EXPECTED.items():
        leaf = leaves[path]
        assert (leaf.layout, leaf.a.shape, leaf.b.shape) == (roles, a, b), path
        assert leaf.kernel_shape == params[path.split("/")[0]]["w"].shape
        n_stack = int(np.prod([s for s, c in zip(leaf.kernel_shape, roles) if c == "s"]))
        n_in = int(np.prod([s for s, c in zip(leaf.kernel_shape, roles) if c == "i"]))
        n_out = int(np.prod([s for s, c in zip(leaf.kernel_shape, roles) if c == "o"]))
        assert leaf.a.size + leaf.b.size == n_stack * 2 * (n_in + n_out)  # standard LoRA count


def test_fast_path_values_and_grads_equal_merged_model():
    fn, params, ids = heads_first()
    lora = lora_jax.init(params, r=2, key=K(1), layouts=lora_jax.trace(fn, params, ids))
    lora = randomize(lora, K(2), 0.1)
    f = jax.jit(lora_jax.apply(fn, strict=True))
    assert max_rel_err(f(params, lora, ids), fn(lora_jax.merge(params, lora), ids)) < 1e-5
    with jax.enable_x64(True):
        p64, l64 = jax.tree.map(lambda x: x.astype(jnp.float64), (params, lora))
        g_ref = jax.grad(lambda l: jnp.sum(jnp.sin(fn(lora_jax.merge(p64, l), ids))))(l64)
    g = jax.grad(lambda l: jnp.sum(jnp.sin(f(params, l, ids))))(lora)
    assert max_rel_err(g, g_ref) < 1e-4
    rep = lora_jax.report(fn, params, lora, ids)
    assert not rep.fallbacks and all(w.fast for w in rep.weights.values()), str(rep)
    assert rep["gate/w"].routes == ["fast", "fast"] and rep["gate/w"].roles == "sio"


def test_roles_rule_gives_separate_k_and_v_adapters():
    fn, params, ids = heads_first()
    layouts = lora_jax.trace(fn, params, ids)
    lora = lora_jax.init(params, r=2, key=K(1), layouts=layouts,
                         rules=[lora_jax.Rule(pattern="kv/w", roles="soio"),
                                lora_jax.Rule(pattern=".*")])
    kv = lora["kv"]["w"]
    assert (kv.layout, kv.a.shape, kv.b.shape) == ("soio", (2, D, 2), (2, 2, KV, H))
    lora = randomize(lora, K(2), 0.1)
    out = lora_jax.apply(fn, strict=True)(params, lora, ids)
    assert max_rel_err(out, fn(lora_jax.merge(params, lora), ids)) < 1e-5
    with pytest.raises(ValueError, match="Rule 'kv/w' at 'kv/w'.*4 axes"):
        lora_jax.init(params, r=2, key=K(1), layouts=layouts,
                      rules=[lora_jax.Rule(pattern="kv/w", roles="sio")])
    with pytest.raises(ValueError, match="one input .* and one output"):
        lora_jax.init(params, r=2, key=K(1), rules=[lora_jax.Rule(pattern="kv/w", roles="ssss")])


def test_rank_bound_follows_the_layout():
    fn, params, ids = heads_first()
    layouts = lora_jax.trace(fn, params, ids)
    # kv (2, KV, D, H) as "ooio": min(D, 2*KV*H) = 16, not min(2, ...) as by name.
    lora_jax.init(params, r=D, key=K(1), layouts=layouts, targets="kv/w")
    with pytest.raises(ValueError, match=r"'kv/w'.*roles 'ooio'.*min\(16, 32\) = 16"):
        lora_jax.init(params, r=D + 1, key=K(1), layouts=layouts, targets="kv/w")


def test_names_rule_covers_w_and_weight():
    params = {"a": {"w": jnp.ones((4, 3))}, "b": {"weight": jnp.ones((3, 2))},
              "c": {"scale": jnp.ones((3, 2))}}
    assert set(lora_jax.lora.leaves(lora_jax.init(params, r=1, key=K(0)))) == {"a/w", "b/weight"}
    with pytest.raises(ValueError, match="no parameter to adapt.*named kernel/w/weight"):
        lora_jax.init({"c": {"scale": jnp.ones((3, 2))}}, r=1, key=K(0))
    with pytest.raises(ValueError, match="quantize selected nothing.*'c/scale'"):
        lora_jax.quantize({"c": {"scale": jnp.ones((64, 2))}})


def test_trace_follows_views_and_control_flow():
    params = {"t": _w(0, (6, 4)), "r": _w(1, (3, 2, 5)), "s": _w(2, (3, 5, 5)),
              "c": _w(3, (4, 6)), "wl": _w(4, (5, 5)), "cj": _w(5, (5, 5)),
              "cv": _w(6, (3, 3, 3, 4))}

    @jax.custom_jvp
    def cj(x, w):
        return x @ w
    cj.defjvp(lambda p, t: (cj(*p), t[0] @ p[1] + p[0] @ t[1]))

    def fn(p, x):
        y = x @ p["t"].T  # (B, 6): contracts t's axis 1 -> roles "oi"
        z = y @ p["r"].reshape(6, 5)  # merge two kernel axes: r's (3, 2) input
        z = lax.scan(lambda h, w: (jnp.tanh(h @ w), None), z, p["s"])[0]  # stacked layers
        u = lax.cond(True, lambda a: a @ p["c"], lambda a: -(a @ p["c"]), z[:, :4])
        v = jax.checkpoint(lambda a: a @ p["wl"])(u[:, :5])
        w = cj(z, p["cj"])
        img = jnp.ones((1, 5, 5, 3))
        conv = lax.conv_general_dilated(img, p["cv"], (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(v) + jnp.sum(w) + jnp.sum(conv)

    lay = lora_jax.trace(fn, params, jnp.ones((2, 4)))
    roles = {p: w.roles for p, w in lay.items()}
    assert roles == {"t": "oi", "r": "iio", "s": "sio", "c": "io", "wl": "io", "cj": "io",
                     "cv": "iiio"}


def test_trace_marks_other_uses_and_unread_weights():
    params = {"w": jnp.ones((4, 4)), "unused": jnp.ones((3, 3)), "scale": jnp.ones((4, 4))}
    lay = lora_jax.trace(lambda p, x: (x @ p["w"]) @ jnp.tanh(p["scale"]), params, jnp.ones((2, 4)))
    assert "unused" not in lay and lay["w"].kind == "dense"
    assert (lay["scale"].kind, lay["scale"].roles, lay["scale"].uses) == ("other", None, ("tanh",))
    assert lay.dense() == ["w"] and "1 dense" in repr(lay)


def test_quantized_base_and_adalora_follow_layouts():
    fn, params, ids = heads_first()
    layouts = lora_jax.trace(fn, params, ids)
    qbase = lora_jax.quantize(params, "nf4", layouts=layouts, block_size=16, double_quant=False)
    assert set(p for p, x in lora_jax.paths.flatten(qbase) if lora_jax.is_quantized(x)) == set(
        EXPECTED)
    lora = randomize(lora_jax.init(params, r=2, key=K(1), layouts=layouts), K(2), 0.1)
    out = jax.jit(lora_jax.apply(fn, strict=True))(qbase, lora, ids)
    ref = fn(lora_jax.merge(lora_jax.dequantize_tree(qbase), lora), ids)
    assert max_rel_err(out, ref) < 1e-5

    ada = adalora.init(params, init_r=3, target_r=2, key=K(3), layouts=layouts)
    q = ada["q"]["w"]
    assert (q.layout, q.p.shape, q.e.shape, q.q.shape) == ("oio", (D, 3), (3,), (3, N, H))
    ada = randomize(ada, K(4), 0.1)
    out = lora_jax.apply(fn, strict=True)(params, ada, ids)
    assert max_rel_err(out, fn(lora_jax.merge(params, ada), ids)) < 1e-5
    state = adalora.Allocator(total_steps=4, tinit=0, tfinal=1, delta_t=1).init(ada)
    final, _ = adalora.finalize(ada, state)
    assert final["q"]["w"].layout == "oio"
    assert max_rel_err(lora_jax.merge(params, final)["q"]["w"],
                       lora_jax.merge(params, ada)["q"]["w"]) < 1e-5


def test_pissa_merge_unmerge_with_heads_first_kernel():
    fn, params, ids = heads_first()
    layouts = lora_jax.trace(fn, params, ids)
    pissa = lora_jax.init(params, r=3, key=K(1), layouts=layouts, init="pissa", targets="o/w")
    residual = lora_jax.unmerge(params, pissa)
    assert max_rel_err(lora_jax.merge(residual, pissa)["o"]["w"], params["o"]["w"]) < 1e-5
    # The top-3 singular directions of the (N*H, D) matrix moved into the adapter.
    w = np.asarray(params["o"]["w"]).reshape(N * H, D)
    sv = np.linalg.svd(w, compute_uv=False)
    res = np.asarray(residual["o"]["w"]).reshape(N * H, D)
    np.testing.assert_allclose(np.linalg.svd(res, compute_uv=False)[:D - 3], sv[3:], rtol=1e-4)


def test_sharding_specs_follow_roles():
    fn, params, ids = heads_first()
    lora = lora_jax.init(params, r=2, key=K(1), layouts=lora_jax.trace(fn, params, ids))
    # Heads sharded: q (N, D, H) on axis 0 -> B (r, N, H) on N; A (D, r) replicated.
    # o (N, H, D) on axis 0 -> A (N, H, r) on N; B (r, D) replicated.
    base_specs = {p: PS() for p in EXPECTED} | {"q/w": PS("model"), "o/w": PS("model"),
                                                "blk/w": PS("model")}
    specs = lora_jax.sharding.specs(lora, base_specs)
    assert (specs["q"]["w"].a, specs["q"]["w"].b) == (PS(), PS(None, "model"))
    assert (specs["o"]["w"].a, specs["o"]["w"].b) == (PS("model"), PS())
    assert (specs["blk"]["w"].a, specs["blk"]["w"].b) == (PS("model"), PS("model"))


def test_checkpoint_round_trip_keeps_roles(tmp_path):
    fn, params, ids = heads_first()
    lora = randomize(lora_jax.init(params, r=2, key=K(1), layouts=lora_jax.trace(fn, params, ids)),
                     K(2), 0.1)
    lora_jax.checkpoint.save_adapter(tmp_path / "a", lora)
    back = lora_jax.checkpoint.load_adapter(tmp_path / "a")
    assert back["q"]["w"].layout == "oio" and back["kv"]["w"].roles == "ooio"
    out = lora_jax.apply(fn, strict=True)(params, back, ids)
    assert max_rel_err(out, fn(lora_jax.merge(params, lora), ids)) < 1e-6


def test_summary_counts_follow_layout():
    fn, params, ids = heads_first()
    lora = lora_jax.init(params, r=2, key=K(1), layouts=lora_jax.trace(fn, params, ids))
    want = sum(2 * (D + N * H) if p == "q/w" else 0 for p in ["q/w"])
    assert lora["q"]["w"].a.size + lora["q"]["w"].b.size == want
    s = lora_jax.summary(lora, params)
    q = next(m for m in s.modules if m.path == "q/w")
    assert (q.roles, q.kernel_shape, q.params) == ("oio", (N, D, H), want)
    assert f"{lora_jax.param_count(lora):,} trainable" in str(s)


def test_helpers():
    assert Lay.to_canonical("oio") == (1, 0, 2) and Lay.from_canonical("ioso") == (1, 2, 0, 3)
    assert Lay.block_order("sio") == (0, 2, 1)
    with pytest.raises(ValueError, match="roles 'io' has 2 characters"):
        Lay.check("io", (2, 3, 4), "here")
    with pytest.raises(ValueError, match="'s' \\(stack\\)"):
        Lay.check("ix", (2, 3), "here")


def test_delta_in_any_axis_order_equals_the_transposed_delta():
    fn, params, ids = heads_first()
    lora = randomize(lora_jax.init(params, r=2, key=K(1), layouts=lora_jax.trace(fn, params, ids)),
                     K(2), 0.1)
    for path in ("q/w", "kv/w", "blk/w", "o/w"):
        leaf = lora_jax.lora.leaves(lora)[path]
        full = np.asarray(leaf.delta())
        for order in (Lay.block_order(leaf.layout), tuple(reversed(range(full.ndim)))):
            np.testing.assert_allclose(np.asarray(leaf.delta(order=order)),
                                       np.transpose(full, order), rtol=1e-6, atol=1e-7)
