"""Tests for lora_jax.adalora against PEFT's RankAllocator and independent references."""

import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from lora_jax import adalora

DATA = pathlib.Path(__file__).parent / "data" / "peft_adalora_allocator.npz"
PEFT_MODULES = ("fc1", "fc2", "out")


def _rand_like(lora, key, scale=1.0):
    """A tree like ``lora`` with fresh N(0, scale^2) arrays (no zeros); ``key`` seeds numpy."""
    leaves, tdef = jax.tree.flatten(lora)
    rng = np.random.default_rng(key)
    return tdef.unflatten([jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype)
                           for x in leaves])


def _randn(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _small_params():
    return {
        "a": {"kernel": jnp.ones((12, 8))},
        "b": {"kernel": jnp.ones((8, 10))},
        "c": {"kernel": jnp.ones((10, 6))},
    }


# ------------------------------------------------------------------------------------------
# Leaf and init


def test_init_shapes_scale_and_delta():
    params = {"dense": {"kernel": jnp.ones((6, 5))},
              "attn": {"out": {"kernel": jnp.ones((2, 3, 7))}}}
    lora = adalora.init(params, init_r=4, target_r=2, alpha=6.0, key=jax.random.key(1))
    w = lora["attn"]["out"]["kernel"]  # "out" module: in_axes = 2 (heads, head_dim)
    assert (w.p.shape, w.e.shape, w.q.shape, w.in_axes) == ((2, 3, 4), (4,), (4, 7), 2)
    assert w.kind == "AdaLoRA" and w.r == 4 and w.kernel_shape == (2, 3, 7)
    assert w.scale == pytest.approx(6.0 / (4 + 1e-5), rel=1e-12)  # PEFT: alpha / (ranknum + 1e-5)
    d = lora["dense"]["kernel"]
    assert not np.any(d.e) and abs(float(np.std(d.p)) - 0.02) < 0.01
    assert not np.allclose(d.p[:, 0], w.p.reshape(6, 4)[:, 0])  # different key per leaf
    # the model is unchanged at init (E = 0)
    merged = jax.jit(lora_jax.merge)(params, lora)
    np.testing.assert_array_equal(merged["dense"]["kernel"], params["dense"]["kernel"])
    # delta with random E against an explicit float64 P diag(E) Q
    w = _rand_like(w, 2)
    ref = np.einsum("abr,r,ro->abo", *(np.asarray(x, np.float64) for x in (w.p, w.e, w.q)))
    np.testing.assert_allclose(jax.jit(lambda x: x.delta())(w), w.scale * ref, rtol=1e-5,
                               atol=1e-6)


def test_init_alpha_default_and_stacked():
    params = {"layers": {"mlp": {"kernel": jnp.ones((3, 8, 6))}}}
    lora = adalora.init(params, init_r=4, target_r=2, key=jax.random.key(0), stack_axes=1)
    w = lora["layers"]["mlp"]["kernel"]
    assert (w.p.shape, w.e.shape, w.q.shape, w.alpha) == ((3, 8, 4), (3, 4), (3, 4, 6), 4.0)


# ------------------------------------------------------------------------------------------
# Budget schedule


def _direct_budget(t, T, ti, tf, dt, b0, bt):
    if t <= ti:
        return b0, False
    if t >= T - tf:
        return bt, True
    return int((b0 - bt) * (1 - (t - ti) / (T - tf - ti)) ** 3 + bt), t % dt == 0


@pytest.mark.parametrize("T,ti,tf,dt,b0,bt", [
    (1000, 100, 200, 10, 12 * 24, 8 * 24),
    (12, 1, 3, 2, 15, 6),
    (57, 0, 0, 1, 40, 0),
    (300, 13, 29, 7, 99, 33),
])
def test_budget_schedule_matches_formula(T, ti, tf, dt, b0, bt):
    alloc = adalora.Allocator(total_steps=T, tinit=ti, tfinal=tf, delta_t=dt)
    got = [alloc.schedule(t, b0, bt) for t in range(T + 5)]
    assert got == [_direct_budget(t, T, ti, tf, dt, b0, bt) for t in range(T + 5)]
    budgets = [b for b, _ in got]
    assert budgets[0] == b0 and budgets[-1] == bt
    assert all(x >= y for x, y in zip(budgets, budgets[1:]))


def test_jitted_budget_and_exact_count():
    """Every masking step keeps exactly the budget's number of triplets (distinct scores)."""
    params = _small_params()
    lora = adalora.init(params, init_r=5, target_r=2, key=jax.random.key(0))
    alloc = adalora.Allocator(total_steps=20, tinit=2, tfinal=4, delta_t=3)
    state = alloc.init(lora)
    b0, bt = 15, 6
    upd = jax.jit(alloc.update)
    for t in range(22):
        lora = _rand_like(lora, 2 * t)
        new, state = upd(lora, state, _rand_like(lora, 2 * t + 1), t)
        budget, masked = alloc.schedule(t, b0, bt)
        kept = sum(int(np.asarray(m).sum()) for m in jax.tree.leaves(state.mask))
        nonzero = sum(int(np.count_nonzero(w.e)) for w in lora_jax.lora.leaves(new).values())
        if masked:
            assert int(state.budget) == budget == kept == nonzero, t
        elif t <= 2:
            assert kept == nonzero == b0
        else:  # between masking steps PEFT zeroes nothing
            assert nonzero == b0 and kept == int(state.budget)


# ------------------------------------------------------------------------------------------
# PEFT reference


def _peft_tree(template, d, t, kind):
    """The PEFT tensors of step t as an AdaLoRA tree: P = A^T, E = E[:, 0], Q = B^T."""
    out = {}
    for m in PEFT_MODULES:
        a, b, e = (d[f"{t}|base_model.model.{m}.lora_{x}.default|{kind}"] for x in "ABE")
        out[m] = {"kernel": template[m]["kernel"].replace(
            p=jnp.asarray(a.T), e=jnp.asarray(e[:, 0]), q=jnp.asarray(b.T))}
    return out


def test_peft_reference_every_decision():
    d = np.load(DATA)
    params = {"fc1": {"kernel": jnp.zeros((32, 64))}, "fc2": {"kernel": jnp.zeros((64, 48))},
              "out": {"kernel": jnp.zeros((48, 10))}}
    template = adalora.init(params, init_r=5, target_r=2, alpha=6, key=jax.random.key(0))
    alloc = adalora.Allocator(total_steps=12, tinit=1, tfinal=3, delta_t=2, beta1=0.85,
                              beta2=0.85)
    state = alloc.init(template)
    upd = jax.jit(alloc.update)
    n_pruned = 0
    for t in range(12):
        lora = _peft_tree(template, d, t, "value")
        new, state = upd(lora, state, _peft_tree(template, d, t, "grad"), jnp.int32(t))
        for m in PEFT_MODULES:
            after = d[f"{t}|base_model.model.{m}.lora_E.default|after"][:, 0]
            got = np.asarray(new[m]["kernel"].e)
            np.testing.assert_array_equal(got != 0, after != 0, err_msg=f"step {t} {m}")
            np.testing.assert_array_equal(got, after, err_msg=f"step {t} {m}")
            n_pruned += int((after == 0).sum())
    assert n_pruned > 20  # the file does exercise pruning
    for m in PEFT_MODULES:
        np.testing.assert_array_equal(state.mask[m]["kernel"],
                                      d[f"rank_pattern|{m}.lora_E.default"])
    final, ranks = adalora.finalize(new, state)
    assert ranks == {m + "/kernel": int(d[f"rank_pattern|{m}.lora_E.default"].sum())
                     for m in PEFT_MODULES}
    # PEFT's scaling of the reference config: lora_alpha / (init_r + 1e-5)
    assert template["fc1"]["kernel"].scale == pytest.approx(6 / 5.00001)


def test_hand_made_importance_pattern():
    """Only E has gradient, constant over steps: scores rank like |E * g| and the top survive."""
    params = {"x": {"kernel": jnp.ones((6, 6))}, "y": {"kernel": jnp.ones((6, 6))}}
    lora = adalora.init(params, init_r=4, target_r=1, key=jax.random.key(0))
    gx, gy = jnp.array([5.0, 1.0, 0.5, 0.1]), jnp.array([4.0, 3.0, 0.2, 0.3])
    lora = jax.tree.map(lambda w: w.replace(e=jnp.ones(4)), lora, is_leaf=lora_jax.lora.is_lowrank)
    grads = jax.tree.map(lambda x: jnp.zeros_like(x), lora)
    grads["x"]["kernel"] = grads["x"]["kernel"].replace(e=gx)
    grads["y"]["kernel"] = grads["y"]["kernel"].replace(e=gy)
    order = np.argsort(-np.concatenate([gx, gy]))
    alloc = adalora.Allocator(total_steps=10, tinit=1, tfinal=2, delta_t=1)
    state = alloc.init(lora)
    upd = jax.jit(alloc.update)
    for t in range(11):
        new, state = upd(lora, state, grads, t)
        budget, masked = alloc.schedule(t, 8, 2)
        expect = np.zeros(8, bool)
        expect[order[:budget]] = True
        got = np.concatenate([state.mask["x"]["kernel"], state.mask["y"]["kernel"]])
        np.testing.assert_array_equal(got, expect, err_msg=f"step {t}")
        e = np.concatenate([new["x"]["kernel"].e, new["y"]["kernel"].e])
        np.testing.assert_array_equal(e != 0, expect if masked else np.ones(8, bool))
    assert adalora.finalize(new, state)[1] == {"x/kernel": 1, "y/kernel": 1}


def test_sticky_pruning_keeps_pruned():
    lora = adalora.init(_small_params(), init_r=5, target_r=2, key=jax.random.key(0))
    alloc = adalora.Allocator(total_steps=16, tinit=1, tfinal=3, delta_t=2, sticky=True)
    state = alloc.init(lora)
    upd = jax.jit(alloc.update)
    prev = None
    for t in range(16):
        new, state = upd(_rand_like(lora, 100 + t), state, _rand_like(lora, 200 + t), t)
        mask = np.concatenate([np.asarray(m) for m in jax.tree.leaves(state.mask)])
        e = np.concatenate([np.asarray(w.e) for w in lora_jax.lora.leaves(new).values()])
        np.testing.assert_array_equal(e != 0, mask)  # applied at every step
        if prev is not None:
            assert not np.any(mask & ~prev), t  # nothing returns
        assert mask.sum() == alloc.schedule(t, 15, 6)[0] or not alloc.schedule(t, 15, 6)[1]
        prev = mask
    assert prev.sum() == 6


# ------------------------------------------------------------------------------------------
# Orthogonal regulariser


def test_orth_reg_matches_float64_reference():
    params = {"d": {"kernel": jnp.ones((9, 7))}, "attn": {"out": {"kernel": jnp.ones((2, 4, 8))}},
              "stk": {"kernel": jnp.ones((3, 8, 5))}}
    lora = adalora.init(params, init_r=3, target_r=1, key=jax.random.key(0),
                        stack_axes={".*stk.*": 1})
    lora = _rand_like(lora, 7, 0.5)
    norms = []
    for w in lora_jax.lora.leaves(lora).values():
        s = w.stack_shape
        p = np.asarray(w.p, np.float64).reshape((-1,) + (int(np.prod(w.in_shape)), 3))
        q = np.asarray(w.q, np.float64).reshape((-1, 3, int(np.prod(w.out_shape))))
        assert p.shape[0] == int(np.prod(s))
        for i in range(p.shape[0]):
            norms.append(np.linalg.norm(p[i].T @ p[i] - np.eye(3)))
            norms.append(np.linalg.norm(q[i] @ q[i].T - np.eye(3)))
    norms = np.array(norms)
    assert len(norms) == 2 * (1 + 1 + 3)
    f = jax.jit(adalora.orth_reg, static_argnames="kind")
    np.testing.assert_allclose(f(lora), norms.mean(), rtol=1e-5)
    np.testing.assert_allclose(f(lora, kind="paper"), (norms**2).sum(), rtol=1e-5)
    # finite gradient, also at an exactly orthonormal P
    w = lora["d"]["kernel"].replace(p=jnp.eye(9, 3))
    g = jax.grad(adalora.orth_reg)({"d": {"kernel": w}})
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(g))
    with pytest.raises(ValueError, match="kind"):
        adalora.orth_reg(lora, kind="squared")


# ------------------------------------------------------------------------------------------
# finalize


def test_finalize_preserves_merged_weights_and_drops_rank_zero():
    params = {"d": {"kernel": _randn(1, (9, 7))}, "attn": {"out": {"kernel": _randn(2, (2, 4, 8))}},
              "stk": {"kernel": _randn(3, (3, 8, 5))}, "gone": {"kernel": _randn(4, (5, 5))}}
    lora = adalora.init(params, init_r=4, target_r=2, alpha=7.0, key=jax.random.key(0),
                        stack_axes={".*stk.*": 1})
    lora = _rand_like(lora, 9, 0.3)
    state = adalora.Allocator(total_steps=10).init(lora)
    mask = {"d": {"kernel": jnp.array([True, False, True, False])},
            "attn": {"out": {"kernel": jnp.array([False, True, True, True])}},
            "stk": {"kernel": jnp.array([[True, False, False, False], [False, False, False, False],
                                         [False, True, True, False]])},
            "gone": {"kernel": jnp.zeros(4, bool)}}
    state = state._replace(mask=mask)
    final, ranks = adalora.finalize(lora, state)
    assert ranks == {"attn/out/kernel": 3, "d/kernel": 2, "gone/kernel": 0, "stk/kernel": 2}
    assert "gone" not in final
    assert all(type(w) is lora_jax.LoraWeight for w in lora_jax.lora.leaves(final).values())
    assert final["d"]["kernel"].a.shape == (9, 2) and final["stk"]["kernel"].b.shape == (3, 2, 5)
    assert final["attn"]["out"]["kernel"].a.shape == (2, 4, 3)
    merge = jax.jit(lora_jax.merge)
    want = merge(params, jax.jit(adalora.apply_mask)(lora, state))
    got = merge(params, final)
    for path in ("d", "stk", "gone"):
        np.testing.assert_allclose(got[path]["kernel"], want[path]["kernel"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["attn"]["out"]["kernel"], want["attn"]["out"]["kernel"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["gone"]["kernel"], params["gone"]["kernel"])
    # the masked tree really differs from the unmasked one (the test is not vacuous)
    assert not np.allclose(merge(params, lora)["d"]["kernel"], want["d"]["kernel"])


# ------------------------------------------------------------------------------------------
# The jitted train step traces once across all phases


def test_train_step_traces_once():
    params = {"l1": {"kernel": _randn(1, (8, 16), 1 / 3)},
              "l2": {"kernel": _randn(2, (16, 4), 0.25)}}
    x = _randn(3, (32, 8))
    y = jnp.sin(x[:, :4])
    lora = adalora.init(params, init_r=4, target_r=2, key=jax.random.key(0))
    alloc = adalora.Allocator(total_steps=14, tinit=2, tfinal=4, delta_t=2)
    opt = optax.adam(1e-2)

    def loss_fn(lora):
        w = lora_jax.merge(params, lora)
        pred = jnp.tanh(x @ w["l1"]["kernel"]) @ w["l2"]["kernel"]
        return jnp.mean((pred - y) ** 2) + 0.5 * adalora.orth_reg(lora)

    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def train_step(lora, opt_state, state, step):
        loss, grads = jax.value_and_grad(loss_fn)(lora)
        updates, opt_state = opt.update(grads, opt_state)
        lora = optax.apply_updates(lora, updates)
        lora, state = alloc.update(lora, state, grads, step)
        return lora, opt_state, state, loss

    opt_state, state = opt.init(lora), alloc.init(lora)
    losses = []
    for step in range(18):  # warm-up, budgeting, final phase and past total_steps
        lora, opt_state, state, loss = train_step(lora, opt_state, state, jnp.int32(step))
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert int(state.budget) == 4
    assert sum(adalora.finalize(lora, state)[1].values()) == 4
    assert all(not np.any(x) for x in jax.tree.leaves(state.exp_avg_ipt))  # reset at T - tfinal


# ------------------------------------------------------------------------------------------
# Errors


def test_errors():
    params = _small_params()
    with pytest.raises(ValueError, match="target_r"):
        adalora.init(params, init_r=4, target_r=5, key=jax.random.key(0))
    with pytest.raises(ValueError, match="tinit"):
        adalora.Allocator(total_steps=10, tinit=6, tfinal=4)
    with pytest.raises(ValueError, match="delta_t"):
        adalora.Allocator(total_steps=10, delta_t=0)
    with pytest.raises(ValueError, match="beta1"):
        adalora.Allocator(total_steps=10, beta1=1.0)
    lora = adalora.init(params, init_r=5, target_r=2, key=jax.random.key(0))
    alloc = adalora.Allocator(total_steps=10, tinit=1, tfinal=2)
    state = alloc.init(lora)
    other = {"a": lora["a"], "b": lora["b"]}
    with pytest.raises(ValueError, match="grads.*missing.*c/kernel"):
        alloc.update(lora, state, other, 3)
    bad = dict(lora, a={"kernel": lora["a"]["kernel"].replace(p=lora["a"]["kernel"].p[:, :4])})
    with pytest.raises(ValueError, match="grads at 'a/kernel': p has shape"):
        jax.jit(alloc.update)(lora, state, bad, 3)
    plain = jax.tree.map(lambda w: lora_jax.LoraWeight(a=w.p, b=w.q), lora,
                         is_leaf=lora_jax.lora.is_lowrank)
    with pytest.raises(ValueError, match="grads does not fit"):
        alloc.update(lora, state, plain, 3)
    with pytest.raises(ValueError, match="state.exp_avg_ipt"):
        alloc.update(lora, alloc.init(other), lora, 3)
