"""apply(): values and gradients equal the merged-weight computation, on every layer kind.

The reference for values is ``fn(merge(base, lora), ...)``; for gradients, autodiff of that
merged computation in float64. Inputs and factors are fresh random values, never zeros.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import f64, max_rel_err, randomize
from flax import nnx

import lora_jax
from lora_jax.models.gpt import GPT, GPTConfig, loss_fn


def check_against_merged(fn, params, lora, *args, tol=1e-5, gtol=1e-4, strict=True):
    """fast apply == merged computation (values), and grads (lora, x) == float64 autodiff."""
    f = lora_jax.apply(fn, strict=strict)
    out = jax.jit(f)(params, lora, *args)
    ref = jax.jit(fn)(lora_jax.merge(params, lora), *args)
    assert max_rel_err(out, ref) < tol
    proj = jax.random.normal(jax.random.key(42), out.shape, jnp.float32)

    def loss_fast(l, x):
        return jnp.sum(f(params, l, x, *args[1:]).astype(jnp.float32) * proj)

    argnums = (0, 1) if jnp.issubdtype(args[0].dtype, jnp.floating) else (0,)
    g = jax.jit(jax.grad(loss_fast, argnums=argnums))(lora, args[0])
    with jax.enable_x64(True):
        p64, l64, x64 = f64(params), f64(lora), f64(args[0])

        def loss_ref(l, x):
            return jnp.sum(fn(lora_jax.merge(p64, l), x, *args[1:]) * proj.astype(jnp.float64))

        g_ref = jax.jit(jax.grad(loss_ref, argnums=argnums))(l64, x64)
    assert max_rel_err(g[0], g_ref[0]) < gtol, "grad wrt LoRA factors"
    if len(argnums) == 2:
        assert max_rel_err(g[1], g_ref[1]) < gtol, "grad wrt inputs"
    return f


def setup(model, x, r=3, key=jax.random.key(0), **init_kw):
    params = model.init(key, x)
    lora = lora_jax.init(params, r=r, alpha=2 * r, key=jax.random.key(1), **init_kw)
    return params, randomize(lora, jax.random.key(2), 0.3)


X = jax.random.normal(jax.random.key(7), (4, 6, 12))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(16, name="Dense_0")(x))
        return nn.Dense(5, name="Dense_1")(h)


def test_dense_against_hand_written_float64_forward():
    model = MLP()
    params, lora = setup(model, X)
    out = lora_jax.apply(model.apply)(params, lora, X)
    p, lw = params["params"], lora["params"]
    x = np.asarray(X, np.float64)

    def adapted(name):
        leaf = lw[name]["kernel"]
        return np.asarray(p[name]["kernel"], np.float64) + leaf.scale * (
            np.asarray(leaf.a, np.float64) @ np.asarray(leaf.b, np.float64))

    h = x @ adapted("Dense_0") + np.asarray(p["Dense_0"]["bias"])
    h = np.asarray(nn.gelu(jnp.asarray(h, jnp.float32)), np.float64)
    y = h @ adapted("Dense_1") + np.asarray(p["Dense_1"]["bias"])
    np.testing.assert_allclose(np.asarray(out), y, rtol=2e-5, atol=2e-5)
    check_against_merged(model.apply, params, lora, X)


def test_initial_lora_leaves_the_model_unchanged():
    model = MLP()
    params = model.init(jax.random.key(0), X)
    lora = lora_jax.init(params, r=4, key=jax.random.key(1))  # B = 0
    np.testing.assert_array_equal(lora_jax.apply(model.apply)(params, lora, X),
                                  model.apply(params, X))


class DenseGeneralModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral(features=(3, 4), name="split")(x)         # kernel (12, 3, 4)
        h = nn.tanh(h)
        return nn.DenseGeneral(features=7, axis=(-2, -1), name="join")(h)  # kernel (3, 4, 7)


def test_dense_general_multi_axis_kernels():
    model = DenseGeneralModel()
    params, lora = setup(model, X, in_axes={".*join.*": 2})
    assert lora["params"]["split"]["kernel"].b.shape == (3, 3, 4)   # two output axes
    assert lora["params"]["join"]["kernel"].a.shape == (3, 4, 3)    # two input axes
    check_against_merged(model.apply, params, lora, X)
    rep = lora_jax.report(model.apply, params, lora, X)
    assert all(w.routes == ["fast"] for w in rep.weights.values()), rep


class AttentionBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.MultiHeadDotProductAttention(num_heads=3, qkv_features=12, name="attn")(x, x)
        w = self.param("mix", nn.initializers.normal(0.3), (12, 2, 5))
        einsum = nn.Einsum((12, 2, 5), "btd,dhk->bthk", name="einsum")
        return einsum(h + x).sum(-1) + jnp.einsum("btd,dhk->bthk", x, w).sum(-1)


def test_attention_with_dense_general_and_einsum():
    model = AttentionBlock()
    params, lora = setup(model, X, targets=[r".*kernel", r".*mix"])
    check_against_merged(model.apply, params, lora, X)
    rep = lora_jax.report(model.apply, params, lora, X)
    assert set(rep) >= {"params/attn/query/kernel", "params/attn/out/kernel",
                        "params/einsum/kernel", "params/mix"}
    assert all(w.routes == ["fast"] for w in rep.weights.values()), rep


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(8, (3, 3), name="conv")(x))
        return nn.Dense(4, name="head")(h.mean((1, 2)))


def test_conv_falls_back_correctly_and_strict_names_it():
    model = ConvNet()
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    params, lora = setup(model, x)
    assert lora["params"]["conv"]["kernel"].a.shape == (3, 3, 3, 3)  # (kh, kw, cin, r)
    check_against_merged(model.apply, params, lora, x, strict=False)
    rep = lora_jax.report(model.apply, params, lora, x)
    use = rep["params/conv/kernel"].uses[0]
    assert (use.route, use.primitive) == ("fallback", "conv_general_dilated"), rep
    with pytest.raises(lora_jax.LoraFallbackError, match="'params/conv/kernel'.*conv_general"):
        lora_jax.apply(model.apply, strict=True)(params, lora, x)


SMALL = dict(vocab=40, d=24, heads=4, layers=2, mlp=32, seq=8)
TOK = jax.random.randint(jax.random.key(5), (3, 8), 0, 40)


@pytest.mark.parametrize("kw", [dict(scan=True), dict(remat=True), dict(scan=True, remat=True),
                                dict(tied=True)], ids=str)
def test_gpt_variants(kw):
    cfg = GPTConfig(**SMALL, **kw)
    model = GPT(cfg)
    stack = {".*layers.*": 1} if cfg.scan else None
    params, lora = setup(model, TOK, stack_axes=stack)
    if cfg.scan:
        assert lora["params"]["layers"]["block"]["q"]["kernel"].a.shape == (2, 24, 3)
    check_against_merged(lambda p, t: model.apply(p, t), params, lora, TOK)
    rep = lora_jax.report(model.apply, params, lora, TOK)
    assert all(w.routes == ["fast"] for w in rep.weights.values()), rep


def test_tied_embedding_used_for_lookup_and_as_transposed_head():
    cfg = GPTConfig(**SMALL, tied=True)
    model = GPT(cfg)
    params, lora = setup(model, TOK, targets=[r".*kernel", r".*embed/embedding"])
    check_against_merged(model.apply, params, lora, TOK)
    rep = lora_jax.report(model.apply, params, lora, TOK)
    assert rep["params/embed/embedding"].routes == ["gather", "fast"], rep


def test_bf16_compute_with_float32_params():
    cfg = GPTConfig(**SMALL, dtype="bfloat16")
    model = GPT(cfg)
    params, lora = setup(model, TOK)
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    f = lora_jax.apply(model.apply)
    out = jax.jit(f)(params, lora, TOK)
    ref = jax.jit(model.apply)(lora_jax.merge(params, lora), TOK)
    assert max_rel_err(out, ref) < 2e-2
    g = jax.jit(jax.grad(lambda l: loss_fn(f(params, l, TOK), TOK)))(lora)
    # Reference: the float32 model; the bar: the plain bf16 merged model's own error.
    g32 = jax.jit(jax.grad(lambda l: loss_fn(GPT(GPTConfig(**SMALL)).apply(
        lora_jax.merge(params, l), TOK), TOK)))(lora)
    g16 = jax.jit(jax.grad(lambda l: loss_fn(model.apply(lora_jax.merge(params, l), TOK),
                                             TOK)))(lora)
    for a, b, c in zip(*map(jax.tree.leaves, (g, g32, g16))):
        err_fast = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        err_merged = float(jnp.linalg.norm(c - b) / jnp.linalg.norm(b))
        assert err_fast < 1.5 * err_merged + 1e-2, (err_fast, err_merged)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g))


class NNXModel(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(12, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


def test_nnx_model_through_split_and_merge():
    graphdef, state = nnx.split(NNXModel(nnx.Rngs(0)))
    fn = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    lora = randomize(lora_jax.init(state, r=2, key=jax.random.key(1)), jax.random.key(2))
    assert sorted(lora_jax.lora.leaves(lora)) == ["l1/kernel", "l2/kernel"]
    check_against_merged(fn, state, lora, X)


def test_plain_function_kernel_used_twice_and_transposed():
    k = jax.random.split(jax.random.key(0), 2)
    params = {"w": jax.random.normal(k[0], (12, 12)), "v": jax.random.normal(k[1], (12, 6))}

    def fn(p, x):
        h = jnp.tanh(x @ p["w"])
        h = jnp.tanh(h @ p["w"])          # used twice
        h = h @ p["w"].T                  # used transposed
        return jnp.dot(h, p["v"])

    lora = randomize(lora_jax.init(params, r=2, targets=["w", "v"], key=jax.random.key(1)),
                     jax.random.key(2))
    check_against_merged(fn, params, lora, X)
    assert lora_jax.report(fn, params, lora, X)["w"].routes == ["fast"] * 3


def test_unhandled_primitive_falls_back_and_strict_raises():
    params = {"w": jax.random.normal(jax.random.key(0), (12, 6))}

    def fn(p, x):
        return x @ p["w"] + jnp.cumsum(p["w"], axis=0)[-1]   # cumsum has no LoRA rule

    lora = randomize(lora_jax.init(params, r=2, targets="w", key=jax.random.key(1)),
                     jax.random.key(2))
    check_against_merged(fn, params, lora, X, strict=False)
    rep = lora_jax.report(fn, params, lora, X)
    assert rep["w"].routes == ["fast", "fallback"] and rep.fallbacks[0][1].primitive == "cumsum"
    with pytest.raises(lora_jax.LoraFallbackError, match="'w' is used by primitive 'cumsum'"):
        lora_jax.apply(fn, strict=True)(params, lora, X)


def test_control_flow_cond_while_and_user_transforms():
    params = {"w": jax.random.normal(jax.random.key(0), (12, 12)) / 4}

    def fn(p, x):
        w = p["w"]
        y = jax.lax.cond(x.sum() > 0, lambda h: h @ w, lambda h: -(h @ w), x)
        y = jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ w), y)
        y = jax.checkpoint(lambda h: jnp.sin(h @ w))(y)
        return jax.vmap(lambda row: row @ w)(y)

    lora = randomize(lora_jax.init(params, r=2, targets="w", key=jax.random.key(1)),
                     jax.random.key(2))
    check_against_merged(fn, params, lora, X)
    assert lora_jax.report(fn, params, lora, X)["w"].fast
    # The user's own vmap / checkpoint around the adapted function.
    f = lora_jax.apply(fn)
    batched = jax.vmap(lambda x: f(params, lora, x))(X)
    np.testing.assert_allclose(batched, jax.vmap(lambda x: fn(lora_jax.merge(params, lora), x))(X),
                               rtol=1e-5, atol=1e-5)
    g1 = jax.grad(lambda l: jax.checkpoint(lambda l: f(params, l, X).sum())(l))(lora)
    g2 = jax.grad(lambda l: f(params, l, X).sum())(lora)
    assert max_rel_err(g1, g2) < 1e-6


def test_traces_once_per_input_shape():
    model = MLP()
    params, lora = setup(model, X)
    f = lora_jax.apply(model.apply)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(l, x):
        return jax.grad(lambda l: f(params, l, x).sum())(l)

    for i in range(3):
        step(lora, X + i)
    chex.clear_trace_counter()


def test_frozen_base_gets_no_gradient_and_costs_nothing():
    cfg = GPTConfig(**SMALL)
    model = GPT(cfg)
    params, lora = setup(model, TOK)
    f = lora_jax.apply(model.apply)
    loss = lambda b, l: loss_fn(f(b, l, TOK), TOK)  # noqa: E731
    gb, gl = jax.grad(loss, argnums=(0, 1))(params, lora)
    assert all(not jnp.any(x) for x in jax.tree.leaves(gb))
    flops = lambda fn: jax.jit(fn).lower(params, lora).compile().cost_analysis()["flops"]  # noqa
    both = flops(jax.grad(loss, argnums=(0, 1)))
    only = flops(jax.grad(loss, argnums=1))
    assert both <= 1.01 * only


def test_dropout_on_the_lora_path():
    model = MLP()
    params = model.init(jax.random.key(0), X)
    lora = randomize(lora_jax.init(params, r=3, dropout=0.5, key=jax.random.key(1)),
                     jax.random.key(2))
    f = lora_jax.apply(model.apply)
    no_rng = f(params, lora, X)  # no rng: eval mode, dropout off
    np.testing.assert_allclose(no_rng, model.apply(lora_jax.merge(params, lora), X), rtol=1e-5,
                               atol=1e-5)
    a = f(params, lora, X, lora_rng=jax.random.key(3))
    b = f(params, lora, X, lora_rng=jax.random.key(4))
    assert not np.allclose(a, no_rng) and not np.allclose(a, b)
    # Dropping everything on the LoRA path leaves the base model.
    lora0 = jax.tree.map(lambda x: x, lora)
    leaf = lora0["params"]["Dense_0"]["kernel"]
    lora0["params"]["Dense_0"]["kernel"] = leaf.replace(dropout=0.999999)
    lora0["params"]["Dense_1"]["kernel"] = lora0["params"]["Dense_1"]["kernel"].replace(
        dropout=0.999999)
    np.testing.assert_allclose(f(params, lora0, X, lora_rng=jax.random.key(5)),
                               model.apply(params, X), rtol=1e-4, atol=1e-4)


def test_remat_recomputes_in_the_backward_pass_with_the_same_dropout_masks():
    # nn.remat under apply: values and gradients equal the un-rematerialized model (dropout
    # masks included), and the compiled gradient keeps far fewer temporaries. Plain
    # jax.checkpoint saves nothing on XLA:CPU, whose scheduler hoists the recomputation.
    kw = dict(vocab=32, d=32, heads=2, layers=4, mlp=128, seq=32)
    plain, rem = GPT(GPTConfig(**kw)), GPT(GPTConfig(**kw, remat=True))
    tok = jax.random.randint(jax.random.key(5), (4, 32), 0, 32)
    params = plain.init(jax.random.key(0), tok)
    assert jax.tree.structure(params) == jax.tree.structure(rem.init(jax.random.key(0), tok))
    lora = randomize(lora_jax.init(params, r=4, dropout=0.3, key=jax.random.key(1)),
                     jax.random.key(2), 0.3)

    def grad_fn(model):
        f = lora_jax.apply(model.apply)
        return jax.jit(jax.value_and_grad(
            lambda l, key: loss_fn(f(params, l, tok, lora_rng=key), tok)))

    # Compiled once each: the same executables give the values and the memory analysis.
    g_plain, g_rem = (grad_fn(m).lower(lora, jax.random.key(0)).compile() for m in (plain, rem))
    v1, g1 = g_plain(lora, jax.random.key(9))
    v2, g2 = g_rem(lora, jax.random.key(9))
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    assert max_rel_err(g2, g1) < 1e-5
    v3, _ = g_rem(lora, jax.random.key(10))  # another key: the masks are really applied
    assert abs(float(v3) - float(v2)) > 1e-4

    t_rem, t_plain = (g.memory_analysis().temp_size_in_bytes for g in (g_rem, g_plain))
    assert t_rem < 0.6 * t_plain, (t_rem, t_plain)


def test_merged_mode_equals_fast_mode():
    model = MLP()
    params, lora = setup(model, X)
    a = lora_jax.apply(model.apply, mode="merged")(params, lora, X)
    b = lora_jax.apply(model.apply)(params, lora, X)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_reference_gpt_train_step_flops_and_merged_inference_flops():
    """Compiled FLOPs: the LoRA step <= 0.72 of full fine-tuning; merged inference == base."""
    cfg = GPTConfig()  # the reference GPT of benchmarks/train_step.py
    model = GPT(cfg)
    tok = jax.ShapeDtypeStruct((8, cfg.seq), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), tok)
    lora = jax.eval_shape(lambda p: lora_jax.init(
        p, r=8, targets=r".*/(q|k|v|o|up|down)/kernel", key=jax.random.key(1)), params)
    f = lora_jax.apply(model.apply)

    def flops(fn, *args):
        return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]

    full = flops(jax.grad(lambda p, t: loss_fn(model.apply(p, t), t)), params, tok)
    fast = flops(jax.grad(lambda l, p, t: loss_fn(f(p, l, t), t)), lora, params, tok)
    assert fast <= 0.72 * full, fast / full
    # merge() gives plain parameters of the same structure, shapes and dtypes, so merged
    # inference compiles to exactly the base model's program.
    merged = jax.eval_shape(lora_jax.merge, params, lora)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    assert jax.jit(model.apply).lower(merged, tok).as_text() == jax.jit(model.apply).lower(
        params, tok).as_text()
