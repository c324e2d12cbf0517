"""LoRA through remat: jax.checkpoint blocks (nested, in scans, with policies, with dropout) and
Flax nn.remat / nn.scan models, against the merged model; the rewrite replaces JAX's remat
unless a saving policy asks for JAX's own.

References are independent of the code under test: the merged-weight computation
``fn(merge(params, lora), ...)`` for values, float64 autodiff of it for gradients. Inputs
and factors are fresh random values, never zeros.
"""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from conftest import assert_all_fast, check_merged, init_lora, max_rel_err, rbg_key, rnd
from jax import lax

import lora_jax


def prim_names(jaxpr, out=None):
    """Every primitive name in a (closed) jaxpr, sub-jaxprs included."""
    out = set() if out is None else out
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        out.add(eqn.primitive.name)
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                if isinstance(sub, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
                    prim_names(sub, out)
    return out



V, D = 11, 6


def remat_params(dropout=0.0):
    params = {"emb": rnd(20, (V, D)), "w": rnd(21, (D, D), 0.4), "u": rnd(22, (D, 2, 4), 0.4)}
    lora = init_lora(params, r=3, alpha=6.0, targets=["w", "u", "emb"], dropout=dropout)
    return params, lora


IDS = jnp.asarray(np.random.default_rng(23).integers(0, V, (2, 5)), jnp.int32)
XR = rnd(24, (2, 5, D))


def _assert_rewritten(fn, params, lora, *args, policy=False, raw_params=None):
    remat = {"checkpoint", "remat", "remat2"}
    names = prim_names(jax.make_jaxpr(lora_jax.apply(fn))(params, lora, *args))
    assert bool(remat & names) == policy, names  # JAX's own remat only with a policy
    # ... and the user's function really has one.
    raw = params if raw_params is None else raw_params
    assert remat & prim_names(jax.make_jaxpr(fn)(raw, *args))


def test_checkpoint_with_integer_ids_and_float_activations():
    def block(p, ids, h):
        return jnp.tanh((h + p["emb"][ids]) @ p["w"])

    def fn(p, x, ids):
        h = jax.checkpoint(block)(p, ids, x)
        return jnp.einsum("bsi,ihd->bshd", h, p["u"])

    params, lora = remat_params()
    check_merged(fn, params, lora, XR, IDS)
    rep = lora_jax.report(fn, params, lora, XR, IDS)
    assert {k: w.routes for k, w in rep.weights.items()} == {
        "emb": ["gather"], "w": ["fast"], "u": ["fast"]}, rep
    _assert_rewritten(fn, params, lora, XR, IDS)


def test_checkpoint_with_several_outputs_one_unused_one_integer():
    def block(p, ids, h):
        y = jnp.tanh(h @ p["w"])
        return jnp.cos(y @ p["w"].T), y, ids + 1  # the first output is unused by the loss

    def fn(p, x, ids):
        _unused, y, ids2 = jax.checkpoint(block)(p, ids, x)
        return jnp.einsum("bsi,ihd->bshd", y, p["u"]) + p["emb"][ids2 % V][..., None, :4]

    params, lora = remat_params()
    check_merged(fn, params, lora, XR, IDS)
    _assert_rewritten(fn, params, lora, XR, IDS)


def test_nested_checkpoints():
    def fn(p, x):
        def outer(p, h):
            h = jax.checkpoint(lambda p, h: jnp.tanh(h @ p["w"]))(p, h)
            return jnp.sin(jax.checkpoint(lambda h: h @ p["w"].T)(h))
        h = jax.checkpoint(outer)(p, x)
        return jnp.einsum("bsi,ihd->bshd", h, p["u"])

    params, lora = remat_params()
    check_merged(fn, params, lora, XR)
    assert lora_jax.report(fn, params, lora, XR)["w"].routes == ["fast"] * 2
    _assert_rewritten(fn, params, lora, XR)


def test_checkpoint_inside_lax_scan():
    def fn(p, x):
        def body(h, _):
            h = jax.checkpoint(lambda h: jnp.tanh(h @ p["w"]))(h)
            return h, h.sum()
        h, ys = lax.scan(body, x, None, length=3)
        return jnp.einsum("bsi,ihd->bshd", h, p["u"]) * ys.sum()

    params, lora = remat_params()
    check_merged(fn, params, lora, XR, gtol=2e-4)
    _assert_rewritten(fn, params, lora, XR)


def test_checkpoint_with_saving_policy_takes_jax_path():
    policy = jax.checkpoint_policies.dots_saveable

    def fn(p, x):
        h = jax.checkpoint(lambda p, h: jnp.sin(jnp.tanh(h @ p["w"]) @ p["w"]),
                           policy=policy)(p, x)
        return jnp.einsum("bsi,ihd->bshd", h, p["u"])

    params, lora = remat_params()
    check_merged(fn, params, lora, XR)
    assert lora_jax.report(fn, params, lora, XR)["w"].routes == ["fast"] * 2
    _assert_rewritten(fn, params, lora, XR, policy=True)


def test_checkpoint_with_scalar_and_typed_key_arguments():
    def fn(p, x, k):
        def blk(h, s, k):
            y = jnp.tanh(h @ p["w"]) * s
            keep = jax.random.bernoulli(k, 0.7, y.shape)
            return jnp.where(keep, y / 0.7, 0), jax.random.split(k)[0]
        y, _ = jax.checkpoint(blk)(x, 2.0, k)  # a Python scalar and a typed key go in
        return y

    params, lora = remat_params()
    check_merged(fn, params, lora, XR, rbg_key(3), ref64=False)
    _assert_rewritten(fn, params, lora, XR, rbg_key(3))


def test_vmap_of_grad_through_checkpoint():
    def fn(p, x):
        h = jax.checkpoint(lambda h: jnp.tanh(h @ p["w"]) @ p["w"].T)(x)
        return jnp.einsum("bsi,ihd->bshd", h, p["u"])

    params, lora = remat_params()
    xs = rnd(25, (3,) + XR.shape)
    f = lora_jax.apply(fn)
    g = jax.jit(jax.vmap(jax.grad(lambda l, x: jnp.sum(jnp.sin(f(params, l, x))),
                                  argnums=(0, 1)), in_axes=(None, 0)))(lora, xs)
    g_ref = jax.jit(jax.vmap(jax.grad(
        lambda l, x: jnp.sum(jnp.sin(fn(lora_jax.merge(params, l), x))), argnums=(0, 1)),
        in_axes=(None, 0)))(lora, xs)
    assert max_rel_err(g, g_ref) < 1e-5


def test_checkpoint_with_dropout_recomputes_the_same_masks():
    def body(p, h):
        return jnp.tanh(jnp.tanh(h @ p["w"]) @ p["w"].T)

    # "w" is used twice in the block and once after it: the use after the block must draw
    # its own (third) mask with and without the checkpoint.
    def plain(p, x):
        return jnp.einsum("bsi,ihd->bshd", body(p, x) @ p["w"], p["u"])

    def ckpt(p, x):
        return jnp.einsum("bsi,ihd->bshd", jax.checkpoint(body)(p, x) @ p["w"], p["u"])

    params, lora = remat_params(dropout=0.5)
    rng = rbg_key(4)

    def vg(fn):
        f = lora_jax.apply(fn)
        return jax.jit(jax.value_and_grad(
            lambda l, k: jnp.sum(jnp.sin(f(params, l, XR, lora_rng=k)))))

    vg_plain, vg_ckpt = vg(plain), vg(ckpt)
    (v1, g1), (v2, g2) = vg_plain(lora, rng), vg_ckpt(lora, rng)
    assert abs(float(v1) - float(v2)) < 1e-6 and max_rel_err(g2, g1) < 1e-6
    v3, _ = vg_ckpt(lora, rbg_key(5))
    assert abs(float(v3) - float(v2)) > 1e-4


def _scan_fns():
    def step(p, h):
        return jnp.tanh(h @ p["w"])

    def plain(p, x):
        return lax.scan(lambda h, _: (step(p, h), None), x, None, length=2)[0]

    def ckpt(p, x):  # a checkpoint in the scan body, with a nested one inside
        def step_ckpt(p, h):
            return jnp.tanh(jax.checkpoint(lambda h: h @ p["w"])(h))
        return lax.scan(lambda h, _: (jax.checkpoint(step_ckpt)(p, h), None), x, None,
                        length=2)[0]

    return plain, ckpt


def test_checkpoint_in_scan_with_dropout_values_and_gradients():
    # Fails at 157c366: the remat rule's body closed over cfg.rng, inside a scan the step's
    # key (a scan-body tracer), and the custom VJP's backward trace leaked it
    # (UnexpectedTracerError).
    plain, ckpt = _scan_fns()
    params, lora = remat_params(dropout=0.5)
    rng = rbg_key(4)

    def vg(fn):
        f = lora_jax.apply(fn)
        return jax.jit(jax.value_and_grad(
            lambda l: jnp.sum(jnp.sin(f(params, l, XR, lora_rng=rng)))))(lora)

    (v1, g1), (v2, g2) = vg(plain), vg(ckpt)
    assert abs(float(v1) - float(v2)) < 1e-6
    assert max_rel_err(g2, g1) < 1e-6


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.DenseGeneral((2, 3), name="split")(x)  # kernel (D, 2, 3): two output axes
        h = nn.DenseGeneral(D, axis=(-2, -1), name="join")(jnp.tanh(h))  # (2, 3, D): two in
        return x + jnp.tanh(h), None


class _ScanRemat(nn.Module):
    """nn.scan over nn.remat layers (as GPTConfig(scan=True, remat=True)), kept tiny."""

    remat: bool = True

    @nn.compact
    def __call__(self, x):
        layers = nn.scan(nn.remat(_Layer) if self.remat else _Layer,
                         variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return layers(name="layers")(x, None)[0]


def test_flax_nn_scan_of_nn_remat_against_merged():
    model = _ScanRemat()
    params = jax.jit(model.init)(rbg_key(0), XR)
    lora = init_lora(params, r=2, stack_axes={".*layers.*": 1}, in_axes={".*join.*": 2})
    assert lora["params"]["layers"]["join"]["kernel"].a.shape == (3, 2, 3, 2)
    check_merged(model.apply, params, lora, XR)
    assert_all_fast(model.apply, params, lora, XR)
    _assert_rewritten(model.apply, params, lora, XR)


def test_flax_nn_scan_of_nn_remat_with_dropout():
    # Fails at 157c366 (UnexpectedTracerError: the remat body closed over the scan step's
    # dropout key); same masks with and without nn.remat once the key is an argument.
    params = jax.jit(_ScanRemat().init)(rbg_key(0), XR)
    lora = init_lora(params, r=2, dropout=0.3, stack_axes={".*layers.*": 1},
                     in_axes={".*join.*": 2})

    def vg(model):
        f = lora_jax.apply(model.apply)
        return jax.jit(jax.value_and_grad(
            lambda l, k: jnp.sum(jnp.sin(f(params, l, XR, lora_rng=k)))))

    rng = rbg_key(3)
    vg_remat = vg(_ScanRemat())
    (v1, g1), (v2, g2) = vg(_ScanRemat(remat=False))(lora, rng), vg_remat(lora, rng)
    assert all(bool(np.all(np.isfinite(a))) for a in jax.tree.leaves(g2))
    assert abs(float(v1) - float(v2)) < 1e-6 and max_rel_err(g2, g1) < 1e-5
    v3, _ = vg_remat(lora, rbg_key(4))  # another key: the masks are really applied
    assert abs(float(v3) - float(v2)) > 1e-4


class _RematStack(nn.Module):
    """Two nn.remat layers, unrolled (a quantized base cannot be sliced by nn.scan here)."""

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = nn.remat(_Layer)(name=f"layer_{i}")(x, None)[0]
        return x


def test_qlora_nf4_double_quant_base_through_remat_model():
    model = _RematStack()
    params = jax.jit(model.init)(rbg_key(0), XR)
    qbase = lora_jax.quantize(params, "nf4", double_quant=True)
    # Only "split" is adapted: "join" is a quantized base without adapter inside the block.
    lora = init_lora(params, r=2, targets=r".*/split/kernel")
    dense = lora_jax.dequantize_tree(qbase)
    check_merged(model.apply, qbase, lora, XR, ref_params=dense)
    rep = lora_jax.report(model.apply, qbase, lora, XR)
    adapted = lora_jax.lora.leaves(lora)
    assert sum(p in adapted for p in rep) == 2 and len(rep) == 4, rep
    for path, w in rep.weights.items():
        want = "fast" if path in adapted else "dequantize"
        assert w.uses and all(r == want for r in w.routes), (path, w)
    _assert_rewritten(model.apply, qbase, lora, XR, raw_params=dense)


class _RematDropoutModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        class Inner(nn.Module):
            @nn.compact
            def __call__(self, x):
                return nn.Dropout(0.3, deterministic=False)(nn.Dense(6)(x))
        return nn.Dense(4)(nn.remat(Inner)()(x))


def test_flax_nn_remat_with_flax_dropout_rng_inside():
    model = _RematDropoutModel()
    params = jax.jit(model.init)({"params": rbg_key(0), "dropout": rbg_key(1)}, XR)
    lora = init_lora(params, r=2)

    def fn(p, x, k):
        return model.apply(p, x, rngs={"dropout": k})

    check_merged(fn, params, lora, XR, rbg_key(3), ref64=False)
    assert_all_fast(fn, params, lora, XR, rbg_key(3))
