"""LoRA and QLoRA on every expert of a mixture-of-experts layer.

Three styles of MoE block, written here (not the library's reference model): top-2 routing
with normalized gates, then

* ``ragged``: tokens sorted by expert, ``jax.lax.ragged_dot`` over ``(E, D, F)`` kernels,
  unsorted;
* ``einsum``: every expert sees every token (``etd,edf->etf``, the expert axis a batch
  dimension), combined with the gates;
* ``pick``: each token's expert kernels gathered (``w[ids]``) before a per-token dot.

Every check compares against the merged-weight model (float64 gradients, random inputs).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import check_merged, init_lora, max_rel_err, rbg_key, rnd
from jax import lax

import lora_jax
from lora_jax.transform import LoraFallbackError

E, D, F, T, K = 4, 8, 6, 10, 2


def moe_params(seed=0, layers=None, experts=E):
    lead = () if layers is None else (layers,)
    return {"router": rnd(seed, lead + (D, experts), 0.5),
            "up": rnd(seed + 1, lead + (experts, D, F), 0.4),
            "down": rnd(seed + 2, lead + (experts, F, D), 0.4)}


def _route(p, x):
    top, ids = lax.top_k(x @ p["router"], K)  # (T, K)
    return jax.nn.softmax(top, axis=-1), ids


def moe_ragged(p, x):
    gates, ids = _route(p, x)
    n = p["up"].shape[0]
    flat = ids.reshape(-1)
    order = jnp.argsort(flat)
    rows = jnp.repeat(x, K, axis=0)[order]
    sizes = jnp.bincount(flat, length=n).astype(jnp.int32)
    h = jax.nn.silu(lax.ragged_dot(rows, p["up"], sizes))
    out = lax.ragged_dot(h, p["down"], sizes)[jnp.argsort(order)]
    return (out.reshape(x.shape[0], K, -1) * gates[..., None]).sum(1)


def moe_einsum(p, x):
    gates, ids = _route(p, x)
    n = p["up"].shape[0]
    combine = (jax.nn.one_hot(ids, n) * gates[..., None]).sum(1)  # (T, E)
    h = jax.nn.silu(jnp.einsum("etd,edf->etf", jnp.broadcast_to(x, (n,) + x.shape), p["up"]))
    out = jnp.einsum("etf,efd->etd", h, p["down"])
    return jnp.einsum("te,etd->td", combine, out)


def moe_pick(p, x):
    gates, ids = _route(p, x)
    h = jax.nn.silu(jnp.einsum("td,tkdf->tkf", x, p["up"][ids]))
    out = jnp.einsum("tkf,tkfd->tkd", h, p["down"][ids])
    return (out * gates[..., None]).sum(1)


def stacked(block):
    """``block`` repeated over a leading layer axis with ``lax.scan`` (residual stream)."""
    def fn(p, x):
        def step(h, layer):
            return h + block(layer, h), None
        return lax.scan(step, x, p)[0]
    return fn


STYLES = {"ragged": moe_ragged, "einsum": moe_einsum, "pick": moe_pick}


@pytest.mark.parametrize("style", list(STYLES))
def test_trace_gives_experts_a_stack_axis_and_init_adapts_each(style):
    params, x = moe_params(), rnd(9, (T, D))
    layouts = lora_jax.trace(STYLES[style], params, x)
    assert {p: (w.kind, w.roles) for p, w in layouts.items()} == {
        "router": ("dense", "io"), "up": ("dense", "sio"), "down": ("dense", "sio")}
    lora = lora_jax.init(params, r=3, key=jax.random.key(1), layouts=layouts)  # default targets
    a, b = lora["up"].factors()
    assert (a.shape, b.shape) == ((E, D, 3), (E, 3, F))
    assert lora_jax.lora.leaves(lora).keys() == {"router", "up", "down"}


def test_trace_says_why_a_contraction_gave_no_layout():
    params = {"w": rnd(0, (E, D, F)), "v": rnd(1, (E, F, 3))}

    def fn(p, x):
        both = jnp.einsum("edf,efg->edg", p["w"], p["v"])  # two weights, no activations
        return jnp.einsum("td,edg->tg", x, both)

    layouts = lora_jax.trace(fn, params, rnd(2, (T, D)))
    assert layouts["w"].roles is None and "another weight" in layouts["w"].why
    assert "another weight" in str(layouts["v"])


def test_ragged_values_and_grads_equal_merged_and_route_is_grouped():
    params, x = moe_params(), rnd(9, (T, D))
    lora = init_lora(params, r=2, layouts=lora_jax.trace(moe_ragged, params, x))
    check_merged(moe_ragged, params, lora, x, tol=2e-5, gtol=2e-4)
    rep = lora_jax.report(moe_ragged, params, lora, x)
    assert rep["up"].routes == ["grouped"] and rep["down"].routes == ["grouped"], rep
    assert not rep.fallbacks


def test_einsum_with_expert_batch_axis_takes_the_fast_dot():
    params, x = moe_params(), rnd(9, (T, D))
    lora = init_lora(params, r=2, layouts=lora_jax.trace(moe_einsum, params, x))
    check_merged(moe_einsum, params, lora, x, tol=2e-5, gtol=2e-4)
    assert lora_jax.report(moe_einsum, params, lora, x)["up"].routes == ["fast"]


def test_picked_experts_fall_back_correctly_and_say_so():
    params, x = moe_params(), rnd(9, (T, D))
    lora = init_lora(params, r=2, layouts=lora_jax.trace(moe_pick, params, x))
    f = lora_jax.apply(moe_pick)
    ref = moe_pick(lora_jax.merge(params, lora), x)
    assert max_rel_err(jax.jit(f)(params, lora, x), ref) < 2e-5
    (use,) = lora_jax.report(moe_pick, params, lora, x)["up"].uses
    assert use.route == "fallback" and "expert" in use.reason


def test_scan_over_layers_remat_and_jit():
    params, x = moe_params(layers=2), rnd(9, (T, D))
    fn = stacked(jax.checkpoint(moe_ragged))
    layouts = lora_jax.trace(fn, params, x)
    assert layouts["up"].roles == "ssio"
    lora = init_lora(params, r=2, layouts=layouts)
    check_merged(fn, params, lora, x, tol=2e-5, gtol=2e-4)
    assert lora_jax.report(fn, params, lora, x)["down"].routes == ["grouped"]


def _step_cost(fn, params, lora, x, **kw):
    """Compiled FLOPs of the gradient step, and whether any dot forms an expert-stack-shaped
    array (the ``E x D x F`` update)."""
    f = lora_jax.apply(fn, **kw)
    step = jax.jit(jax.grad(lambda l: jnp.sum(f(params, l, x) ** 2)))
    compiled = step.lower(lora).compile()
    e, d, f_ = params["up"].shape
    formed = any(f"f32[{e},{d},{f_}]" in line and ("dot(" in line or "convolution(" in line)
                 for line in compiled.as_text().splitlines())
    return compiled.cost_analysis()["flops"], formed


def test_compiled_step_never_forms_the_expert_update():
    # Wide experts, few rows: the merged fallback's E x D x F update dominates its FLOPs.
    # (XLA:CPU counts a ragged_dot as if every group saw every row, both routes alike.)
    x = rnd(9, (T, 32))
    params = {"router": rnd(0, (32, 8)), "up": rnd(1, (8, 32, 96), 0.2),
              "down": rnd(2, (8, 96, 32), 0.2)}
    lora = init_lora(params, r=2, layouts=lora_jax.trace(moe_ragged, params, x))
    flops_fast, formed_fast = _step_cost(moe_ragged, params, lora, x)
    flops_merged, formed_merged = _step_cost(moe_ragged, params, lora, x, mode="merged")
    assert formed_merged and not formed_fast
    assert flops_fast < 0.8 * flops_merged, (flops_fast, flops_merged)


def test_dropout_changes_only_the_lowrank_input():
    params, x = moe_params(), rnd(9, (T, D))
    lora = init_lora(params, r=2, dropout=0.5, layouts=lora_jax.trace(moe_ragged, params, x))
    f = jax.jit(lora_jax.apply(moe_ragged))
    y_drop = f(params, lora, x, lora_rng=rbg_key(0))
    y_plain = f(params, lora, x)
    assert max_rel_err(y_plain, moe_ragged(lora_jax.merge(params, lora), x)) < 2e-5
    assert not np.allclose(y_drop, y_plain)
    # Dropout reaches the low-rank term only: with every B zero the output is the base's.
    zero_b = {k: v.replace(b=jnp.zeros_like(v.b)) for k, v in lora.items()}
    y0 = f(params, zero_b, x, lora_rng=rbg_key(0))
    y_ref = moe_ragged(lora_jax.merge(params, zero_b), x)
    assert max_rel_err(y0, y_ref) < 2e-5
    g = jax.grad(lambda l: jnp.sum(f(params, l, x, lora_rng=rbg_key(0)) ** 2))(lora)
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(g))


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_qlora_experts_dequantize_inside_the_grouped_rule(fmt):
    params, x = moe_params(), rnd(9, (T, D))
    # Experts of very different magnitudes: a block straddling two experts would show.
    # (Without double quantization: its 8-bit absmax codes, shared by 256 blocks, cannot
    # hold scales 1000x apart.)
    params["up"] = params["up"] * (10.0 ** jnp.arange(E, dtype=jnp.float32))[:, None, None]
    layouts = lora_jax.trace(moe_ragged, params, x)
    base = lora_jax.quantize(params, fmt, block_size=16, layouts=layouts, targets="up|down",
                             double_quant=False)
    dense = jax.tree.map(lambda q: q.dequantize() if hasattr(q, "dequantize") else q, base,
                         is_leaf=lora_jax.protocols.is_base_leaf)
    err = np.abs(np.asarray(dense["up"]) - np.asarray(params["up"])).max(axis=(1, 2))
    scale = np.abs(np.asarray(params["up"])).max(axis=(1, 2))
    assert (err / scale < 0.2).all(), err / scale  # every expert keeps its own scale
    lora = init_lora(params, r=2, layouts=layouts)
    check_merged(moe_ragged, base, lora, x, ref_params=dense, tol=2e-5, gtol=2e-4)
    assert lora_jax.report(moe_ragged, base, lora, x)["up"].routes == ["grouped"]
    frozen = {"router": lora["router"]}  # quantized experts without adapters
    rep = lora_jax.report(moe_ragged, base, frozen, x)
    assert rep["up"].routes == ["dequantize"]
    y = jax.jit(lora_jax.apply(moe_ragged))(base, frozen, x)
    assert max_rel_err(y, moe_ragged(lora_jax.merge(dense, frozen), x)) < 2e-5


def test_qlora_stacked_experts_under_scan():
    params, x = moe_params(layers=2), rnd(9, (T, D))
    fn = stacked(moe_ragged)
    layouts = lora_jax.trace(fn, params, x)
    # Tiny layers (12 blocks each): double quantization's groups of 256 would straddle them.
    base = lora_jax.quantize(params, "nf4", block_size=16, layouts=layouts, targets="up|down",
                             double_quant=False)
    dense = {k: v.dequantize() if lora_jax.protocols.is_base_leaf(v) else v
             for k, v in base.items()}
    lora = init_lora(params, r=2, layouts=layouts)
    check_merged(fn, base, lora, x, ref_params=dense, tol=2e-5, gtol=2e-4)
    assert lora_jax.report(fn, base, lora, x)["up"].routes == ["grouped"]


def test_dora_experts_refuse_the_grouped_rule_clearly():
    params, x = moe_params(), rnd(9, (T, D))
    lora = init_lora(params, r=2, dora=True, layouts=lora_jax.trace(moe_ragged, params, x))
    with pytest.raises(LoraFallbackError, match="'up'.*DoRA.*dora=True"):
        lora_jax.apply(moe_ragged, strict=True)(params, lora, x)
    y = jax.jit(lora_jax.apply(moe_ragged))(params, lora, x)  # merged: slower, correct
    assert max_rel_err(y, moe_ragged(lora_jax.merge(params, lora), x)) < 2e-5


def test_sharding_specs_follow_the_expert_axis():
    params, x = moe_params(), rnd(9, (T, D))
    lora = lora_jax.init(params, r=2, key=jax.random.key(1),
                         layouts=lora_jax.trace(moe_ragged, params, x))
    PS = jax.sharding.PartitionSpec
    specs = lora_jax.sharding.specs(lora, {"router": PS(), "up": PS("expert", None, "model"),
                                           "down": PS("expert", "model", None)})
    assert (specs["up"].a, specs["up"].b) == (PS("expert"), PS("expert", None, "model"))
    assert (specs["down"].a, specs["down"].b) == (PS("expert", "model"), PS("expert"))


def test_bad_group_sizes_factor_lengths_and_integer_experts():
    params, x = moe_params(), rnd(9, (T, D))
    lora = init_lora(params, r=2, layouts=lora_jax.trace(moe_ragged, params, x))

    def fixed_sizes(sizes):
        def fn(p, x):
            return lax.ragged_dot(x, p["up"], jnp.asarray(sizes, jnp.int32))
        return fn

    f = lora_jax.apply(fixed_sizes([3, 3, 3, 3]))  # 12 rows claimed, 10 given
    with pytest.raises(ValueError, match=r"'up'.*sum to 12.*rows, 10"):
        f(params, {"up": lora["up"]}, x)
    short = moe_params(experts=E - 1)
    with pytest.raises(ValueError, match=r"'(up|down)'.*base kernel has shape \(3, "):
        lora_jax.apply(moe_ragged)(short, lora, x)
    ints = dict(params, up=jnp.ones((E, D, F), jnp.int32))
    with pytest.raises(TypeError, match="'up'.*int32"):
        lora_jax.init(ints, r=2, key=jax.random.key(0), targets="up")



# ----------------------------------------------------------------------------------------
# Few rows, one adapter (decode, small batches): x·W0 + s·(x·A)·B, never W0 + s·A·B.

def _dense_layer(p, x):
    return jnp.einsum("btd,df->btf", x, p["w"])


def _forward_cost(params, lora, x, **kw):
    """Compiled forward FLOPs, and whether a dot forms the (64, 48) merged weight."""
    f = jax.jit(lora_jax.apply(_dense_layer, **kw))
    compiled = f.lower(params, lora, x).compile()
    formed = any("f32[64,48]" in line and "dot(" in line
                 for line in compiled.as_text().splitlines())
    return compiled.cost_analysis()["flops"], formed


@pytest.mark.parametrize("rows,merges", [(2, False), (64, True)])
def test_few_rows_take_the_unmerged_form_with_equal_values_and_grads(rows, merges):
    params = {"w": rnd(0, (64, 48), 0.2)}  # unmerged iff 4 * rows * (64 + 48) < 64 * 48
    x = rnd(1, (1, rows, 64))
    lora = init_lora(params, r=4)
    assert lora_jax.report(_dense_layer, params, lora, x)["w"].routes == ["fast"]
    assert _forward_cost(params, lora, x)[1] == merges
    check_merged(_dense_layer, params, lora, x, tol=2e-5, gtol=2e-4)


def test_few_rows_compile_without_the_merged_weight():
    params = {"w": rnd(0, (64, 48), 0.2)}
    lora = init_lora(params, r=4)
    x = rnd(1, (1, 2, 64))
    flops_fast, formed_fast = _forward_cost(params, lora, x)
    flops_merged, formed_merged = _forward_cost(params, lora, x, mode="merged")
    assert formed_merged and not formed_fast
    assert flops_fast < 0.5 * flops_merged, (flops_fast, flops_merged)


def test_few_rows_on_a_quantized_base():
    params = {"w": rnd(0, (64, 48), 0.2)}
    base = lora_jax.quantize(params, "nf4", block_size=16, targets="w")
    dense = {"w": base["w"].dequantize()}
    lora = init_lora(params, r=4)
    x = rnd(1, (1, 2, 64))
    assert lora_jax.report(_dense_layer, base, lora, x)["w"].routes == ["fast"]
    assert not _forward_cost(base, lora, x)[1]
    check_merged(_dense_layer, base, lora, x, ref_params=dense, tol=2e-5, gtol=2e-4)
